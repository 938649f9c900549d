"""Export MiniCPM-V's SigLIP vision tower (and optionally the resampler) to ONNX for onnxruntime.

    arts = export_vision_onnx("MiniCPM-V-4_5", "bundle/", "MiniCPM-V-4_5", precisions=("fp32", "fp16"))

One graph encodes ONE slice of any size (docs/model.md §3.4: batch 1, no padding mask, like llama.cpp):

    inputs   pixel_values  float32 [1, 3, 14*h, 14*w]   a normalised slice (runtime.preprocess `Slice.pixels`)
             position_ids  int64   [h, w]               `position_bucket_ids(h, w, 70).reshape(h, w)`
    output   patch_features float32 [1, h*w, C]         after post_layernorm, patches row-major
    (+resampler) image_embeds float32 [1, Q, D]         one slice's resampler block, ready for the LLM

MiniCPM-V 4.6 has no resampler: its graphs ("vision_merger_16x" / "vision_merger_4x", export/merger_tower.py)
run the tower with its window merger and the final merger and end in `image_embeds` [1, h*w/16 (or /4), D];
their position ids are 4.6's nearest ids (`position_nearest_ids`) and h, w must be multiples of 4 (2).

The bucketed NaViT position ids are an input computed by the runtime (numpy, bit-exact with HF's float32
`torch.arange`/`bucketize`, see runtime/preprocess.py), so the graph holds no arange quirks; its shape
[h, w] also carries the patch grid, from which the resampler graph builds its 2D sincos keys in-graph
(integer coordinates, no interpolation, docs/model.md §4.1). h and w are dynamic; any grid works, the 70x70
learned table is indexed only through the ids.

The graph is exported with torch.export (opset 18, attention written with plain MatMul/Softmax so every
ONNX runtime can read it) and then, unless `fuse=False`, rewritten by onnxruntime's transformer optimizer
(`model_type="clip"`) into ORT CPU kernels: com.microsoft `Attention` (packed QKV), `SkipLayerNormalization`
and `FastGelu` (`FUSED_OPS` lists what a file holds; `ort_session_fusions` what ORT adds at load).
fp16 files are converted from the fp32 graph with the ops in `FP16_KEEP_FP32` left in fp32 and float32
inputs/outputs (the resampler's sincos keys are computed in float64 in-graph, so conversion leaves them alone). Files above 2 GB of weights are written with external data (`<file>.data`). Every file is
written into a temporary folder and renamed into place when complete.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime.bundle import (FILE_KINDS, ONNX_VISION_KINDS, Parity, ParityGrid, file_name,
                                          graph_of_outputs, kind_of_graph)
from minicpmv_edge.runtime.vision import VisionIO

from .checkpoint import Checkpoint
from .merger_tower import MergerCheckpoint, MergerSliceModel, is_merger_checkpoint
from .reference import Resampler, VisionTower

__all__ = ["IO", "GRAPHS", "PRECISIONS", "FUSED_OPS", "FUSIONS", "FP16_KEEP_FP32", "PARITY_GRIDS",
           "EXPORT_PARITY_GRIDS", "EXTERNAL_DATA_THRESHOLD", "OnnxArtifact", "SliceVisionModel", "export_onnx",
           "convert_fp16", "export_vision_onnx", "save_onnx", "onnx_file_name", "slice_feed", "random_slice",
           "parity", "op_counts", "ort_session", "ort_session_fusions", "cosine_rows", "reference_modules",
           "reference_output", "MERGER_GRAPHS", "GRAPH_METADATA_KEY", "merger_parity_grids", "graph_of",
           "open_vision_checkpoint", "vision_graphs", "build_slice_module"]


# Input/output names of every vision graph (ONNX and CoreML): the runtime owns them (runtime/vision.py).
IO = VisionIO


# graph name -> output it ends in
GRAPHS = {FILE_KINDS[k].graph: IO(FILE_KINDS[k].graph_output) for k in ONNX_VISION_KINDS}
MERGER_GRAPHS = {"16x": "vision_merger_16x", "4x": "vision_merger_4x"}   # 4.6, per downsample mode
PRECISIONS = ("fp32", "fp16")
OPSET = 18
# ORT CPU fused kernels we look for (com.microsoft domain, plus the ONNX LayerNormalization op).
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "FastGelu",
             "BiasGelu", "Gelu", "FusedMatMul")
# Ops kept in fp32 inside fp16 graphs. Measured on SigLIP-400M dims (bench/bench_vision.py, group "fp16"): on
# x86 it costs nothing (5.39 s vs 5.38 s all-fp16) and random weights show no accuracy need either (cosine
# 0.9999991 all-fp16). Kept anyway: trained SigLIP has large activation outliers, and a LayerNorm variance or a
# softmax over 4900 patches is where fp16 overflows or loses them; random weights cannot show that.
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "Softmax")
# Grids (h, w) in patches that parity checks cover: the 448x448 slice, the slicer's usual cells, extremes, and
# 25x49, where HF's float32 bucketing differs from floor(70 i / n) (the ids input must carry it).
PARITY_GRIDS = ((32, 32), (28, 40), (16, 70), (40, 28), (25, 49), (46, 22), (5, 3), (1, 1))
EXPORT_PARITY_GRIDS = ((32, 32), (28, 40), (16, 70))
# Above this many bytes of weights a model is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 2 ** 26


def onnx_file_name(name: str, precision: str, graph: str = "vision") -> str:
    """`vision-<name>-<precision>.onnx` / `vision-resampler-<name>-<precision>.onnx` (runtime/bundle.py's table)."""
    return file_name(kind_of_graph(graph), name, precision)


def merger_parity_grids(side: int, grids: Sequence[tuple[int, int]] = PARITY_GRIDS) -> tuple[tuple[int, int], ...]:
    """PARITY_GRIDS moved to the nearest multiples of `side` (at least `side`): the same shapes as far as a
    4.6 graph, which needs whole 2x2 (x2) merge blocks, allows."""
    snap = lambda n: max(side, round(n / side) * side)
    return tuple((snap(h), snap(w)) for h, w in grids)


# =============================================================================================
# Export-friendly modules (same weights as the reference, no shape-derived Python ints)
# =============================================================================================

class _Attention(nn.Module):
    """Self-attention of one slice without a mask; heads split with unflatten (no Python ints from shapes)."""

    def __init__(self, ref: nn.Module):
        super().__init__()
        self.ref = ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # x: [1, N, C]
        a = self.ref
        split = lambda t: t.unflatten(-1, (a.heads, a.head_dim)).transpose(1, 2)  # -> [1, H, N, hd]
        q, k, v = split(a.q_proj(x)), split(a.k_proj(x)), split(a.v_proj(x))
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * a.scale, dim=-1)   # [1, H, N, N]
        return a.out_proj(torch.matmul(probs, v).transpose(1, 2).flatten(2))          # [1, N, C]


