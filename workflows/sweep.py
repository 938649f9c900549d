"""`minicpmv-edge sweep`: which size to ship? LLM quant type × importance matrix × vision precision × slices.

    minicpmv-edge sweep CHECKPOINT --out DIR [--llm Q2_K,Q4_K_M,Q8_0] [--imatrix none,text,image]
                        [--vision fp32,fp16,int8] [--slices 1,4,9] [--measure quality,speed] [--executor local|ray]

For every cell: file sizes, bits per weight, mean KLD and top-1 agreement against the F16 LLM + fp32 vision
baseline over a fixed set of image+text prompts (teacher-forced along the baseline's greedy answer; held out from
the imatrix calibration set), the vision embedding cosine against fp32 (quality), and TTFT (on a 448×448 image,
one slice, and on a 1000×700 one, sliced up to the cell's limit) and decode tok/s, tagged with the hardware
(speed). Also the llama.cpp column: mmproj F16/Q8_0 embedding cosine against our fp32 path at 448×448.
Output: results.jsonl (one row per finished cell and measure), sweep.csv, sweep.json, sweep.png.

Each cell is a pure function of its spec (`run_cell`): the shared files (F16 LLM, vision, resampler, importance
matrices) and the baseline logits are made once by the driver; quantized LLMs are content-addressed in
`<out>/files` and made by whichever cell needs one first. Resumable: a cell whose row is in results.jsonl is not
run again. `--executor ray` runs the cells as Ray tasks (see quantize/sweep_exec.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime.bundle import FileKind, file_name

DEFAULT_LLM = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "IQ4_NL", "Q5_K_M", "Q6_K", "Q8_0", "F16")
DEFAULT_VISION = ("fp32", "fp16", "int8")
DEFAULT_SLICES = (1, 4, 9)
DEFAULT_MMPROJ = ("F16", "Q8_0")
FLOAT_LLM = ("F16", "F32", "BF16")
IMATRIX_MODES = ("none", "text", "image")   # no imatrix; text-only calibration; image+text calibration
MEASURES = ("quality", "speed")
N_FORCED = 16                    # answer tokens compared per prompt
QUESTIONS = ("Describe this image.", "What colours do you see?", "How many shapes are there?")


def sweep_images() -> list[Any]:
    """Fixed prompt images: different sizes and aspect ratios, so slicing matters."""
    from PIL import Image, ImageDraw
    out = []
    for i, (w, h) in enumerate([(448, 448), (1000, 700), (1344, 448)]):
        img = Image.new("RGB", (w, h), (230 - 40 * i, 225, 215 + 10 * i))
        d = ImageDraw.Draw(img)
        for k in range(6):
            x, y = (k * 173 + 40 * i) % (w - 80), (k * 97 + 30 * i) % (h - 80)
            color = ((k * 80) % 255, (k * 140 + 60 * i) % 255, (k * 200) % 255)
            (d.ellipse if k % 2 else d.rectangle)((x, y, x + 60 + 10 * k, y + 50 + 8 * k), fill=color)
        out.append(img)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def forced_logits(decoder, segments, continuation: list[int]) -> np.ndarray:
    """Logits at the prompt end and after each continuation token but the last: [len(continuation), V]."""
    decoder.reset()
    rows = [decoder.prefill(segments)]
    for tok in continuation[:-1]:
        rows.append(decoder.step(tok))
    return np.stack(rows)


@dataclass(frozen=True)
class CellSpec:
    """One measurement: an LLM type (optionally quantized with an importance matrix) × a vision precision ×
    a slice limit, measured for quality (KLD/top-1 vs the baseline: the same on any machine) or for speed
    (TTFT/decode: tagged with the hardware it ran on)."""
    llm: str
    vision: str
    slices: int
    imatrix: str = "none"
    measure: str = "quality"

    @property
    def key(self) -> str:
        return f"{self.measure}|{self.llm}|{self.imatrix}|{self.vision}|{self.slices}"


@dataclass(frozen=True)
class SweepFiles:
    """Everything a cell reads besides its own quantized LLM, prepared once by the driver. Paths lie on a
    filesystem every worker sees; names are content addresses (checkpoint id, type, imatrix digest), so
    files made by one sweep are reused by any other sweep of the same checkpoint into the same folder."""
    checkpoint: str
    ckpt_id: str
    dir: str
    f16: str
    vision: dict[str, str]
    resampler: str                 # "" when the version has none (4.6: the vision graph ends in LLM embeddings)
    imatrix: dict[str, str]        # mode -> imatrix GGUF ("none" has none)
    cache: str
    log: str
    threads: int
    keep_quantized: bool = True    # False: a cell deletes its quantized LLM when done (disk-bound big sweeps)

    @property
    def resampler_path(self) -> Path | None:
        return Path(self.resampler) if self.resampler else None

    def llm(self, qtype: str, imatrix: str = "none") -> Path:
        """The cell's LLM file, quantized here if no one made it yet (a unique temporary name, then an atomic
        rename: two workers racing for the same file both write identical bytes, one rename wins)."""
        from minicpmv_edge.quantize.gguf_ladder import quantize_gguf
        from minicpmv_edge.quantize.sweep_exec import file_sha
        if qtype == "F16":
            return Path(self.f16)
        im = self.imatrix.get(imatrix) if imatrix != "none" else None
        if imatrix != "none" and im is None:
            raise MiniCPMVEdgeError(f"no {imatrix!r} importance matrix was prepared")
        stem = self.ckpt_id + (f"-imat{file_sha(im)[:12]}" if im else "")
        path = Path(self.dir) / file_name(FileKind.LLM_GGUF, stem, qtype)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            quantize_gguf(self.f16, tmp, qtype, nthread=self.threads, imatrix=im)
            os.replace(tmp, path)
        return path


def _prepare(ckpt, out: Path, llm_types, vision_types, imatrix_modes, threads: int, progress: bool,
             calib_slices: int, keep_quantized: bool = True) -> SweepFiles:
    """F16 LLM, vision models, resampler weights and the importance matrices, into `<out>/files`."""
    from minicpmv_edge.export.gguf_llm import write_llm_gguf
    from minicpmv_edge.export.onnx_vision import open_vision_checkpoint, vision_graphs
    from minicpmv_edge.export.resampler_weights import write_resampler_weights
    from minicpmv_edge.quantize.sweep_exec import checkpoint_id
    from minicpmv_edge.runtime.bundle import kind_of_graph
    cid = checkpoint_id(ckpt)
    # the vision graph a session runs: "vision" (2.6-4.5), or 4.6's merger graph of its default mode
    vckpt = open_vision_checkpoint(ckpt)
    modes = [ckpt.facts.default_downsample_mode] if ckpt.facts.default_downsample_mode else None
    graph = vision_graphs(vckpt, downsample_modes=modes)[0]
    d = out / "files"
    d.mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    f16 = d / file_name(FileKind.LLM_GGUF, cid, "F16")
    if not f16.exists():
        write_llm_gguf(ckpt, f16, "F16")
    vision = {v: d / file_name(kind_of_graph(graph), cid, v) for v in dict.fromkeys(["fp32", *vision_types])}
    floats = [v for v, p in vision.items() if v in ("fp32", "fp16") and not p.exists()]
    if floats:
        # exported next door, then moved in: the exporter removes an fp32 it was not asked for
        from minicpmv_edge.export.onnx_vision import export_vision_onnx
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            export_vision_onnx(vckpt, tmp, cid, precisions=floats, downsample_modes=modes)
            for f in Path(tmp).iterdir():
                os.replace(f, d / f.name)
    for v, p in vision.items():
        if not p.exists():
            from minicpmv_edge.quantize.onnx_int8 import quantize_vision_onnx
            quantize_vision_onnx(vckpt, d, cid, recipes=[v], graphs=[graph])
    vision = {v: str(p) for v, p in vision.items()}
    res = d / file_name(FileKind.RESAMPLER_WEIGHTS, cid, "f32") if ckpt.resampler is not None else None
    if res is not None and not res.exists():
        write_resampler_weights(ckpt, res, "f32")
    imatrix = {}
    for mode in imatrix_modes:
        if mode == "none":
            continue
        if mode not in IMATRIX_MODES:
            raise MiniCPMVEdgeError(f"--imatrix: unknown mode {mode!r} (choose {', '.join(IMATRIX_MODES)})")
        path = d / f"imatrix-{cid}-{mode}-s{calib_slices}.gguf"
        if not path.exists():
            from minicpmv_edge.quantize.imatrix import builtin_calibration, compute_imatrix, session_from_files
            im = compute_imatrix(lambda cb: session_from_files(ckpt, f16, Path(vision["fp32"]), res, threads,
                                                               eval_callback=cb),
                                 builtin_calibration(), text_only=mode == "text", datasets=["builtin"],
                                 max_slices=calib_slices, progress=progress)
            im.save(path)
        imatrix[mode] = str(path)
    return SweepFiles(str(ckpt.root), cid, str(d), str(f16), vision, str(res or ""), imatrix, str(out / "cache"),
                      str(out / "results.jsonl"), threads, keep_quantized)


def _prompts() -> list:
    return [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
            for img, q in zip(sweep_images(), QUESTIONS)]


def _baselines(ckpt, files: SweepFiles, slices) -> dict[int, tuple[list, np.ndarray]]:
    """F16 LLM + fp32 vision, per slice count: the greedy continuation of every prompt and its log-probs.
    Computed once (cached on disk) and handed to every cell."""
    from minicpmv_edge.quantize.imatrix import session_from_files
    out = {}
    for s in slices:
        base_file = Path(files.cache) / f"baseline-{files.ckpt_id}-slices{s}.npz"
        if not base_file.exists():
            m = session_from_files(ckpt, Path(files.f16), Path(files.vision["fp32"]), files.resampler_path,
                                   files.threads)
            conts, logps = [], []
            for msgs in _prompts():
                segs = m.prepare(msgs, max_slices=s)
                cont = list(m.decoder.generate(segs, max_tokens=N_FORCED))
                cont = (cont + [m.stop_ids[0]] * N_FORCED)[:N_FORCED]
                conts.append(cont)
                logps.append(_log_softmax(forced_logits(m.decoder, segs, cont)))
            m.close()
            tmp = base_file.with_name(base_file.name + ".partial.npz")
            np.savez(tmp, conts=np.array(conts), logps=np.stack(logps))
            os.replace(tmp, base_file)
        base = np.load(base_file)
        out[s] = (base["conts"].tolist(), base["logps"])
    return out


def run_cell(spec: CellSpec, files: SweepFiles, baselines: dict[int, tuple[list, np.ndarray]]) -> dict[str, Any]:
    """Measure one cell and append its row to the result log. Depends only on its arguments (and the files
    they name), so it runs the same in this process or on any Ray worker."""
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.quantize.gguf_ladder import describe_gguf
    from minicpmv_edge.quantize.imatrix import session_from_files
    from minicpmv_edge.quantize.sweep_exec import ResultLog, hardware_tag
    t0 = time.perf_counter()
    ckpt = Checkpoint.open(files.checkpoint)
    llm = files.llm(spec.llm, spec.imatrix)
    vision = Path(files.vision[spec.vision])
    m = session_from_files(ckpt, llm, vision, files.resampler_path, files.threads)
    row: dict[str, Any] = {"llm": spec.llm, "imatrix": spec.imatrix, "vision": spec.vision, "slices": spec.slices,
                           "measure": spec.measure, "llm_file": llm.name, "llm_bytes": llm.stat().st_size,
                           "vision_bytes": vision.stat().st_size}
    prompts = _prompts()
    s = spec.slices
    try:
        if spec.measure == "quality":
            conts, base_logps = baselines[s]
            klds, top1 = [], []
            for msgs, cont, lp in zip(prompts, conts, base_logps):
                lq = _log_softmax(forced_logits(m.decoder, m.prepare(msgs, max_slices=s), cont))
                klds.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
                top1.append(float((lp.argmax(-1) == lq.argmax(-1)).mean()))
            counts, sizes, params = describe_gguf(llm)
            # embedding cosine of this vision precision vs fp32 on the sliced image (cached per precision)
            cos = _embedding_cosine(ckpt, files, spec.vision, s, sweep_images()[1], files.resampler_path,
                                    Path(files.cache), files.threads) if spec.vision != "fp32" else 1.0
            row.update(bits_per_weight=8 * sum(sizes.values()) / params, kld_mean=float(np.mean(klds)),
                       top1=float(np.mean(top1)), embedding_cosine=cos)
        elif spec.measure == "speed":
            # a fresh first question (vision included) and its decode rate, on the 448x448 image (one slice at
            # every setting) and on the 1000x700 one (as many slices as the cell allows)
            m.forget()
            t = m.chat(prompts[0], greedy=True, max_tokens=32, max_slices=s).timings
            m.forget()
            t_sliced = m.chat(prompts[1], greedy=True, max_tokens=8, max_slices=s).timings
            row.update(ttft_s=t.first_token, decode_tok_s=t.decode_tok_s, ttft_sliced_s=t_sliced.first_token,
                       sliced_image_slices=t_sliced.slices, hardware=hardware_tag(files.threads))
        else:
            raise MiniCPMVEdgeError(f"unknown measure {spec.measure!r} (choose {', '.join(MEASURES)})")
    finally:
        m.close()
        if not files.keep_quantized and spec.llm not in FLOAT_LLM:
            llm.unlink(missing_ok=True)
    row.update(key=spec.key, seconds=time.perf_counter() - t0)
    ResultLog(files.log).append(row)
    return row


def merge_rows(log_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quality and speed rows of the same (llm, imatrix, vision, slices) -> one table row, in the order cells
    first finished; `seconds` is the sum over its measures. A repeated cell (two sweeps raced) counts once."""
    merged: dict[tuple, dict[str, Any]] = {}
    seen: set[str] = set()
    for r in log_rows:
        if r.get("key") in seen:
            continue
        seen.add(r.get("key"))
        k = (r["llm"], r.get("imatrix", "none"), r["vision"], r["slices"])
        row = merged.setdefault(k, {"seconds": 0.0})
        secs = row["seconds"] + r["seconds"]
        row.update({f: v for f, v in r.items() if f not in ("measure", "key")})
        row["seconds"] = secs
    return list(merged.values())


