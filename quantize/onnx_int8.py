"""int8 / int4 variants of the ONNX vision graph (onnxruntime quantization), as named recipes.

    art = quantize_onnx("vision-X-fp32-linear.onnx", "vision-X-int8.onnx", DEFAULT_RECIPE)
    arts = quantize_vision_onnx(ckpt, "bundle/", "X", recipes=["int8"])      # exports its own base graph

Two families, both on the Linear layers of the tower (the MatMuls whose B input is a weight):

* `dynamic` - `quantize_dynamic`: int8 weights (per tensor or per output channel), activations quantized
  to uint8 at run time per tensor (DynamicQuantizeLinear + MatMulInteger, or QAttention for the fused
  attention). Fast, but the per-tensor activation scale is where the error comes from. Weights are 7-bit
  (`reduce_range`, see `_DYNAMIC_REDUCE_RANGE`): full 8-bit weights overflow ORT's AVX2 int8 GEMM.
* `nbits` - `MatMulNBitsQuantizer`: weight-only, symmetric, per block of `block_size` input values, 8 or 4
  bits; `accuracy_level=4` lets the kernel quantize activations to int8 per block (int8 dot products),
  0 keeps fp32 compute (dequantize on the fly).

A recipe also names the roles kept in fp32 (`keep_fp32`): `qkv`, `attn_out`, `fc1`, `fc2` (tower
Linears, found by weight shape and producer, see `matmul_roles`) and `resampler` (every MatMul after the
tower in the vision+resampler graph; kept fp32 by every recipe: one layer, and its output goes straight
into the LLM) and `merger` (MiniCPM-V 4.6 graphs: a weight MatMul of a non-tower shape; kept fp32 by every
recipe for the same reason. The 4.6 merger MLPs export as Gemm nodes, which no recipe quantizes anyway; the
role stops such a MatMul from being read as the start of a resampler, which would leave later tower layers fp32).
Activation x activation MatMuls (q k^T, p v) are never quantized.

Which recipe ships as `DEFAULT_RECIPE` and why is decided by `bench/bench_vision.py` (its table lives in
bench/results/); random weights are harsher on int8 than trained ones, so those cosines are a floor.
"""
from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.export.onnx_vision import (OnnxArtifact, export_onnx, graph_of, onnx_file_name, op_counts,
                                              open_vision_checkpoint, save_onnx)
from minicpmv_edge.runtime.memory import return_freed_heap

__all__ = ["Int8Recipe", "RECIPES", "DEFAULT_RECIPE", "ROLES", "matmul_roles", "quantize_onnx",
           "quantize_vision_onnx", "recipe", "int8_file_name"]

ROLES = ("qkv", "attn_out", "fc1", "fc2", "resampler", "merger")
_QUANT_OPS = ("QAttention", "Attention", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
              "DynamicQuantizeLinear", "SkipLayerNormalization", "FastGelu")


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    method: str                          # "dynamic" | "nbits"
    base: str                            # fusion level of the fp32 graph it quantizes ("full" | "no_attention")
    per_channel: bool = False            # dynamic: per output channel weight scales
    bits: int | None = None              # nbits: 8 or 4
    block_size: int | None = None        # nbits: input values per scale
    accuracy_level: int | None = None    # nbits: 4 = int8 activations per block, 0 = fp32 compute
    keep_fp32: tuple[str, ...] = ("resampler", "merger")
    note: str = ""

    @property
    def precision(self) -> str:
        """What the manifest records as the file's precision."""
        if self.method == "nbits":
            return f"int{self.bits}-weight-only(block {self.block_size}, accuracy_level {self.accuracy_level})"
        return (f"int8-dynamic({'per-channel' if self.per_channel else 'per-tensor'}"
                f"{', 7-bit weights' if _DYNAMIC_REDUCE_RANGE else ''})")


# quantize_dynamic's int8 x uint8 MatMulInteger / QAttention run on MLAS's u8s8 GEMM. On x86 without VNNI
# (AVX2, AVX-512F) it multiplies with vpmaddubsw, which adds each pair of u8*s8 products into a saturating
# int16: 255*127*2 = 64770 clips at 32767. Per-channel weights put +-127 in every output column, so this
# clipping cost the tiny 4.5 checkpoint's export parity 0.9995 -> 0.988 (first QAttention alone: 0.957) on
# AMD EPYC Zen 3 (onnxruntime 1.32.0). 7-bit weights (|w| <= 64: 255*64*2 = 32640) cannot saturate on any CPU,
# as onnxruntime's quantization docs advise for AVX2/AVX-512 without VNNI; a bundle does not know its CPU.
_DYNAMIC_REDUCE_RANGE = True