class SliceResampler(nn.Module):
    """The 2D resampler for one slice (no padding): features [1, N, kv] + grid (h, w) -> [1, Q, D]."""

    def __init__(self, ref: Resampler):
        super().__init__()
        self.ref = ref
        d = ref.cfg.embed_dim
        e = d // 4                                                          # sincos_1d(D/2) -> D/4 frequencies
        omega = np.arange(e, dtype=np.float32)
        omega /= np.float32(e)
        omega = (1.0 / 10000 ** omega).astype(np.float32)                   # as reference._sincos_1d (float32)
        # float64 in the graph: fp16 conversion leaves it alone (sin of coordinates up to ~1000 needs more than
        # fp16), and it differs from the float32 reference by < 4e-6 (float32 rounding of x * omega).
        self.register_buffer("omega", torch.from_numpy(omega.astype(np.float64)), persistent=False)

    def _sincos(self, h, w) -> torch.Tensor:
        """[h*w, D] float32: x (width) half first [sin, cos], then y half; integer patch coordinates."""
        xs = torch.arange(w, dtype=torch.float64)[:, None] * self.omega     # [w, D/4]
        ys = torch.arange(h, dtype=torch.float64)[:, None] * self.omega     # [h, D/4]
        ex = torch.cat([xs.sin(), xs.cos()], dim=-1).float()                # [w, D/2]
        ey = torch.cat([ys.sin(), ys.cos()], dim=-1).float()                # [h, D/2]
        grid = torch.cat([ex[None].expand(h, -1, -1), ey[:, None].expand(-1, w, -1)], dim=-1)  # [h, w, D]
        return grid.flatten(0, 1)                                           # [h*w, D]

    def forward(self, feats: torch.Tensor, h, w) -> torch.Tensor:           # feats: [1, N, kv]
        r = self.ref
        att = r.attn
        x = r.ln_kv(r.kv_proj(feats))                                       # [1, N, D]
        k_in = x + self._sincos(h, w)[None]                                 # keys carry the position
        wq, wk, wv = att.in_proj_weight.chunk(3)
        bq, bk, bv = att.in_proj_bias.chunk(3)
        split = lambda t: t.unflatten(-1, (att.heads, att.head_dim)).transpose(1, 2)  # [1, H, L, hd]
        q = split(F.linear(r.ln_q(r.query)[None], wq, bq))                  # [1, H, Q, hd]
        k = split(F.linear(k_in, wk, bk))                                   # [1, H, N, hd]
        v = split(F.linear(x, wv, bv))
        probs = torch.softmax(torch.matmul(q * att.head_dim ** -0.5, k.transpose(2, 3)), dim=-1)  # [1, H, Q, N]
        out = att.out_proj(torch.matmul(probs, v).transpose(1, 2).flatten(2))  # [1, Q, D]
        return r.ln_post(out) @ r.proj                                      # [1, Q, D]


