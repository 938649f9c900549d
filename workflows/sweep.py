"""`minicpmv-edge sweep`: which size to ship? LLM quant type × vision precision × slices, measured.

    minicpmv-edge sweep CHECKPOINT --out DIR [--llm Q2_K,Q4_K_M,Q8_0] [--vision fp32,fp16,int8] [--slices 1,4,9]

For every cell: file sizes, bits per weight, mean KLD and top-1 agreement against the F16 LLM + fp32 vision
baseline over a fixed set of image+text prompts (teacher-forced along the baseline's greedy answer), the
vision embedding cosine against fp32, TTFT (on a 448×448 image, one slice, and on a 1000×700 one, sliced up to
the cell's limit) and decode tok/s. Also the llama.cpp column: mmproj F16/Q8_0
embedding cosine against our fp32 path at 448×448. Output: sweep.csv, sweep.json, sweep.png.

Resumable: finished cells are read back from sweep.json and not recomputed; exported files are reused.
One LLM and one vision model are in memory at a time (vision embeddings are cached on disk per precision).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime.bundle import FileKind, file_name

DEFAULT_LLM = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "IQ4_NL", "Q5_K_M", "Q6_K", "Q8_0", "F16")
DEFAULT_VISION = ("fp32", "fp16", "int8")
DEFAULT_SLICES = (1, 4, 9)
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


class _Files:
    """Exports (or reuses) every file the sweep needs into `<out>/files`."""

    def __init__(self, ckpt, out: Path):
        self.ckpt, self.dir, self.name = ckpt, out / "files", "m"
        self.dir.mkdir(parents=True, exist_ok=True)

    def llm(self, qtype: str) -> Path:
        from minicpmv_edge.export.gguf_llm import write_llm_gguf
        from minicpmv_edge.quantize.gguf_ladder import quantize_gguf
        path = self.dir / file_name(FileKind.LLM_GGUF, self.name, qtype)
        if not path.exists():
            f16 = self.dir / file_name(FileKind.LLM_GGUF, self.name, "F16")
            if not f16.exists():
                write_llm_gguf(self.ckpt, f16, "F16")
            if qtype != "F16":
                quantize_gguf(f16, path, qtype)
        return path

    def vision(self, precision: str) -> Path:
        path = self.dir / file_name(FileKind.VISION_ONNX, self.name, precision)
        if not path.exists():
            if precision in ("fp32", "fp16"):
                from minicpmv_edge.export.onnx_vision import export_vision_onnx
                export_vision_onnx(self.ckpt, self.dir, self.name, precisions=[precision])
            else:
                from minicpmv_edge.quantize.onnx_int8 import quantize_vision_onnx
                quantize_vision_onnx(self.ckpt, self.dir, self.name, recipes=[precision])
        return path

    def resampler(self) -> Path:
        from minicpmv_edge.export.resampler_weights import write_resampler_weights
        path = self.dir / file_name(FileKind.RESAMPLER_WEIGHTS, self.name, "f32")
        if not path.exists():
            write_resampler_weights(self.ckpt, path, "f32")
        return path

    def mmproj(self, qtype: str) -> Path:
        from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
        path = self.dir / file_name(FileKind.MMPROJ_GGUF, self.name, qtype)
        if not path.exists():
            write_mmproj_gguf(self.ckpt, path, qtype)
        return path


def _model(ckpt, llm_path: Path, vision_path: Path, resampler_path: Path, threads: int):
    """A MiniCPMV session over explicit files (the sweep builds cells, not bundles), with the preprocessing and
    prompt sections a bundle of this checkpoint would carry."""
    from minicpmv_edge.export.bundle import preprocess_section, prompt_section
    from minicpmv_edge.runtime.decoder import Decoder
    from minicpmv_edge.runtime.resampler import load_resampler
    from minicpmv_edge.runtime.session import MiniCPMV
    from minicpmv_edge.runtime.vision import OnnxVision
    cfg = preprocess_section(ckpt).config()
    return MiniCPMV(facts=ckpt.facts, decoder=Decoder(llm_path, threads=threads, n_ctx=4096),
                    vision=OnnxVision(vision_path, threads=threads, num_patches_per_side=cfg.num_patches_per_side),
                    resampler=load_resampler(resampler_path, threads=threads),
                    prompt_format=prompt_section(ckpt).format(), preprocess=cfg)


def run_sweep(checkpoint: str | Path, out: str | Path, *, llm_types=DEFAULT_LLM, vision_types=DEFAULT_VISION,
              slices=DEFAULT_SLICES, threads: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.quantize.gguf_ladder import describe_gguf
    from minicpmv_edge.runtime.session import Timings

    ckpt = Checkpoint.open(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = _Files(ckpt, out)
    state_path = out / "sweep.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": [], "baseline": {}}
    done = {(r["llm"], r["vision"], r["slices"]) for r in state["rows"]}
    images = sweep_images()
    prompts = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
               for img, q in zip(images, QUESTIONS)]
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    res_path = files.resampler()

    cells = [(q, v, s) for s in slices for v in vision_types for q in llm_types if (q, v, s) not in done]
    bar = None
    if progress and cells:
        from tqdm import tqdm
        bar = tqdm(total=len(cells), desc="sweep")

    # 1. baseline per slice count: F16 LLM + fp32 vision -> greedy continuation + its log-probs
    for s in slices:
        key = f"slices{s}"
        base_file = cache / f"baseline-{key}.npz"
        if base_file.exists():
            continue
        m = _model(ckpt, files.llm("F16"), files.vision("fp32"), res_path, threads)
        conts, logps = [], []
        for msgs in prompts:
            segs = m.prepare(msgs, max_slices=s)
            cont = list(m.decoder.generate(segs, max_tokens=N_FORCED))
            cont = (cont + [m.stop_ids[0]] * N_FORCED)[:N_FORCED]
            conts.append(cont)
            logps.append(_log_softmax(forced_logits(m.decoder, segs, cont)))
        m.close()
        np.savez(base_file, conts=np.array(conts), logps=np.stack(logps))

    # 2. the cells, grouped so each vision precision is loaded once per slice count and each LLM once per cell
    for s in slices:
        base = np.load(cache / f"baseline-slices{s}.npz")
        conts, base_logps = base["conts"].tolist(), base["logps"]
        for v in vision_types:
            todo = [q for q in llm_types if (q, v, s) not in done]
            if not todo:
                continue
            for q in todo:
                t0 = time.perf_counter()
                m = _model(ckpt, files.llm(q), files.vision(v), res_path, threads)
                klds, top1 = [], []
                for msgs, cont, lp in zip(prompts, conts, base_logps):
                    logits = forced_logits(m.decoder, m.prepare(msgs, max_slices=s), cont)
                    lq = _log_softmax(logits)
                    klds.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
                    top1.append(float((lp.argmax(-1) == lq.argmax(-1)).mean()))
                # embedding cosine of this vision precision vs fp32 on the first image's slices (cached)
                cos = _embedding_cosine(ckpt, files, v, s, images[1], res_path, cache, threads) if v != "fp32" \
                    else 1.0
                # speed: a fresh first question (vision included) and its decode rate, on the 448x448 image
                # (one slice at every setting) and on the 1000x700 one (as many slices as the cell allows)
                m.forget()
                t = m.chat(prompts[0], greedy=True, max_tokens=32, max_slices=s).timings
                m.forget()
                t_sliced = m.chat(prompts[1], greedy=True, max_tokens=8, max_slices=s).timings
                counts, sizes, params = describe_gguf(files.llm(q))
                row = {"llm": q, "vision": v, "slices": s,
                       "llm_bytes": files.llm(q).stat().st_size, "vision_bytes": files.vision(v).stat().st_size,
                       "bits_per_weight": 8 * sum(sizes.values()) / params,
                       "kld_mean": float(np.mean(klds)), "top1": float(np.mean(top1)),
                       "embedding_cosine": cos, "ttft_s": t.first_token, "decode_tok_s": t.decode_tok_s,
                       "ttft_sliced_s": t_sliced.first_token, "sliced_image_slices": t_sliced.slices,
                       "seconds": time.perf_counter() - t0}
                m.close()
                state["rows"].append(row)
                done.add((q, v, s))
                tmp = state_path.with_name("sweep.json.partial")
                tmp.write_text(json.dumps(state, indent=1))
                os.replace(tmp, state_path)   # a finished cell survives an interruption
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    state["baseline"] = {"llm": "F16", "vision": "fp32", "forced_tokens": N_FORCED, "prompts": len(prompts),
                         "synthetic_weights_note": "quality numbers on random (synthetic) weights rank the types "
                                                   "but do not predict quality on trained weights"}
    state["llama_cpp"] = _mmproj_column(ckpt, files, images[0], res_path, cache, threads)
    state_path.write_text(json.dumps(state, indent=1))
    _write_csv(state["rows"], out / "sweep.csv")
    _plot(state["rows"], out / "sweep.png")
    return state["rows"]


def _vision_blocks(ckpt, files, precision, s, image, res_path, cache, threads) -> np.ndarray:
    path = cache / f"emb-{precision}-s{s}-{image.size[0]}x{image.size[1]}.npy"
    if path.exists():
        return np.load(path)
    from minicpmv_edge.runtime.preprocess import preprocess_image
    from minicpmv_edge.runtime.resampler import load_resampler
    from minicpmv_edge.runtime.vision import OnnxVision
    vis = OnnxVision(files.vision(precision), threads=threads)
    res = load_resampler(res_path, threads=threads)
    pre = preprocess_image(image, max_slice_nums=s)
    blocks = np.stack([res.run(vis.encode(sl), *sl.tgt_size) for sl in pre.slices])
    res.close()
    np.save(path, blocks)
    return blocks


def _cos_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _embedding_cosine(ckpt, files, precision, s, image, res_path, cache, threads) -> float:
    ref = _vision_blocks(ckpt, files, "fp32", s, image, res_path, cache, threads)
    got = _vision_blocks(ckpt, files, precision, s, image, res_path, cache, threads)
    return _cos_rows(got, ref)


def _mmproj_column(ckpt, files, image_448, res_path, cache, threads) -> list[dict[str, Any]]:
    """llama.cpp's clip on mmproj F16 / Q8_0: file size and embedding cosine vs our fp32 path (448×448)."""
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip
    ref = _vision_blocks(ckpt, files, "fp32", 1, image_448, res_path, cache, threads)
    rows = []
    for q in ("F16", "Q8_0"):
        with LlamaCppClip(files.mmproj(q), files.llm("F16"), threads=threads) as clip:
            got = clip.encode(image_448)[0]
        rows.append({"mmproj": q, "bytes": files.mmproj(q).stat().st_size, "embedding_cosine": _cos_rows(got, ref[0])})
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
    for v in sorted({r["vision"] for r in rows}):
        for s in sorted({r["slices"] for r in rows}):
            sel = sorted((r for r in rows if r["vision"] == v and r["slices"] == s), key=lambda r: r["llm_bytes"])
            size = [(r["llm_bytes"] + r["vision_bytes"]) / 2 ** 20 for r in sel]
            a.plot(size, [r["kld_mean"] for r in sel], "o-", label=f"vision {v}, ≤{s} slices")
            b.plot(size, [r["ttft_s"] * 1000 for r in sel], "o-", label=f"vision {v}, ≤{s} slices")
            for r, x in zip(sel, size):
                a.annotate(r["llm"], (x, r["kld_mean"]), fontsize=7)
    a.set(xlabel="LLM + vision files (MiB)", ylabel="mean KLD vs F16 + fp32", title="size vs quality (synthetic weights)")
    b.set(xlabel="LLM + vision files (MiB)", ylabel="TTFT (ms)", title="size vs time to first token")
    a.set_yscale("symlog", linthresh=1e-4)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sliced(row: dict[str, Any]) -> str:
    if "ttft_sliced_s" not in row:     # a row from a sweep.json written before this column existed
        return "–"
    return f"{row['ttft_sliced_s'] * 1000:.0f} ({row['sliced_image_slices']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge sweep", description=__doc__.strip().splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llm", default=",".join(DEFAULT_LLM))
    ap.add_argument("--vision", default=",".join(DEFAULT_VISION))
    ap.add_argument("--slices", default=",".join(map(str, DEFAULT_SLICES)))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    try:
        slices = [int(s) for s in args.slices.split(",") if s]
    except ValueError:
        raise MiniCPMVEdgeError(f"--slices: expected integers, got {args.slices!r}") from None
    rows = run_sweep(args.checkpoint, args.out, llm_types=[t.strip().upper() for t in args.llm.split(",") if t],
                     vision_types=[t.strip().lower() for t in args.vision.split(",") if t], slices=slices,
                     threads=args.threads)
    print("| LLM | vision | slices | size MiB | bpw | KLD (synthetic) | top-1 | emb cos | TTFT ms 448×448 | "
          "TTFT ms 1000×700 (slices) | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["slices"], r["vision"], r["llm_bytes"])):
        print(f"| {r['llm']} | {r['vision']} | {r['slices']} | {(r['llm_bytes'] + r['vision_bytes']) / 2**20:.1f} | "
              f"{r['bits_per_weight']:.2f} | {r['kld_mean']:.4f} | {r['top1']:.2f} | {r['embedding_cosine']:.4f} | "
              f"{r['ttft_s'] * 1000:.0f} | {_sliced(r)} | {r['decode_tok_s']:.1f} |")
    print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.json'}, {args.out / 'sweep.png'}")
    return 0
