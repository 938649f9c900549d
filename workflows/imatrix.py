"""`minicpmv-edge imatrix`: an importance matrix from image+text prompts, computed on a bundle or on a checkpoint
(exported first), for llama.cpp's quantizer (`export --imatrix`). The statistic and file format live in
quantize/imatrix.py; this is the command around them."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import MAX_SLICE_NUMS
from minicpmv_edge.quantize import imatrix
from minicpmv_edge.quantize.imatrix import (DEFAULT_ANSWER_TOKENS, calibration_set, compute_imatrix,
                                            session_from_files)


def _open_source(source: Path, workdir: Path, llm: str | None, threads: int) -> Callable[[Any], Any]:
    """A bundle (manifest.json) is loaded as is (the highest-precision LLM it holds unless `llm` says); a
    checkpoint is first exported (F16 GGUF, fp32 vision, f32 resampler) into `workdir`."""
    from minicpmv_edge.runtime.bundle import MANIFEST, load
    if (source / MANIFEST).is_file():
        from minicpmv_edge.runtime.bundle import Bundle, FileKind
        b = Bundle.open(source)
        choice = llm or b.choose(FileKind.LLM_GGUF, None, ("F32", "F16", "BF16", "Q8_0", "Q6_K")).precision
        return lambda cb: load(b, llm=choice, threads=threads, eval_callback=cb)
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.workflows.pipeline import export_checkpoint
    ckpt = Checkpoint.open(source)
    t = llm or "F16"
    res = export_checkpoint(ckpt.root, workdir, llm_types=[t], mmproj_types=[], vision_types=["fp32"],
                            resampler_types=["f32"], name="calib", threads=threads, bundle=False)
    return lambda cb: session_from_files(ckpt, res.path(FileKind.LLM_GGUF, t), res.path(FileKind.VISION_ONNX, "fp32"),
                                         res.path(FileKind.RESAMPLER_WEIGHTS, "f32"), threads, eval_callback=cb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge imatrix", description=imatrix.__doc__.strip().splitlines()[0])
    ap.add_argument("source", type=Path, help="a checkpoint folder or an exported bundle")
    ap.add_argument("--calib", action="append", default=None,
                    help="'builtin' (generated images with text, charts and shapes) or a folder of images with "
                         "optional <stem>.txt questions; repeat to combine (default: builtin)")
    ap.add_argument("--out", type=Path, required=True, help="imatrix GGUF to write")
    ap.add_argument("--text-only", action="store_true",
                    help="calibrate on text alone (captions stand in for the images), like llama-imatrix")
    ap.add_argument("--llm", help="LLM precision to calibrate on (bundle: default its highest; checkpoint: F16)")
    ap.add_argument("--max-slices", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                    help="greedy answer tokens appended to each prompt (0: prompts only)")
    ap.add_argument("--include-output", action="store_true", help="also collect for output.weight")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    if not 1 <= args.max_slices <= MAX_SLICE_NUMS or not 0 <= args.answer_tokens <= 1024:
        raise MiniCPMVEdgeError(f"--max-slices must be 1..{MAX_SLICE_NUMS} and --answer-tokens 0..1024")
    if not args.source.is_dir():
        raise MiniCPMVEdgeError(f"{args.source}: not a checkpoint or bundle folder")
    calib = args.calib or ["builtin"]
    prompts = calibration_set(calib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".imatrix-") as work:
        opener = _open_source(args.source, Path(work), args.llm, args.threads)
        im = compute_imatrix(opener, prompts, text_only=args.text_only, datasets=calib, max_slices=args.max_slices,
                             answer_tokens=args.answer_tokens, include_output=args.include_output, progress=True)
    im.save(args.out)
    tokens = max(int(c.sum()) for c in im.counts.values())
    print(f"wrote {args.out}: {len(im.sums)} weights, {im.chunk_count} prompts, {tokens} positions, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
