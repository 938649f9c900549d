"""`minicpmv-edge export`: one checkpoint in, one self-describing bundle out.

    minicpmv-edge export CHECKPOINT --out DIR --llm F16,Q4_K_M,Q8_0 --mmproj F16 --vision fp32,fp16,int8

Writes into DIR:
- `<name>-<TYPE>.gguf` for each LLM type (float types directly, quantized ones through llama.cpp's quantizer
  from the F16 file) and `mmproj-<name>-<type>.gguf` for llama.cpp's clip;
- `vision-<name>-<precision>.onnx` (the SigLIP tower for one slice of any size) and, with --coreml, the
  `.mlpackage` variants;
- `resampler-<name>-<dtype>.mvr`, the resampler weights the native kernels load;
- MiniCPM-V 4.6 (no resampler): `vision-merger-16x-/4x-<name>-<precision>.onnx` instead of the vision graph and
  resampler weights (tower + window merger + merger, one graph per downsample mode; with --coreml, the same graphs
  as `vision-merger-16x-/4x-<name>-<variant>.mlpackage`), and the mmproj of llama.cpp's `minicpmv4_6` projector
  in the checkpoint's default mode;
- `manifest.json`, describing all of it (see export/bundle.py).
Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.export.bundle import BundleFileSpec

from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.export.gguf_llm import FLOAT_TYPES, write_llm_gguf
from minicpmv_edge.export.gguf_mmproj import MMPROJ_TYPES, write_mmproj_gguf
from minicpmv_edge.export.onnx_vision import onnx_file_name
from minicpmv_edge.runtime.bundle import ONNX_VISION_KINDS, FileKind, file_name

DEFAULT_LLM_TYPES = ("F16", "Q4_K_M", "Q8_0")


@dataclass
class ExportResult:
    # every file written, as the manifest lists it (kind, precision, how it was made)
    files: list[BundleFileSpec] = field(default_factory=list)
    manifest: Path | None = None
    notes: list[str] = field(default_factory=list)           # e.g. K-quant fallbacks on tiny models
    seconds: dict[str, float] = field(default_factory=dict)  # by step, for the printout

    def path(self, kind: str, precision: str | None = None) -> Path:
        """The written file of `kind` (and `precision`, if given)."""
        for f in self.files:
            if f.kind == kind and (precision is None or f.precision == precision):
                return Path(f.path)
        raise MiniCPMVEdgeError(f"no {kind} file {precision or ''} was exported")


def parse_types(text: str, known: tuple[str, ...] | None, what: str) -> list[str]:
    types = [t.strip().upper() for t in text.split(",") if t.strip()]
    if not types:
        raise MiniCPMVEdgeError(f"--{what}: no types given")
    if known is not None:
        bad = [t for t in types if t not in known]
        if bad:
            raise MiniCPMVEdgeError(f"--{what}: unknown type(s) {', '.join(bad)} (choose from {', '.join(known)})")
    return list(dict.fromkeys(types))


def _progress(desc: str, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, llm_types: list[str] | None = None,
                      mmproj_types: list[str] | None = None, vision_types: list[str] | None = None,
                      resampler_types: list[str] | None = None, coreml_types: list[str] | None = None,
                      fused_vision: bool = False, name: str | None = None, threads: int | None = None,
                      progress: bool = False, bundle: bool = True, imatrix: str | Path | None = None
                      ) -> ExportResult:
    """`fused_vision` also writes the vision+resampler ONNX graph (fp32) that the runtime can run instead of
    vision + resampler weights. `imatrix`: an importance-matrix GGUF (`minicpmv-edge imatrix`) for every
    quantized LLM type."""
    from minicpmv_edge.quantize.gguf_ladder import LADDER, RECIPES, llama_ftype, quantize_gguf

    from minicpmv_edge.export.onnx_vision import open_vision_checkpoint

    ckpt = Checkpoint.open(checkpoint)
    vision_ckpt = open_vision_checkpoint(ckpt)      # 4.6: the merger reader of the same folder
    has_resampler = ckpt.config.resampler is not None
    if fused_vision and not has_resampler:
        raise MiniCPMVEdgeError(f"--fused-vision: MiniCPM-V {ckpt.version} has no resampler (its merger graphs "
                                "already end in LLM embeddings)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or ckpt.root.name
    llm_types = list(DEFAULT_LLM_TYPES if llm_types is None else llm_types)
    mmproj_types = ["F16"] if mmproj_types is None else list(mmproj_types)
    for t in llm_types:
        if t not in FLOAT_TYPES:
            llama_ftype(t)   # raises for unknown quant types before any work starts
    if coreml_types:
        from minicpmv_edge.quantize.coreml_compress import variant_name
        coreml_types = [variant_name(t) for t in coreml_types]   # likewise for CoreML variants
    result = ExportResult()
    if imatrix is not None:
        from minicpmv_edge.quantize.imatrix import Imatrix
        imatrix = Imatrix.load(imatrix)   # read and checked once, before any work starts

    # Float files first; quantized ones are made from F16 (written even if not asked for, then removed).
    quant = [t for t in llm_types if t not in FLOAT_TYPES]
    floats = [t for t in llm_types if t in FLOAT_TYPES]
    temp_f16 = bool(quant) and "F16" not in floats
    if temp_f16:
        floats.append("F16")
    llm_bytes = sum(ckpt.tensors[n].numel for n in ckpt.names("llm"))
    llm_paths: dict[str, Path] = {}
    for t in floats:
        t0 = time.perf_counter()
        bar = _progress(f"LLM {t}", llm_bytes * (4 if t == "F32" else 2), progress)
        try:
            llm_paths[t] = write_llm_gguf(ckpt, out_dir / file_name(FileKind.LLM_GGUF, name, t), t,
                                          on_tensor=(lambda _n, nb: bar.update(nb)) if bar else None)
        finally:   # also on an error, so the error line does not land on the progress bar's line
            if bar:
                bar.close()
        result.seconds[f"llm {t}"] = time.perf_counter() - t0
    for t in quant:
        t0 = time.perf_counter()
        if progress:
            print(f"quantizing {name} -> {t}", flush=True)
        report = quantize_gguf(llm_paths["F16"], out_dir / file_name(FileKind.LLM_GGUF, name, t), t, nthread=threads,
                               imatrix=imatrix)
        llm_paths[t] = report.path
        result.seconds[f"llm {t}"] = time.perf_counter() - t0
        table = ", ".join(f"{k}×{v}" for k, v in sorted(report.tensor_types.items()))
        result.notes.append(f"{t}: tensor types {table}" + (f"; importance matrix for {report.imatrix_entries} "
                                                             f"weights" if report.imatrix_entries else ""))
        if report.fallback_types:
            fell = ", ".join(f"{k}×{v}" for k, v in sorted(report.fallback_types.items()))
            result.notes.append(f"{t}: llama.cpp used {fell} for tensors whose rows are not a multiple of "
                                f"the 256-value K-quant block")
    if temp_f16:
        llm_paths.pop("F16").unlink()
    result.files += [BundleFileSpec(p, FileKind.LLM_GGUF, t) for t, p in llm_paths.items()]

    for t in mmproj_types:
        t0 = time.perf_counter()
        path = write_mmproj_gguf(vision_ckpt, out_dir / file_name(FileKind.MMPROJ_GGUF, name, t), t)
        result.files.append(BundleFileSpec(path, FileKind.MMPROJ_GGUF, t))
        result.seconds[f"mmproj {t}"] = time.perf_counter() - t0
    vision_types = [] if vision_types is None else list(vision_types)
    float_vision = [t for t in vision_types if t in ("fp32", "fp16")]
    int8 = [t for t in vision_types if t not in ("fp32", "fp16")]
    float_arts = []
    if float_vision or fused_vision:
        from minicpmv_edge.export.onnx_vision import export_onnx, export_vision_onnx
        t0 = time.perf_counter()
        if float_vision:
            float_arts = export_vision_onnx(vision_ckpt, out_dir, name, precisions=float_vision)
        if fused_vision:
            float_arts.append(export_onnx(ckpt, out_dir / onnx_file_name(name, "fp32", "vision_resampler"),
                                          graph="vision_resampler"))
        result.files += [a.record() for a in float_arts]
        result.seconds["vision"] = time.perf_counter() - t0
    if int8:
        from minicpmv_edge.export.onnx_vision import vision_graphs
        from minicpmv_edge.quantize.onnx_int8 import quantize_vision_onnx
        t0 = time.perf_counter()
        # the fp32 graphs just written are the int8 recipes' bases: no second torch export of the tower
        graphs = vision_graphs(vision_ckpt)
        reuse = [a for a in float_arts if a.graph in graphs]
        result.files += [a.record() for a in quantize_vision_onnx(vision_ckpt, out_dir, name, recipes=int8,
                                                                  graphs=graphs, reuse=reuse)]
        result.seconds["vision int8"] = time.perf_counter() - t0
    if coreml_types:
        t0 = time.perf_counter()
        result.files += [a.record() for a in _export_coreml(vision_ckpt, out_dir, name, coreml_types)]
        result.seconds["coreml"] = time.perf_counter() - t0
    if resampler_types and not has_resampler:
        result.notes.append(f"MiniCPM-V {ckpt.version} has no resampler: no resampler weights written")
        resampler_types = []
    for dtype in ([] if resampler_types is None else resampler_types):
        from minicpmv_edge.export.resampler_weights import write_resampler_weights
        path = write_resampler_weights(ckpt, out_dir / file_name(FileKind.RESAMPLER_WEIGHTS, name, dtype), dtype)
        result.files.append(BundleFileSpec(path, FileKind.RESAMPLER_WEIGHTS, dtype))
    unknown = [t for t in quant if t not in LADDER and t not in RECIPES]
    if unknown:
        result.notes.append(f"types outside the tested ladder: {', '.join(unknown)}")
    if bundle:
        from minicpmv_edge.export.bundle import measure_vision_parity, write_manifest
        vision_files = [f.path for f in result.files if f.kind in ONNX_VISION_KINDS]
        t0 = time.perf_counter()
        parity = measure_vision_parity(vision_files, ckpt) if vision_files else {}
        result.seconds["parity"] = time.perf_counter() - t0
        result.manifest = write_manifest(out_dir, ckpt, result.files, parity, name=name)
    return result


def _export_coreml(ckpt, out_dir: Path, name: str, types: list[str]) -> list:
    """`vision-<name>-<variant>.mlpackage` (4.6: one per downsample mode's merger graph) for fp16 and the
    compressed variants (converted once per graph, then compressed from the fp16 base when it is asked for too).
    `ckpt`: the vision checkpoint (`open_vision_checkpoint`); `types` are already `variant_name`s."""
    from minicpmv_edge.export.coreml_vision import export_vision_coreml
    from minicpmv_edge.export.onnx_vision import vision_graphs
    from minicpmv_edge.quantize.coreml_compress import compress_vision_coreml

    names = list(dict.fromkeys(types))
    variants = [v for v in names if v != "fp16"]
    arts = []
    for graph in vision_graphs(ckpt):
        base = export_vision_coreml(ckpt, out_dir, name, graph=graph) if "fp16" in names else None
        arts += [base] if base else []
        if variants:
            arts += compress_vision_coreml(ckpt, out_dir, name, graph=graph, variants=variants, base=base)
    return arts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge export", description=__doc__.strip().splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="Hugging Face MiniCPM-V checkpoint folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--llm", default=",".join(DEFAULT_LLM_TYPES),
                    help="comma-separated LLM GGUF types: F32, F16, BF16, llama.cpp quant types "
                         "(Q2_K, Q3_K_M, Q4_0, Q4_K_S, Q4_K_M, IQ4_NL, Q5_K_M, Q6_K, Q8_0, ...) and mixed recipes "
                         "(Q2_K_HI, Q3_K_HI, Q4_K_HI); 'none' to skip")
    ap.add_argument("--mmproj", default="F16", help=f"mmproj types ({', '.join(MMPROJ_TYPES)}) or 'none'")
    ap.add_argument("--vision", default="fp32,fp16",
                    help="vision ONNX precisions: fp32, fp16, int8 (or an int8 recipe name); 'none' to skip")
    ap.add_argument("--resampler", default="f32", help="resampler weight types for the native kernels: f32, f16")
    ap.add_argument("--coreml", default="none",
                    help="CoreML vision packages (.mlpackage, for iOS/macOS): fp16, w8 (int8), p4 (4-bit palette), "
                         "w4 (int4, iOS18); 'none' to skip (the default: conversion takes minutes)")
    ap.add_argument("--fused-vision", action="store_true",
                    help="also write the vision+resampler ONNX graph (fp32), which the runtime can run instead of "
                         "the vision graph + resampler weights")
    ap.add_argument("--name", help="file name stem (default: the checkpoint folder's name)")
    ap.add_argument("--threads", type=int, help="quantizer threads (default: all cores)")
    ap.add_argument("--imatrix", type=Path,
                    help="importance matrix GGUF (from `minicpmv-edge imatrix`) for the quantized LLM types")
    args = ap.parse_args(argv)
    llm = [] if args.llm.lower() == "none" else parse_types(args.llm, None, "llm")
    mmproj = [] if args.mmproj.lower() == "none" else parse_types(args.mmproj, MMPROJ_TYPES, "mmproj")
    vision = [] if args.vision.lower() == "none" else [t.strip().lower() for t in args.vision.split(",") if t.strip()]
    resampler = [] if args.resampler.lower() == "none" else parse_types(args.resampler, ("F32", "F16"), "resampler")
    coreml = [] if args.coreml.lower() == "none" else [t.strip().lower() for t in args.coreml.split(",") if t.strip()]
    t0 = time.perf_counter()
    res = export_checkpoint(args.checkpoint, args.out, llm_types=llm, mmproj_types=mmproj, vision_types=vision,
                            resampler_types=[r.lower() for r in resampler], coreml_types=coreml,
                            fused_vision=args.fused_vision, name=args.name,
                            threads=args.threads, imatrix=args.imatrix,
                            progress=True)
    for f in res.files:
        path = Path(f.path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        print(f"  {f.kind:<22} {f.precision or '':<8} {path}  ({size / 2**20:.1f} MiB)")
    if res.manifest:
        print(f"  manifest {res.manifest}")
    for step, seconds in res.seconds.items():
        print(f"  {step}: {seconds:.1f} s")
    for note in res.notes:
        print(f"  note: {note}")
    print(f"exported {args.checkpoint} to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
