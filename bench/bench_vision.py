"""Vision tower speed and accuracy: torch eager vs onnxruntime fp32 / fp16 / every int8 recipe vs llama.cpp's
clip on our F16 mmproj, one 448x448 slice (32x32 patches), same random weights, in one run.

    .venv/bin/python bench/bench_vision.py                        # SigLIP-400M dims (1152 x 27), ~30 min
    .venv/bin/python bench/bench_vision.py --layers 2 --runs 1    # a smoke run in ~1 min
    .venv/bin/python bench/bench_vision.py --coreml-only          # CoreML variants: conversion time and sizes

Weights: a synthetic MiniCPM-V 4.5 checkpoint written for the bench (`make_bench_checkpoint`): the SigLIP-400M
tower with synth's fan-in scaled random weights, the resampler at 2560 wide (Qwen3-4B, our edge-4b LLM width)
and a one-layer LLM of that width, which llama.cpp's mtmd needs to be created against. **Random weights are
harsher on int8 than trained ones** (no redundancy to exploit; docs/toolchain.md #10: measured 0.935 for
per-tensor dynamic int8 on HF-init random so400m weights) **and cannot show the activation outliers of trained
SigLIP**: read the cosines as indicative, and re-measure with real weights before relying on a recipe.

The files (ONNX exports, int8 recipes, fp16, GGUFs) are made by a child process (`--prepare-only`): torch.export
of the 400M tower peaks at ~16 GB RSS and leaves GBs of heap behind, which the timing process must not carry.
With `--work DIR` they are kept and reused by the next run.

Every row is validated before it is timed: cosine per patch row against the torch fp32 reference (min and
mean over the 1024 rows). Timing is by groups (torch, fp16, fusions, int8-dynamic, int8-weight-only, clip), each
holding ORT fp32: inside a group the variants run round-robin (run i of every variant before run i+1 of any),
1 warm-up then `--runs` runs, median; ratios are to the ORT fp32 of the same group. The box is shared (other
jobs come and go: absolute times moved 2x between groups of one run), and round-robin exposes every variant of
a group to the same load, so the ratios hold where the absolute times do not.

llama.cpp's clip encodes the ViT *and* the resampler (an mmproj holds both), so its row is compared with the
ORT vision+resampler graph (`vision_resampler fp32`), whose output it must also match (cosine on the 64 rows).

Extra tables: fp16 with and without the norms/softmax kept in fp32, and per-role sensitivity of per-tensor
dynamic int8 (one role quantized at a time: qkv, attn_out, fc1, fc2). Writes `bench_vision.json` and
`bench_vision.md` into `--out` (default bench/results/).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from minicpmv_edge.workflows.benchmark import cpu_name

ROOT = Path(__file__).resolve().parent


@dataclass
class Row:
    name: str
    kind: str                      # "torch", "ort", "llama.cpp"
    output: str                    # "patch_features" | "image_embeds"
    group: str = ""
    seconds: list[float] = field(default_factory=list)
    cos_min: float | None = None
    cos_mean: float | None = None
    size_mb: float | None = None
    fused: dict[str, int] = field(default_factory=dict)
    note: str = ""
    vs_fp32: float | None = None   # speed-up over ORT fp32 timed in the same group
    vs_torch: float | None = None  # speed-up over torch eager, through the groups' ORT fp32 baseline

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


@dataclass
class Variant:
    """Something to time: `open()` returns a zero-argument callable producing the output to validate."""
    row: Row
    open: Callable[[], Callable[[], np.ndarray]]
    want: np.ndarray
    close: Callable[[], None] = lambda: None


# ---------------------------------------------------------------------------------------------- weights

def make_bench_checkpoint(out: Path, layers: int, llm_width: int = 2560, seed: int = 0) -> Path:
    """A MiniCPM-V 4.5 checkpoint: SigLIP-400M vision (with `layers` blocks), resampler and a 1-layer LLM
    `llm_width` wide, tiny tokenizer; weights from synth's generator (same scales as `synth --size edge-4b`)."""
    from minicpmv_edge.export import synth as S
    from minicpmv_edge.export.synth_tokenizer import write_tokenizer
    from minicpmv_edge.facts import LLMDims, VisionDims, facts_for

    if out.exists():
        return out
    facts = facts_for("4.5")
    vision = replace(VisionDims(), num_hidden_layers=layers)
    llm = LLMDims(hidden_size=llm_width, num_hidden_layers=1, num_attention_heads=llm_width // 128,
                  num_key_value_heads=4, head_dim=128, intermediate_size=2 * llm_width, vocab_size=0,
                  max_position_embeddings=4096)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    n_tokens = write_tokenizer(facts, staging, bpe_vocab_size=S.TINY_BPE_VOCAB, seed=seed)
    vocab = -(-n_tokens // 64) * 64
    ids = S._token_ids(facts, staging)
    config = S.build_config(facts, vision, llm, vocab, ids)
    pre = S.build_preprocessor_config(facts, vision)
    tensors = S.expected_tensors(S.parse_config(config, preprocessor=pre))
    plan = S.SynthPlan(facts.version, "bench", config, pre, tensors, S._shard(tensors, 2 ** 62))
    (staging / S.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (staging / S.PREPROCESSOR_CONFIG).write_text(json.dumps(pre, indent=2) + "\n")
    S._write_weights(plan, staging, seed, False, n_tokens)
    os.replace(staging, out)
    return out


# ---------------------------------------------------------------------------------------------- timing

def cos_stats(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    from minicpmv_edge.export.onnx_vision import cosine_rows

    c = cosine_rows(got, want)
    return float(c.min()), float(c.mean())


def size_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths) / 1e6


def ort_variant(name: str, art, feed, want, threads: int, group: str, note: str = "",
                output: str = "patch_features") -> Variant:
    from minicpmv_edge.export.onnx_vision import ort_session

    def open_():
        sess = ort_session(art.path, threads)
        return lambda: sess.run(None, feed)[0]
    return Variant(Row(name, "ort", output, group, size_mb=size_mb(art.files), fused=dict(art.fused), note=note),
                   open_, want)


def run_group(title: str, variants: list[Variant], runs: int) -> list[Row]:
    """Open every variant, validate (its warm-up output), then time them round-robin: run i of every variant
    before run i+1 of any, so load from other processes hits all of them alike."""
    print(f"{title} (round-robin, {runs} runs after warm-up)", flush=True)
    fns = []
    for v in variants:
        fn = v.open()
        out = np.asarray(fn(), dtype=np.float32)                               # warm-up + validation
        v.row.cos_min, v.row.cos_mean = cos_stats(out.reshape(-1, out.shape[-1]), v.want)
        fns.append(fn)
    for _ in range(runs):
        for v, fn in zip(variants, fns):
            t0 = time.perf_counter()
            fn()
            v.row.seconds.append(time.perf_counter() - t0)
    rss = _rss_gb()
    del fns
    for v in variants:
        v.close()
    gc.collect()
    base = next((v.row.median for v in variants if v.row.name == FP32), None)
    print(f"  (process RSS with the group open: {rss:.1f} GB)", flush=True)
    for v in variants:
        r = v.row
        r.vs_fp32 = base / r.median if base else None
        size = "" if r.size_mb is None else f"{r.size_mb:8.1f} MB"
        print(f"  {r.name:<38} {r.median:8.3f} s  x{_fmt(r.vs_fp32, '.2f'):>5} vs fp32   "
              f"cos min {r.cos_min:.7f} mean {r.cos_mean:.7f}  {size}", flush=True)
    return [v.row for v in variants]


FP32 = "ORT fp32 (Attention+SkipLN+FastGelu)"


# ---------------------------------------------------------------------------------------------- main

PREPARED = "prepared.json"


def _art_dict(a) -> dict:
    return {"path": str(a.path), "files": [str(f) for f in a.files], "fused": a.fused, "seconds": a.seconds}


def prepare(args, work: Path) -> dict:
    """Checkpoint, every ONNX file, the GGUFs for llama.cpp (run in a child process: torch.export of the 400M
    tower leaves GBs of heap behind, which the timing process must not carry)."""
    from minicpmv_edge.export import onnx_vision as OV
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.quantize import onnx_int8 as Q

    ckpt = Checkpoint.open(make_bench_checkpoint(work / f"ckpt-{args.layers}l", args.layers))
    arts: dict[str, dict] = {}
    print("export", flush=True)
    for level in ("full", "no_attention", "none"):
        a = OV.export_onnx(ckpt, work / f"vision-fp32-{level}.onnx", fuse=level)
        arts[f"fp32-{level}"] = _art_dict(a)
        print(f"  fp32 fuse={level}: {a.seconds:.1f} s, fused {a.fused}", flush=True)
    full = work / "vision-fp32-full.onnx"
    fusions = {"in_file": arts["fp32-full"]["fused"], "ort_at_load_on_fused": OV.ort_session_fusions(full),
               "ort_at_load_on_plain": OV.ort_session_fusions(work / "vision-fp32-none.onnx")}
    arts["fp16"] = _art_dict(OV.convert_fp16(full, work / "vision-fp16.onnx"))
    arts["fp16-keep-none"] = _art_dict(OV.convert_fp16(full, work / "vision-fp16-all.onnx", keep_fp32=()))
    for name in args.recipes:
        r = Q.recipe(name)
        a = Q.quantize_onnx(work / f"vision-fp32-{r.base}.onnx", work / f"vision-{r.name}.onnx", r)
        arts[f"int8:{r.name}"] = _art_dict(a)
        print(f"  {r.name}: quantized in {a.seconds:.1f} s", flush=True)
    arts["vision-resampler"] = _art_dict(OV.export_onnx(ckpt, work / "vision-resampler-fp32.onnx",
                                                        graph="vision_resampler"))
    gguf = {}
    if not args.no_clip:
        try:
            from minicpmv_edge.export.gguf_llm import write_llm_gguf
            from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
            gguf = {"mmproj": str(write_mmproj_gguf(ckpt, work / "mmproj-F16.gguf", "F16")),
                    "llm": str(write_llm_gguf(ckpt, work / "llm-F16.gguf", "F16"))}
        except ImportError as exc:
            gguf = {"error": str(exc)}
    sens = []
    if not args.no_sensitivity:
        base = Q.RECIPES["dyn-pt"]
        for role in ("qkv", "attn_out", "fc1", "fc2"):
            r = replace(base, name=f"dyn-pt-only-{role}", keep_fp32=tuple(x for x in Q.ROLES if x != role))
            sens.append({"quantized_role": role,
                         **_art_dict(Q.quantize_onnx(full, work / f"sens-{role}.onnx", r))})
    info = {"layers": args.layers, "recipes": list(args.recipes), "arts": arts, "fusions": fusions, "gguf": gguf,
            "sensitivity": sens, "checkpoint": str(ckpt.root)}
    (work / PREPARED).write_text(json.dumps(info, indent=1))
    return info


def _rss_gb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError):
        return float("nan")


def run(args) -> dict:
    import subprocess
    from types import SimpleNamespace

    import torch

    from minicpmv_edge.export import onnx_vision as OV
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.export.reference import Resampler, VisionTower
    from minicpmv_edge.quantize import onnx_int8 as Q
    from minicpmv_edge.runtime.preprocess import normalize

    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-vision-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"work dir {work}", flush=True)
    info = json.loads((work / PREPARED).read_text()) if (work / PREPARED).is_file() else None
    if not info or info["layers"] != args.layers or info["recipes"] != list(args.recipes):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-only", "--work", str(work),
               "--layers", str(args.layers), "--recipes", ",".join(args.recipes)]
        cmd += ["--no-clip"] * args.no_clip + ["--no-sensitivity"] * args.no_sensitivity
        subprocess.run(cmd, check=True)
        info = json.loads((work / PREPARED).read_text())
    arts = {k: SimpleNamespace(path=Path(a["path"]), files=[Path(f) for f in a["files"]], fused=a["fused"])
            for k, a in info["arts"].items()}

    ckpt = Checkpoint.open(info["checkpoint"])
    v = ckpt.vision
    h, w = args.grid
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(14 * h, 14 * w, 3), dtype=np.uint8))
    pixels = normalize(image, ckpt.preprocess.norm_mean, ckpt.preprocess.norm_std)       # [3, H, W]
    feed = OV.slice_feed(pixels, v.patch_size, v.num_patches_per_side)
    tower, resampler = VisionTower.from_checkpoint(ckpt), Resampler.from_checkpoint(ckpt)
    px = torch.from_numpy(pixels)
    with torch.no_grad():
        want = tower.encode([px])[0].numpy()                                              # [h*w, C]
        want_emb = resampler([torch.from_numpy(want)], [(h, w)])[0].numpy()              # [Q, D]
    del resampler

    t = args.threads
    fp32 = lambda g: ort_variant(FP32, arts["fp32-full"], feed, want, t, g, "shipped fp32 graph")

    def torch_variant(g: str) -> Variant:
        def open_():
            def fn():
                with torch.no_grad():
                    return tower.encode([px])[0].numpy()
            return fn
        return Variant(Row("torch eager fp32", "torch", "patch_features", g), open_, want)

    rows: list[Row] = []
    rows += run_group("torch", [torch_variant("torch"), fp32("torch")], args.runs)
    del tower
    gc.collect()
    rows += run_group("fp16", [fp32("fp16"),
                               ort_variant("ORT fp16 (LN/softmax fp32)", arts["fp16"], feed, want, t, "fp16",
                                           "shipped fp16: keep " + ",".join(OV.FP16_KEEP_FP32)),
                               ort_variant("ORT fp16 (all fp16)", arts["fp16-keep-none"], feed, want, t, "fp16")],
                      args.runs)
    rows += run_group("fusions", [fp32("fusions"),
                                  ort_variant("ORT fp32 (SkipLN+FastGelu)", arts["fp32-no_attention"], feed, want, t,
                                              "fusions", "base graph of the weight-only recipes"),
                                  ort_variant("ORT fp32 (plain ONNX)", arts["fp32-none"], feed, want, t, "fusions",
                                              "standard ops only; ORT fuses at load")], args.runs)
    for group, method in (("int8-dynamic", "dynamic"), ("int8-weight-only", "nbits")):
        variants = [fp32(group)]
        for name in args.recipes:
            r = Q.recipe(name)
            if r.method == method:
                variants.append(ort_variant(f"ORT {r.name}", arts[f"int8:{r.name}"], feed, want, t, group,
                                            f"{r.precision}; fp32: {', '.join(r.keep_fp32)}"))
        if len(variants) > 1:
            rows += run_group(group, variants, args.runs)
    # torch through the groups' fp32 baselines
    base = {r.group: r.median for r in rows if r.name == FP32}
    torch_row = next(r for r in rows if r.kind == "torch")
    for r in rows:
        r.vs_torch = torch_row.median / base["torch"] * base[r.group] / r.median

    # llama.cpp clip (ViT + resampler) vs our vision+resampler graph
    clip = [ort_variant("ORT vision+resampler fp32", arts["vision-resampler"], feed, want_emb, t, "clip",
                        output="image_embeds")]
    if info["gguf"].get("mmproj"):
        clip.append(clip_variant(info["gguf"]["mmproj"], info["gguf"]["llm"], image, want_emb, t))
    elif not args.no_clip:
        print(f"  llama.cpp clip not run: {info['gguf'].get('error')}", flush=True)
    clip_rows = run_group("clip", clip, args.runs)
    for r in clip_rows:
        r.vs_fp32 = clip_rows[0].median / r.median

    sens: list[dict] = []
    for srec in info["sensitivity"]:
        sess = OV.ort_session(srec["path"], t)
        got = sess.run(None, feed)[0].reshape(-1, v.hidden_size)
        cmin, cmean = cos_stats(got, want)
        sens.append({"quantized_role": srec["quantized_role"], "cos_min": cmin, "cos_mean": cmean})
        print(f"  only {srec['quantized_role']:<9} cos min {cmin:.6f} mean {cmean:.6f}", flush=True)
        del sess

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "python": platform.python_version(), "onnxruntime": _version("onnxruntime"),
                    "torch": _version("torch")},
        "model": {"vision": f"SigLIP-400M dims: hidden {v.hidden_size}, {v.num_hidden_layers} layers, "
                            f"{v.num_attention_heads} heads, MLP {v.intermediate_size}",
                  "resampler_width": ckpt.resampler.embed_dim, "weights": "random (synth scaling), seed 0"},
        "slice": {"grid": [h, w], "pixels": [14 * h, 14 * w], "patches": h * w},
        "runs": args.runs,
        "ort_fusions": info["fusions"],
        "export_seconds": {k: a["seconds"] for k, a in info["arts"].items()},
        "rows": [dict(asdict(r), median=r.median) for r in rows],
        "clip": [dict(asdict(r), median=r.median) for r in clip_rows],
        "sensitivity_dyn_per_tensor": sens,
        "default_recipe": Q.DEFAULT_RECIPE,
        "fp16_keep_fp32": list(OV.FP16_KEEP_FP32),
        "seconds_total": time.perf_counter() - t_start,
    }
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def clip_variant(mmproj: str, llm: str, image, want_emb: np.ndarray, threads: int) -> Variant:
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip

    holder = {}

    def open_():
        holder["clip"] = LlamaCppClip(mmproj, llm, threads=threads)
        return lambda: holder["clip"].encode(image)[0]

    def close():
        if "clip" in holder:
            holder.pop("clip").close()
    return Variant(Row("llama.cpp clip, F16 mmproj", "llama.cpp", "image_embeds", "clip", size_mb=size_mb([mmproj]),
                       note="mtmd_encode_chunk incl. its own preprocessing; ViT + resampler"), open_, want_emb, close)