class SliceVisionModel(nn.Module):
    """One slice through the reference tower's weights (and optionally the resampler):

    (pixel_values [1, 3, 14h, 14w], position_ids [h, w] int64) -> patch_features [1, h*w, C] or image_embeds
    [1, Q, D]. Equal to `VisionTower.encode([pixels])[0]` (and `Resampler(...)`) for a single slice.
    """

    def __init__(self, tower: VisionTower, resampler: Resampler | None = None):
        super().__init__()
        self.tower = tower
        self.attn = nn.ModuleList(_Attention(layer.self_attn) for layer in tower.encoder.layers)
        self.resampler = SliceResampler(resampler) if resampler is not None else None

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        t = self.tower
        emb = t.embeddings
        x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)   # [1, N, C] row-major patches
        x = x + emb.position_embedding(position_ids.flatten())[None]        # [1, N, C]
        for layer, attn in zip(t.encoder.layers, self.attn):
            x = x + attn(layer.layer_norm1(x))
            x = x + layer.mlp(layer.layer_norm2(x))
        x = t.post_layernorm(x)
        if self.resampler is None:
            return x
        h, w = position_ids.shape
        return self.resampler(x, h, w)


# =============================================================================================
# Writing
# =============================================================================================

@dataclass
class OnnxArtifact:
    """One written ONNX model."""
    path: Path
    graph: str                                   # "vision" | "vision_resampler"
    precision: str                               # "fp32" | "fp16" | "int8" (the default recipe) | a recipe name
    files: list[Path]                            # the .onnx and its external data file, if any
    op_counts: dict[str, int] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)   # FUSED_OPS (or quantized kernels) present in the file
    fp32_ops: tuple[str, ...] = ()               # op types (fp16) or Linear roles (int8) kept fp32
    seconds: float = 0.0
    quant: dict[str, Any] = field(default_factory=dict)   # how it was made from fp32 (recorded in the manifest)
    fusion: str = "full"                         # FUSIONS level of the graph (fp32 exports)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def record(self):
        """How the manifest lists this file (export/bundle.py)."""
        from .bundle import BundleFileSpec, onnx_io
        about = dict(graph=self.graph, format="onnx", fused_ops=self.fused, io=onnx_io(self.graph),
                     **(dict(quant=self.quant) if self.quant else {}))
        return BundleFileSpec(self.path, kind_of_graph(self.graph), self.precision, about, self.files[1:])


def _initializer_bytes(model) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * 4
    return total