def plan_cells(llm_types, vision_types, slices, imatrix_modes=("none",), measures=MEASURES) -> list[CellSpec]:
    """Every cell, in the order the local executor runs them (slice count, vision, LLM, imatrix, measure).
    Float LLM types take no importance matrix."""
    return [CellSpec(q, v, s, im, meas) for s in slices for v in vision_types for q in llm_types
            for im in imatrix_modes if im == "none" or q not in FLOAT_LLM for meas in measures]


def run_sweep(checkpoint: str | Path, out: str | Path, *, llm_types=DEFAULT_LLM, vision_types=DEFAULT_VISION,
              slices=DEFAULT_SLICES, imatrix_modes=("none",), measures=MEASURES, mmproj_types=DEFAULT_MMPROJ,
              executor: str = "local", ray_address: str | None = None, ray_init: dict[str, Any] | None = None,
              threads: int = 2, calib_slices: int = 1, keep_quantized: bool = True,
              progress: bool = True) -> list[dict[str, Any]]:
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.quantize.sweep_exec import EXECUTORS, ResultLog, run_local, run_ray

    if executor not in EXECUTORS:
        raise MiniCPMVEdgeError(f"--executor: unknown executor {executor!r} (choose {', '.join(EXECUTORS)})")
    bad = [m for m in measures if m not in MEASURES]
    if bad:
        raise MiniCPMVEdgeError(f"--measure: unknown {', '.join(bad)} (choose {', '.join(MEASURES)})")
    ckpt = Checkpoint.open(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _prepare(ckpt, out, llm_types, vision_types, imatrix_modes, threads, progress, calib_slices,
                     keep_quantized)
    log = ResultLog(files.log)
    done = {r.get("key") for r in log.rows()}
    cells = [c for c in plan_cells(llm_types, vision_types, slices, imatrix_modes, measures) if c.key not in done]
    baselines = _baselines(ckpt, files, slices) if any(c.measure == "quality" for c in cells) else {}
    bar = None
    if progress and cells:
        from tqdm import tqdm
        bar = tqdm(total=len(cells), desc=f"sweep ({executor})")
    results = (run_ray(run_cell, cells, files, baselines, address=ray_address, init_kwargs=ray_init)
               if executor == "ray" else run_local(run_cell, cells, files, baselines))
    for _ in results:   # each cell has appended its own row
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    rows = merge_rows(log.rows())
    state = {"rows": rows,
             "baseline": {"llm": "F16", "vision": "fp32", "forced_tokens": N_FORCED, "prompts": len(QUESTIONS),
                          "synthetic_weights_note": "quality numbers on random (synthetic) weights rank the types "
                                                    "but do not predict quality on trained weights"},
             "llama_cpp": _mmproj_column(ckpt, files, sweep_images()[0], mmproj_types)}
    tmp = out / "sweep.json.partial"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "sweep.json")
    _write_csv(rows, out / "sweep.csv")
    _plot(rows, out / "sweep.png")
    return rows