def coreml_sizes(args) -> dict:
    """Convert the bench tower to every CoreML variant (spec only: no prediction on Linux); sizes and times."""
    from minicpmv_edge.export import coreml_vision as CV
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.quantize import coreml_compress as CC

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-vision-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(make_bench_checkpoint(work / f"ckpt-{args.layers}l", args.layers))
    t0 = time.perf_counter()
    base = CV.export_vision_coreml(ckpt, work / "coreml", "bench")
    arts = [base, *CC.compress_vision_coreml(ckpt, work / "coreml", "bench", variants=tuple(CC.VARIANTS), base=base)]
    rows = []
    for a in arts:
        info = CV.inspect_mlpackage(a.path)
        rows.append({"variant": a.precision, "target": a.target, "size_mb": info["size"] / 1e6,
                     "seconds": a.seconds, "weights": info["weights"], "ops": info["ops"]})
        print(f"  {a.precision:<5} {a.target}  {info['size'] / 1e6:8.1f} MB  {a.seconds:6.1f} s  {info['weights']}",
              flush=True)
    v = ckpt.vision
    res = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "model": f"SigLIP-400M dims: hidden {v.hidden_size}, {v.num_hidden_layers} layers",
           "machine": {"cpu": cpu_name(), "coremltools": _version("coremltools")},
           "rows": rows, "seconds_total": time.perf_counter() - t0}
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return res