def save_onnx(model, path: str | Path, *, external: bool | None = None) -> list[Path]:
    """Write `model` to `path` (temporary folder + rename). External data (`<name>.data`) when the weights
    exceed EXTERNAL_DATA_THRESHOLD or `external=True`. Returns the written files (.onnx first).

    With external data onnx moves the weights out of the in-memory proto; do not reuse `model` afterwards."""
    import onnx

    path = Path(path)
    if external is None:
        external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    staging = path.parent / f".{path.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if external:
            onnx.save_model(model, staging / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, staging / path.name)
        written = [path]
        stale = path.parent / data_name
        if external:
            os.replace(staging / data_name, stale)            # data first: the .onnx must never dangle
            written.append(stale)
        elif stale.exists():
            stale.unlink()
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def op_counts(model) -> dict[str, int]:
    """Node count per op type (main graph)."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def _fused(counts: dict[str, int]) -> dict[str, int]:
    return {op: counts[op] for op in FUSED_OPS if counts.get(op)}


def open_vision_checkpoint(source: Checkpoint | MergerCheckpoint | str | Path) -> Checkpoint | MergerCheckpoint:
    """A checkpoint object for a folder: `MergerCheckpoint` for 4.6 (merger) folders, else `Checkpoint`. A
    `Checkpoint` without a resampler (4.6, read by the full reader) becomes the merger reader of its folder."""
    if isinstance(source, Checkpoint) and source.config.resampler is None:
        return MergerCheckpoint.open(source.root)
    if isinstance(source, (Checkpoint, MergerCheckpoint)):
        return source
    return MergerCheckpoint.open(source) if is_merger_checkpoint(source) else Checkpoint.open(source)


def vision_graphs(ckpt: Checkpoint | MergerCheckpoint, with_resampler: bool = False,
                  downsample_modes: Iterable[str] | None = None) -> list[str]:
    """The graphs a checkpoint exports: "vision" (+ "vision_resampler"), or one merger graph per 4.6 mode."""
    if isinstance(ckpt, MergerCheckpoint):
        modes = list(downsample_modes) if downsample_modes is not None else [m for m, _ in ckpt.facts.downsample_modes]
        bad = [m for m in modes if m not in MERGER_GRAPHS]
        if bad:
            raise MiniCPMVEdgeError(f"unknown downsample mode(s) {', '.join(bad)} (choose from {', '.join(MERGER_GRAPHS)})")
        return [MERGER_GRAPHS[m] for m in modes]
    return ["vision", "vision_resampler"] if with_resampler else ["vision"]


def _merger_mode(graph: str) -> str:
    return next(m for m, g in MERGER_GRAPHS.items() if g == graph)


def build_slice_module(ckpt: Checkpoint | MergerCheckpoint, graph: str) -> SliceVisionModel | MergerSliceModel:
    """The torch module of one slice for `graph`, the one every exporter traces (ONNX here, CoreML too)."""
    if graph not in GRAPHS:
        raise MiniCPMVEdgeError(f"unknown vision graph {graph!r} (choose from {', '.join(GRAPHS)})")
    if (graph in MERGER_GRAPHS.values()) != isinstance(ckpt, MergerCheckpoint):
        raise MiniCPMVEdgeError(f"{ckpt.root}: graph {graph!r} does not fit this checkpoint "
                                f"(its graphs: {', '.join(vision_graphs(ckpt, True))})")
    if isinstance(ckpt, MergerCheckpoint):
        return MergerSliceModel(ckpt, _merger_mode(graph))
    tower = VisionTower.from_checkpoint(ckpt)
    resampler = Resampler.from_checkpoint(ckpt) if graph == "vision_resampler" else None
    return SliceVisionModel(tower, resampler).eval()


def _module_cfg(module: SliceVisionModel | MergerSliceModel):
    return module.cfg if isinstance(module, MergerSliceModel) else module.tower.cfg


def _torch_export(module: SliceVisionModel | MergerSliceModel, graph: str, example: tuple[int, int] = (32, 40)):
    """torch.export -> ONNX ModelProto (opset 18) with dynamic h, w (multiples of the merge side for 4.6)."""
    import warnings

    p = _module_cfg(module).patch_size
    side = module.side if isinstance(module, MergerSliceModel) else 1
    h, w = example
    px = torch.zeros(1, 3, p * h, p * w)
    ids = torch.zeros(h, w, dtype=torch.int64)
    dh = torch.export.Dim("h", min=1, max=4096 // side)
    dw = torch.export.Dim("w", min=1, max=4096 // side)
    ph, pw = (dh, dw) if side == 1 else (side * dh, side * dw)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, (px, ids), dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            input_names=[IO.PIXEL_VALUES.value, IO.POSITION_IDS.value], output_names=[GRAPHS[graph].value],
            dynamic_shapes={"pixel_values": {2: p * ph, 3: p * pw}, "position_ids": {0: ph, 1: pw}})
    model = prog.model_proto
    _name_dims(model)
    return model


GRAPH_METADATA_KEY = "minicpmv_edge.graph"   # ONNX metadata_props entry naming the GRAPHS entry of a file


def _stamp_graph(model, graph: str) -> None:
    kept = [p for p in model.metadata_props if p.key != GRAPH_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = GRAPH_METADATA_KEY, graph


def _name_dims(model) -> None:
    """Readable symbolic dims: h, w on the inputs, n_patches / n_queries on the output."""
    def set_dims(value, names):
        for d, name in zip(value.type.tensor_type.shape.dim, names):
            if name is not None and not d.HasField("dim_value"):
                d.dim_param = name
    for vi in model.graph.input:
        if vi.name == IO.PIXEL_VALUES.value:
            set_dims(vi, (None, None, "height", "width"))
        elif vi.name == IO.POSITION_IDS.value:
            set_dims(vi, ("h", "w"))
    for vi in model.graph.output:
        if vi.name == IO.PATCH_FEATURES.value:
            set_dims(vi, (None, "n_patches", None))
        elif vi.name == IO.IMAGE_EMBEDS.value:
            set_dims(vi, (None, "n_tokens", None))


FUSIONS = ("full", "no_attention", "none")


def _fuse(model, num_heads: int, hidden: int, level: str = "full"):
    """onnxruntime transformer optimizer, CLIP patterns: Attention (packed QKV), SkipLayerNormalization,
    FastGelu. `level="no_attention"` leaves q/k/v as separate MatMuls (what weight quantizers can rewrite)."""
    import logging

    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if level == "none":
        return model
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("clip")
    options.enable_attention = level == "full"
    opt = optimize_model(model, model_type="clip", num_heads=num_heads, hidden_size=hidden, opt_level=0,
                         optimization_options=options)
    fused = opt.model
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return fused


def _fusion_level(fuse: bool | str) -> str:
    level = {True: "full", False: "none"}.get(fuse, fuse) if isinstance(fuse, bool) else fuse
    if level not in FUSIONS:
        raise MiniCPMVEdgeError(f"unknown fusion level {fuse!r} (choose from {', '.join(FUSIONS)})")
    return level


def export_onnx(source: Checkpoint | MergerCheckpoint | str | Path | SliceVisionModel, out_path: str | Path, *,
                graph: str = "vision", fuse: bool | str = True, external: bool | None = None) -> OnnxArtifact:
    """Export the fp32 graph of one slice (`graph` one of GRAPHS) to `out_path`.

    source: a checkpoint (folder, `Checkpoint` or 4.6 `MergerCheckpoint`), or a ready `SliceVisionModel`
    (bench: random weights).
    fuse: True / "full" (ORT CPU kernels incl. Attention), "no_attention" (the base int8 recipes quantize),
    False / "none" (standard ONNX ops only, for runtimes other than onnxruntime)."""
    t0 = time.perf_counter()
    level = _fusion_level(fuse)
    if isinstance(source, SliceVisionModel):
        module = source.eval()
        if (module.resampler is not None) != (graph == "vision_resampler"):
            raise MiniCPMVEdgeError(f"graph {graph!r} does not match the module (resampler: "
                                    f"{module.resampler is not None})")
    else:
        module = build_slice_module(open_vision_checkpoint(source), graph)
    cfg = _module_cfg(module)
    model = _torch_export(module, graph)
    model = _fuse(model, cfg.num_attention_heads, cfg.hidden_size, level)
    _stamp_graph(model, graph)
    counts = op_counts(model)
    files = save_onnx(model, out_path, external=external)
    return OnnxArtifact(Path(out_path), graph, "fp32", files, counts, _fused(counts),
                        seconds=time.perf_counter() - t0, fusion=level)


def convert_fp16(src: str | Path, out_path: str | Path, *, keep_fp32: Sequence[str] = FP16_KEEP_FP32,
                 external: bool | None = None) -> OnnxArtifact:
    """fp16 copy of an fp32 graph: weights and compute in fp16 except the op types in `keep_fp32`
    (Cast nodes around them); pixel_values / outputs stay float32, position_ids int64."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    t0 = time.perf_counter()
    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True, op_block_list=list(keep_fp32) or None)
    counts = op_counts(model.model)
    graph = graph_of(model.model)
    files = save_onnx(model.model, out_path, external=external)
    return OnnxArtifact(Path(out_path), graph, "fp16", files, counts, _fused(counts), tuple(keep_fp32),
                        seconds=time.perf_counter() - t0,
                        quant={"method": "fp16 conversion (onnxruntime.transformers float16)",
                               "kept_fp32_ops": list(keep_fp32), "io": "float32 pixels/outputs, int64 ids"})