RECIPES: dict[str, Int8Recipe] = {r.name: r for r in (
    Int8Recipe("dyn-pt", "dynamic", "full", note="quantize_dynamic, per-tensor, QAttention for q/k/v"),
    Int8Recipe("dyn-pc", "dynamic", "full", per_channel=True, note="quantize_dynamic, per-channel weights"),
    Int8Recipe("dyn-pt-keep-fc2", "dynamic", "full", keep_fp32=("resampler", "merger", "fc2"),
               note="per-tensor, MLP down-projection (post-GELU input) left fp32"),
    Int8Recipe("dyn-pt-keep-qkv", "dynamic", "full", keep_fp32=("resampler", "merger", "qkv"),
               note="per-tensor, fused attention left fp32"),
    Int8Recipe("w8-b32", "nbits", "no_attention", bits=8, block_size=32, accuracy_level=4),
    Int8Recipe("w8-b128", "nbits", "no_attention", bits=8, block_size=128, accuracy_level=4),
    Int8Recipe("w8-b128-fp32acc", "nbits", "no_attention", bits=8, block_size=128, accuracy_level=0),
    Int8Recipe("w4-b32", "nbits", "no_attention", bits=4, block_size=32, accuracy_level=4),
    Int8Recipe("w4-b128", "nbits", "no_attention", bits=4, block_size=128, accuracy_level=4),
)}
# The shipped int8 variant (file `vision-<name>-int8.onnx`), chosen from bench/results/bench_vision.md
# (SigLIP-400M dims, random weights, 448x448 slice, 2 threads): per-channel dynamic int8 ran 2.09x the ORT fp32
# speed at cosine >= 0.99956 per patch row; the runner-up w8-b128 (weight-only, int8 activations per block of
# 128) ran 1.50x at >= 0.99972. dyn-pc also quantizes the shipped fused fp32 graph (no second export). Real
# SigLIP weights have activation outliers that per-tensor activation scales handle worse than blocks: re-measure
# both with real weights (`bench/bench_vision.py` on a real checkpoint) before trusting this choice.
# That table predates 7-bit weights (_DYNAMIC_REDUCE_RANGE). Re-measured on 2 SigLIP-400M layers (32x32 slice,
# 2 threads, same machine, timed round-robin, two runs): 8-bit 1.69-1.70x fp32 at cosine 0.99976, 7-bit 1.67-1.81x
# at 0.99962 (same kernels), uint8 weights (exact u8u8 kernel) 1.57-1.58x at 0.99983.
DEFAULT_RECIPE = "dyn-pc"


def recipe(name: str | Int8Recipe) -> Int8Recipe:
    if isinstance(name, Int8Recipe):
        return name
    if name == "int8":
        name = DEFAULT_RECIPE
    if name not in RECIPES:
        raise MiniCPMVEdgeError(f"unknown int8 recipe {name!r} (choose from int8 (= {DEFAULT_RECIPE}), "
                                f"{', '.join(RECIPES)})")
    return RECIPES[name]


# =============================================================================================
# Which MatMul is which
# =============================================================================================