def _vision_blocks(ckpt, files: SweepFiles, precision, s, image, res_path, cache, threads) -> np.ndarray:
    path = cache / f"emb-{files.ckpt_id}-{precision}-s{s}-{image.size[0]}x{image.size[1]}.npy"
    if path.exists():
        return np.load(path)
    from minicpmv_edge.runtime.preprocess import preprocess_image
    from minicpmv_edge.runtime.resampler import load_resampler
    from minicpmv_edge.runtime.vision import OnnxVision, ResamplerInGraph
    vis = OnnxVision(files.vision[precision], threads=threads, position_rule=ckpt.facts.vision_position_ids)
    res = load_resampler(res_path, threads=threads) if res_path else ResamplerInGraph(ckpt.llm.hidden_size)
    pre = preprocess_image(image, max_slice_nums=s, slicing=ckpt.facts.slicing)
    # every slice's rows, overview first (4.6 slices differ in row count, so rows are concatenated)
    blocks = np.concatenate([res.run(vis.encode(sl), *sl.tgt_size) for sl in pre.slices])
    res.close()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")   # cells on other workers may write it too
    np.save(tmp, blocks)
    os.replace(tmp, path)
    return blocks


def _cos_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _embedding_cosine(ckpt, files, precision, s, image, res_path, cache, threads) -> float:
    ref = _vision_blocks(ckpt, files, "fp32", s, image, res_path, cache, threads)
    got = _vision_blocks(ckpt, files, precision, s, image, res_path, cache, threads)
    return _cos_rows(got, ref)