def coreml_markdown(res: dict) -> str:
    out = [f"# CoreML vision packages ({res['model']})", "",
           f"`{res['command']}` — coremltools {res['machine']['coremltools']} on Linux: conversion and spec only "
           "(CoreML cannot predict on Linux; accuracy is measured on macOS by tests/test_vision_export.py). "
           "Sizes include the fp16 70x70 position table (4900 x 1152 x 2 B = 11.3 MB), which no variant compresses.", "",
           "| variant | target | size MB | seconds | linear/conv weights stored as |", "|---|---|---:|---:|---|"]
    for r in res["rows"]:
        w = "; ".join(f"{k} x{n}" for k, n in r["weights"].items())
        out.append(f"| {r['variant']} | {r['target']} | {r['size_mb']:.1f} | {r['seconds']:.0f} | {w} |")
    return "\n".join(out + [""])


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "n/a"


# ---------------------------------------------------------------------------------------------- report

def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# Vision tower: one {res['slice']['pixels'][0]}x{res['slice']['pixels'][1]} slice "
           f"({res['slice']['patches']} patches)", "",
           f"`{res['command']}` — {res['model']['vision']}; {res['model']['weights']}; "
           f"{m['cpu']}, {m['threads']} threads; onnxruntime {m['onnxruntime']}, torch {m['torch']}. "
           f"Each group is timed round-robin (run i of every variant before run i+1 of any), median of "
           f"{res['runs']} runs after a warm-up; `× fp32` is the speed-up over ORT fp32 timed in the same group, "
           f"`× torch` goes through the groups' fp32 baselines. Cosine: per patch row against torch fp32.", "",
           "**Random weights are harsher on int8 than trained ones: these cosines are a floor, not a promise.**",
           "", "| group | variant | median s | × fp32 | × torch | cos min | cos mean | size MB | notes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        name = r["name"] + (" **[default int8]**" if r["name"] == f"ORT {res['default_recipe']}" else "")
        out.append(f"| {r['group']} | {name} | {_fmt(r['median'], '.3f')} | {_fmt(r['vs_fp32'], '.2f')} | "
                   f"{_fmt(r['vs_torch'], '.2f')} | {_fmt(r['cos_min'], '.7f')} | {_fmt(r['cos_mean'], '.7f')} | "
                   f"{_fmt(r['size_mb'], '.1f')} | {r['note']} |")
    clip = res["clip"]
    if clip:
        out += ["", "ViT + resampler (llama.cpp's clip runs both; cosine over the 64 output rows vs torch):", "",
                "| variant | median s | × ORT vision+resampler | cos min | cos mean | size MB | notes |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for r in clip:
            out.append(f"| {r['name']} | {_fmt(r['median'], '.3f')} | {_fmt(r['vs_fp32'], '.2f')} | "
                       f"{_fmt(r['cos_min'], '.7f')} | {_fmt(r['cos_mean'], '.7f')} | {_fmt(r['size_mb'], '.1f')} | "
                       f"{r['note']} |")
    f = res["ort_fusions"]
    out += ["", f"Fused ops in the shipped fp32 file: {f['in_file']}. onnxruntime at load (extended level) on that "
                f"file: {f['ort_at_load_on_fused']}; on the plain graph: {f['ort_at_load_on_plain']}."]
    if res["sensitivity_dyn_per_tensor"]:
        out += ["", "Per-tensor dynamic int8, one role quantized at a time (which Linear layers hurt):", "",
                "| quantized role | cos min | cos mean |", "|---|---:|---:|"]
        out += [f"| {s['quantized_role']} | {s['cos_min']:.6f} | {s['cos_mean']:.6f} |"
                for s in res["sensitivity_dyn_per_tensor"]]
    out += ["", f"Default int8 recipe: `{res['default_recipe']}`. Total bench time {res['seconds_total']:.0f} s.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from minicpmv_edge.quantize.onnx_int8 import RECIPES

    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--layers", type=int, default=27, help="ViT blocks (27 = SigLIP-400M)")
    ap.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.lower().split("x")), default=(32, 32),
                    help="slice grid HxW in patches (default 32x32 = 448x448 pixels)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated int8 recipes")
    ap.add_argument("--no-clip", action="store_true", help="skip llama.cpp's clip")
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--work", help="work folder (kept; reuses its checkpoint)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="where bench_vision.{json,md} go")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--coreml-only", action="store_true",
                    help="only convert the CoreML variants and record their sizes (bench_vision_coreml.{json,md})")
    args = ap.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    if args.coreml_only:
        res = coreml_sizes(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_vision_coreml.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "bench_vision_coreml.md").write_text(coreml_markdown(res))
        print("\n" + coreml_markdown(res))
        return 0
    if args.prepare_only:
        prepare(args, Path(args.work))
        return 0
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_vision.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (args.out / "bench_vision.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