def _tower_dims(model) -> tuple[int, int]:
    """(hidden C, MLP width I) read from the graph: C from the patch-embedding Conv, I from fc1 weights."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    conv = [n for n in model.graph.node if n.op_type == "Conv"]
    if len(conv) != 1 or conv[0].input[1] not in inits:
        raise MiniCPMVEdgeError("not a vision tower graph: expected one Conv (the patch embedding)")
    c = inits[conv[0].input[1]][0]
    widths = Counter(inits[n.input[1]][1] for n in model.graph.node
                     if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2
                     and inits[n.input[1]][0] == c and inits[n.input[1]][1] not in (c, 3 * c))
    if not widths:
        raise MiniCPMVEdgeError("not a vision tower graph: no MLP up-projection MatMul found")
    return c, widths.most_common(1)[0][0]          # fc1 occurs once per layer; resampler kv_proj once


def matmul_roles(model) -> dict[str, str]:
    """Node name -> role (see ROLES) for every weight MatMul / fused Attention of a vision graph."""
    c, i = _tower_dims(model)
    # 4.6: merger MLPs sit between tower layers, so "not a tower shape" marks a merger MatMul, not the end
    merger_graph = graph_of(model).startswith("vision_merger")
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    roles: dict[str, str] = {}
    past_tower = False
    for n in model.graph.node:                      # exported graphs are topologically sorted
        if n.op_type == "Attention":
            roles[n.name] = "resampler" if past_tower else "qkv"
            continue
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        shape = inits[n.input[1]]
        src = producer.get(n.input[0])
        from_norm = src is not None and src.op_type in ("LayerNormalization", "SkipLayerNormalization")
        if not past_tower and shape == (c, i):
            roles[n.name] = "fc1"
        elif not past_tower and shape == (i, c):
            roles[n.name] = "fc2"
        elif not past_tower and shape == (c, c) and from_norm:
            roles[n.name] = "qkv"
        elif not past_tower and shape == (c, c):
            roles[n.name] = "attn_out"
        elif merger_graph:
            roles[n.name] = "merger"
        else:                                       # first MatMul of another shape: the resampler begins
            past_tower = True
            roles[n.name] = "resampler"
    return roles


# =============================================================================================
# Quantizing
# =============================================================================================



def quantize_onnx(src: str | Path, out_path: str | Path, recipe_name: str | Int8Recipe = DEFAULT_RECIPE, *,
                  external: bool | None = None) -> OnnxArtifact:
    """Quantize an fp32 vision graph with a recipe. `src` must have the recipe's fusion level
    (`export_onnx(..., fuse=r.base)`): the nbits recipes need q/k/v as separate MatMuls."""
    import onnx

    r = recipe(recipe_name)
    t0 = time.perf_counter()
    # the roles need shapes only: the weights (GBs for a 4.6 tower + merger) stay on disk until a quantizer
    # reads them, so at most one copy of the fp32 graph is in memory at a time
    model = onnx.load(str(src), load_external_data=False)
    has_attention = any(n.op_type == "Attention" for n in model.graph.node)
    if r.method == "nbits" and has_attention:
        raise MiniCPMVEdgeError(f"{src}: recipe {r.name} quantizes q/k/v MatMuls, but this graph has them packed in "
                                f"fused Attention nodes; export it with fuse='{r.base}'")
    roles = matmul_roles(model)
    keep = sorted(n for n, role in roles.items() if role in r.keep_fp32)
    include = sorted(n for n, role in roles.items() if role not in r.keep_fp32)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    out_path = Path(out_path)
    if r.method == "dynamic":
        del model                                   # quantize_dynamic loads its own copy
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            tmp_out = Path(tmp) / out_path.name
            quantize_dynamic(src, tmp_out, weight_type=QuantType.QInt8, per_channel=r.per_channel,
                             reduce_range=_DYNAMIC_REDUCE_RANGE,
                             nodes_to_quantize=include, op_types_to_quantize=["MatMul", "Attention"],
                             extra_options={"MatMulConstBOnly": True}, use_external_data_format=True)
            quantized = onnx.load(str(tmp_out))
    elif r.method == "nbits":
        from onnx.external_data_helper import load_external_data_for_model
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        load_external_data_for_model(model, str(Path(src).parent))
        q = MatMulNBitsQuantizer(model, bits=r.bits, block_size=r.block_size, is_symmetric=True,
                                 accuracy_level=r.accuracy_level, nodes_to_exclude=keep,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        quantized = q.model.model
    else:
        raise MiniCPMVEdgeError(f"recipe {r.name}: unknown method {r.method!r}")
    counts = op_counts(quantized)
    files = save_onnx(quantized, out_path, external=external)
    kernels = {k: v for k, v in counts.items() if k in _QUANT_OPS}
    quant = {"recipe": r.name, "method": r.method, "description": r.precision, "kept_fp32": list(r.keep_fp32),
             "base_fusion": r.base, "tool": "onnxruntime.quantization", "note": r.note}
    return OnnxArtifact(out_path, graph_of(quantized), "int8" if r.name == DEFAULT_RECIPE else r.name, files,
                        counts, kernels, tuple(r.keep_fp32), time.perf_counter() - t0, quant)


def int8_file_name(name: str, recipe_name: str, graph: str = "vision") -> str:
    """The default recipe is `...-int8.onnx`; others carry their recipe name."""
    r = recipe(recipe_name)
    return onnx_file_name(name, "int8" if r.name == DEFAULT_RECIPE else r.name, graph)


def quantize_vision_onnx(ckpt: Checkpoint | str | Path, out_dir: str | Path, name: str | None = None, *,
                         recipes: Sequence[str] = ("int8",), graphs: Iterable[str] = ("vision",),
                         reuse: Iterable[OnnxArtifact] = ()) -> list[OnnxArtifact]:
    """Quantized vision files for a checkpoint (`vision-<name>-int8.onnx` for the default recipe). The fp32
    base graph each recipe needs is taken from `reuse` (fp32 artifacts of `export_vision_onnx`, matched by
    graph and fusion level) or exported into a temporary folder inside `out_dir`."""
    ckpt = open_vision_checkpoint(ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or ckpt.root.name
    rs = [recipe(r) for r in dict.fromkeys(recipes)]
    given = {(a.graph, a.fusion): a.path for a in reuse if a.precision == "fp32" and a.path.exists()}
    out: list[OnnxArtifact] = []
    tmp = Path(tempfile.mkdtemp(prefix=".int8-base-", dir=out_dir))
    try:
        for graph in graphs:
            for r in rs:
                if (graph, r.base) not in given:
                    given[(graph, r.base)] = export_onnx(ckpt, tmp / f"{graph}-{r.base}.onnx", graph=graph,
                                                         fuse=r.base).path
                out.append(quantize_onnx(given[(graph, r.base)], out_dir / int8_file_name(name, r.name, graph), r))
                # the quantizer's protobuf copies are garbage now; glibc keeps freed heap unless asked, and a 4.6
                # export runs two graphs of 2 GB each: without this its second one started at 17 GB RSS
                gc.collect()
                return_freed_heap()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