def _mmproj_column(ckpt, files: SweepFiles, image_448, types) -> list[dict[str, Any]]:
    """llama.cpp's clip on each mmproj type: file size and embedding cosine vs our fp32 path (448×448)."""
    from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
    from minicpmv_edge.export.onnx_vision import open_vision_checkpoint
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip
    ref = _vision_blocks(ckpt, files, "fp32", 1, image_448, files.resampler_path, Path(files.cache), files.threads)
    ref = ref.reshape(-1, ref.shape[-1])      # one slice: the 448x448 image is not sliced
    rows = []
    for q in types:
        path = Path(files.dir) / file_name(FileKind.MMPROJ_GGUF, files.ckpt_id, q)
        if not path.exists():
            write_mmproj_gguf(open_vision_checkpoint(ckpt), path, q)
        with LlamaCppClip(path, files.f16, threads=files.threads) as clip:
            got = clip.encode(image_448)[0]
        rows.append({"mmproj": q, "bytes": path.stat().st_size, "embedding_cosine": _cos_rows(got, ref)})
    return rows


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        # rows from older runs may lack newer columns: the header is every key seen, in first-seen order
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        w.writeheader()
        w.writerows(rows)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = sorted({(r["vision"], r["slices"], r.get("imatrix", "none")) for r in rows})
    for v, s, im in groups:
        sel = sorted((r for r in rows if (r["vision"], r["slices"], r.get("imatrix", "none")) == (v, s, im)),
                     key=lambda r: r["llm_bytes"])
        label = f"vision {v}, ≤{s} slices" + (f", imatrix {im}" if im != "none" else "")
        q = [r for r in sel if "kld_mean" in r]
        if q:
            size = [(r["llm_bytes"] + r["vision_bytes"]) / 2 ** 20 for r in q]
            a.plot(size, [r["kld_mean"] for r in q], "o-", label=label)
            for r, x in zip(q, size):
                a.annotate(r["llm"], (x, r["kld_mean"]), fontsize=7)
        sp = [r for r in sel if "ttft_s" in r]
        if sp:
            b.plot([(r["llm_bytes"] + r["vision_bytes"]) / 2 ** 20 for r in sp], [r["ttft_s"] * 1000 for r in sp],
                   "o-", label=label)
    a.set(xlabel="LLM + vision files (MiB)", ylabel="mean KLD vs F16 + fp32", title="size vs quality (synthetic weights)")
    b.set(xlabel="LLM + vision files (MiB)", ylabel="TTFT (ms)", title="size vs time to first token")
    a.set_yscale("symlog", linthresh=1e-4)
    for ax in (a, b):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    """A table cell, or a dash where the row lacks the measure (quality-only or speed-only sweeps)."""
    return format(row[key] * scale, fmt) if key in row else "–"