def export_vision_onnx(ckpt: Checkpoint | MergerCheckpoint | str | Path, out_dir: str | Path, name: str | None = None,
                       *, precisions: Iterable[str] = PRECISIONS, with_resampler: bool = False,
                       fuse: bool | str = True, downsample_modes: Iterable[str] | None = None,
                       ) -> list[OnnxArtifact]:
    """Every ONNX vision file for a checkpoint: `vision-<name>-<precision>.onnx` for each precision, and
    `vision-resampler-<name>-<precision>.onnx` too when `with_resampler`; for a 4.6 checkpoint
    `vision-merger-<mode>-<name>-<precision>.onnx` per downsample mode (default: all). fp32 is always written
    first (fp16 is converted from it) but is removed again if not asked for."""
    ckpt = open_vision_checkpoint(ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or ckpt.root.name
    precisions = list(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise MiniCPMVEdgeError(f"unknown ONNX precision(s) {', '.join(bad)} (choose from {', '.join(PRECISIONS)}; "
                                f"int8 recipes live in minicpmv_edge.quantize.onnx_int8)")
    out: list[OnnxArtifact] = []
    for graph in vision_graphs(ckpt, with_resampler, downsample_modes):
        fp32 = export_onnx(ckpt, out_dir / onnx_file_name(name, "fp32", graph), graph=graph, fuse=fuse)
        made = {"fp32": fp32}
        if "fp16" in precisions:
            made["fp16"] = convert_fp16(fp32.path, out_dir / onnx_file_name(name, "fp16", graph))
        if "fp32" not in precisions:
            for f in fp32.files:
                f.unlink()
        out += [made[p] for p in precisions]
    return out


# =============================================================================================
# Running and measuring (tests, bench, bundle parity)
# =============================================================================================

def slice_feed(pixels: np.ndarray, patch_size: int = 14, num_patches_per_side: int = 70,
               position_rule: str = "bucketize") -> dict[str, np.ndarray]:
    """The ONNX input dict for one normalised slice [3, H, W] (e.g. `Slice.pixels`); `position_rule` is
    `facts.vision_position_ids`."""
    from minicpmv_edge.runtime.preprocess import vision_position_ids

    _, hh, ww = pixels.shape
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"slice {hh}x{ww} is not a multiple of the patch size {patch_size}")
    h, w = hh // patch_size, ww // patch_size
    ids = vision_position_ids(h, w, num_patches_per_side, position_rule).reshape(h, w)
    return {IO.PIXEL_VALUES.value: np.ascontiguousarray(pixels[None], dtype=np.float32),
            IO.POSITION_IDS.value: ids}


def random_slice(h: int, w: int, patch_size: int = 14, seed: int = 0) -> np.ndarray:
    """A normalised slice with pixel values uniform in [-1, 1] (what mean = std = 0.5 produces): [3, H, W]."""
    rng = np.random.default_rng([seed, h, w])
    return rng.uniform(-1.0, 1.0, size=(3, patch_size * h, patch_size * w)).astype(np.float32)


def cosine_rows(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (patch or query) of two [N, C] arrays, in float64."""
    g = np.asarray(got, dtype=np.float64).reshape(-1, want.shape[-1])
    r = np.asarray(want, dtype=np.float64).reshape(-1, want.shape[-1])
    den = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    return (g * r).sum(axis=1) / np.maximum(den, 1e-30)


def ort_session(path: str | Path, threads: int | None = None, level: str = "all"):
    """An onnxruntime CPU session (`level`: "basic", "extended", "all")."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_session_fusions(path: str | Path) -> dict[str, int]:
    """FUSED_OPS in the graph onnxruntime runs after its own (extended-level) optimisations at load time."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return _fused(op_counts(onnx.load(so.optimized_model_filepath)))


def reference_modules(ckpt: Checkpoint) -> tuple[VisionTower, Resampler]:
    return VisionTower.from_checkpoint(ckpt), Resampler.from_checkpoint(ckpt)


@torch.no_grad()
def reference_output(tower: VisionTower, resampler: Resampler | None, pixels: np.ndarray) -> np.ndarray:
    """The torch reference for one slice: [h*w, C] patch features, or [Q, D] when `resampler` is given."""
    px = torch.from_numpy(pixels)
    feats = tower.encode([px])[0]                                           # [h*w, C]
    if resampler is None:
        return feats.numpy()
    p = tower.cfg.patch_size
    return resampler([feats], [(px.shape[1] // p, px.shape[2] // p)])[0].numpy()   # [Q, D]


def graph_of(model) -> str:
    """The GRAPHS name of an ONNX ModelProto or onnxruntime session: its GRAPH_METADATA_KEY stamp, else (files
    written before the stamp existed) told apart by the output name."""
    if hasattr(model, "get_modelmeta"):
        stamp = model.get_modelmeta().custom_metadata_map.get(GRAPH_METADATA_KEY)
        outputs = model.get_outputs()
    else:
        stamp = next((p.value for p in model.metadata_props if p.key == GRAPH_METADATA_KEY), None)
        outputs = model.graph.output
    if stamp in GRAPHS:
        return stamp
    return graph_of_outputs(o.name for o in outputs)


def _merger_parity(model_path, ckpt: MergerCheckpoint, grids, seed: int, session) -> dict[str, Any]:
    sess = session if session is not None else ort_session(model_path)
    graph = graph_of(sess)
    if graph not in MERGER_GRAPHS.values():
        raise MiniCPMVEdgeError(f"{model_path}: not a 4.6 merger graph ({graph})")
    mode = _merger_mode(graph)
    ref = MergerSliceModel(ckpt, mode)
    cfg, rule = ckpt.vision, ckpt.facts.vision_position_ids
    rows = []
    for h, w in grids:
        px = random_slice(h, w, cfg.patch_size, seed)
        feed = slice_feed(px, cfg.patch_size, cfg.num_patches_per_side, rule)
        got = sess.run(None, feed)[0][0].astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(feed[IO.PIXEL_VALUES.value]), torch.from_numpy(feed[IO.POSITION_IDS.value]))
        want = want[0].numpy()
        cos = cosine_rows(got, want)
        rows.append(ParityGrid(grid=[h, w], min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
                               max_abs=float(np.abs(got - want).max())))
    return Parity(reference="torch (export/merger_tower.py)", graph=MERGER_GRAPHS[mode], grids=rows,
                  min_cosine=min(r.min_cosine for r in rows),
                  mean_cosine=float(np.mean([r.mean_cosine for r in rows]))).to_dict()


def parity(model_path: str | Path, ckpt: Checkpoint | MergerCheckpoint,
           grids: Sequence[tuple[int, int]] = EXPORT_PARITY_GRIDS, *, seed: int = 0, backend: Any = None,
           modules: tuple[VisionTower, Resampler] | None = None) -> dict[str, Any]:
    """Run an ONNX vision graph through the runtime's own backend (runtime/vision.py's OnnxVision, or `backend`)
    and the torch reference on random slices of each grid; per-row cosine.

    Returns {"reference": "torch", "grids": [{"grid": [h, w], "min_cosine", "mean_cosine", "max_abs"}...],
    "min_cosine": worst row over all grids, "mean_cosine"}. A 4.6 merger graph runs in its own ORT session (the
    runtime has no 4.6 vision backend yet); its grids are snapped to the merge side (`merger_parity_grids`)."""
    if isinstance(ckpt, MergerCheckpoint):
        return _merger_parity(model_path, ckpt, grids, seed, backend)
    from minicpmv_edge.runtime.preprocess import Slice
    from minicpmv_edge.runtime.vision import OnnxVision

    p, side = ckpt.vision.patch_size, ckpt.vision.num_patches_per_side
    vision = backend if backend is not None else OnnxVision(model_path, num_patches_per_side=side)
    graph = graph_of_outputs([vision.output])
    tower, resampler = modules if modules is not None else reference_modules(ckpt)
    rows = []
    for h, w in grids:
        px = random_slice(h, w, p, seed)
        got = vision.encode(Slice(px, (h, w), "source")).astype(np.float32)
        want = reference_output(tower, resampler if graph == "vision_resampler" else None, px)
        cos = cosine_rows(got, want)
        rows.append(ParityGrid(grid=[h, w], min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
                               max_abs=float(np.abs(got - want).max())))
    return Parity(reference="torch (export/reference.py)", graph=graph, grids=rows,
                  min_cosine=min(r.min_cosine for r in rows),
                  mean_cosine=float(np.mean([r.mean_cosine for r in rows]))).to_dict()