def _sliced(row: dict[str, Any]) -> str:
    if "ttft_sliced_s" not in row:     # a row from a sweep.json written before this column existed
        return "–"
    return f"{row['ttft_sliced_s'] * 1000:.0f} ({row['sliced_image_slices']})"


def _list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise MiniCPMVEdgeError(f"--{what}: nothing given")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge sweep", description=__doc__.strip().splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llm", default=",".join(DEFAULT_LLM), help="LLM types and recipes (e.g. Q4_K_M,Q4_K_HI)")
    ap.add_argument("--vision", default=",".join(DEFAULT_VISION))
    ap.add_argument("--slices", default=",".join(map(str, DEFAULT_SLICES)))
    ap.add_argument("--imatrix", default="none",
                    help="importance matrices to quantize with: none, text (text-only calibration), image "
                         "(image+text calibration); e.g. none,text,image")
    ap.add_argument("--calib-slices", type=int, default=1, help="slice limit of the imatrix calibration images")
    ap.add_argument("--mmproj", default=",".join(DEFAULT_MMPROJ), help="mmproj types for the llama.cpp column "
                    "(F16, Q8_0, Q6_K)")
    ap.add_argument("--measure", default=",".join(MEASURES),
                    help="quality (KLD/top-1; any machine), speed (TTFT/tok/s; tagged with the hardware), or both")
    ap.add_argument("--executor", default="local", help="local (this process) or ray (a Ray cluster: the "
                    "'cluster' extra; --out must be on a filesystem every node sees)")
    ap.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads per cell")
    ap.add_argument("--discard-quantized", action="store_true",
                    help="delete each quantized LLM once its cell is measured (saves disk on big models; a later "
                         "cell that needs the same file quantizes it again)")
    args = ap.parse_args(argv)
    try:
        slices = [int(s) for s in args.slices.split(",") if s]
    except ValueError:
        raise MiniCPMVEdgeError(f"--slices: expected integers, got {args.slices!r}") from None
    if not 1 <= args.calib_slices <= 36:
        raise MiniCPMVEdgeError("--calib-slices must be between 1 and 36")
    rows = run_sweep(args.checkpoint, args.out, llm_types=[t.upper() for t in _list(args.llm, "llm")],
                     vision_types=[t.lower() for t in _list(args.vision, "vision")], slices=slices,
                     imatrix_modes=[t.lower() for t in _list(args.imatrix, "imatrix")],
                     measures=[t.lower() for t in _list(args.measure, "measure")],
                     mmproj_types=[t.upper() for t in _list(args.mmproj, "mmproj")], executor=args.executor,
                     ray_address=args.ray_address, threads=args.threads, calib_slices=args.calib_slices,
                     keep_quantized=not args.discard_quantized)
    print("| LLM | imatrix | vision | slices | size MiB | bpw | KLD (synthetic) | top-1 | emb cos | TTFT ms 448×448 | "
          "TTFT ms 1000×700 (slices) | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["slices"], r["vision"], r["llm_bytes"], r.get("imatrix", "none"))):
        print(f"| {r['llm']} | {r.get('imatrix', 'none')} | {r['vision']} | {r['slices']} | "
              f"{(r['llm_bytes'] + r['vision_bytes']) / 2**20:.1f} | {_cell(r, 'bits_per_weight', '.2f')} | "
              f"{_cell(r, 'kld_mean', '.4f')} | {_cell(r, 'top1', '.2f')} | {_cell(r, 'embedding_cosine', '.4f')} | "
              f"{_cell(r, 'ttft_s', '.0f', 1000)} | {_sliced(r)} | {_cell(r, 'decode_tok_s', '.1f')} |")
    print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.json'}, {args.out / 'sweep.png'}, "
          f"{args.out / 'results.jsonl'}")
    return 0
