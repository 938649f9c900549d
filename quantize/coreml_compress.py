"""Weight compression of the CoreML vision package (coremltools.optimize.coreml), as named variants.

    arts = compress_vision_coreml(ckpt, "bundle/", "X", variants=("w8", "p4"))   # converts the fp16 base itself
    arts = compress_vision_coreml(ckpt46, "bundle/", "X", graph="vision_merger_4x")  # 4.6: one call per mode
    art = compress_coreml("vision-X-fp16.mlpackage", "vision-X-w8.mlpackage", "w8")

Variants (weights of every linear and conv op; the position-embedding table (gather) and tensors under 2048
values stay fp16; compute stays fp16):

| variant | what | stored as | needs |
|---|---|---|---|
| `w8` | int8 linear, symmetric, per output channel | `constexpr_affine_dequantize` (iOS17) | - |
| `p4` | 4-bit palette (k-means, 16 fp16 values per tensor) | `constexpr_lut_to_dense`, uint4 | scikit-learn |
| `w4` | int4 linear, symmetric, blocks of 16 input values | `constexpr_blockwise_shift_scale` | iOS18 target |

The fp16 base is converted with the variant's target: w4 (per-block) only exists from iOS18 on
(coremltools raises otherwise), the others keep iOS17. A weight whose input axis is not a multiple of the block
(the patch conv: 3*14*14 = 588 inputs) stays fp16. Accuracy cannot be measured on Linux (no CoreML
prediction); on macOS `export.coreml_vision.parity_coreml` measures it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minicpmv_edge.errors import MiniCPMVEdgeError, MissingExtraError
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.export.coreml_vision import (CoremlArtifact, convert_coreml, coreml_file_name, coremltools_module,
                                                metadata_grids, save_mlpackage)
from minicpmv_edge.export.merger_tower import MergerCheckpoint
from minicpmv_edge.export.onnx_vision import GRAPH_METADATA_KEY, open_vision_checkpoint, vision_graphs

_TARGET_ORDER = ("iOS16", "iOS17", "iOS18")

__all__ = ["CoremlVariant", "VARIANTS", "ALIASES", "variant_name", "compress_model", "compress_coreml",
           "compress_vision_coreml"]


@dataclass(frozen=True)
class CoremlVariant:
    name: str
    method: str                 # "linear" | "palettize"
    dtype: str | None = None    # linear: "int8" | "int4"
    granularity: str = "per_tensor"
    block_size: int | None = None
    nbits: int | None = None    # palettize
    target: str = "iOS17"
    stored_op: str = ""         # the constexpr op the weights end up behind (what spec checks look for)
    stored_dtype: str = ""

    def describe(self) -> dict:
        return {"variant": self.name, "method": self.method, "dtype": self.dtype, "nbits": self.nbits,
                "granularity": self.granularity, "block_size": self.block_size, "compute": "fp16",
                "tool": "coremltools.optimize.coreml", "not_compressed": "position embedding (gather), "
                "tensors < 2048 values"}


VARIANTS: dict[str, CoremlVariant] = {v.name: v for v in (
    CoremlVariant("w8", "linear", dtype="int8", granularity="per_channel",
                  stored_op="constexpr_affine_dequantize", stored_dtype="int8"),
    CoremlVariant("p4", "palettize", nbits=4, stored_op="constexpr_lut_to_dense", stored_dtype="uint4"),
    # block 16, not 32: SigLIP's MLP width 4304 = 16 x 269 is not a multiple of 32, and coremltools leaves a
    # weight whose input axis does not split into whole blocks in fp16 (block 32 kept all 27 fc2 in fp16: 437 MB)
    CoremlVariant("w4", "linear", dtype="int4", granularity="per_block", block_size=16, target="iOS18",
                  stored_op="constexpr_blockwise_shift_scale", stored_dtype="int4"),
)}


# what users call them (the mission's fp16/int8/int4)
ALIASES = {"int8": "w8", "int4": "w4"}


def variant_name(name: str) -> str:
    """`fp16` or a VARIANTS key, from a name or alias; a clear error for anything else."""
    name = ALIASES.get(name, name)
    if name != "fp16" and name not in VARIANTS:
        raise MiniCPMVEdgeError(f"unknown CoreML variant {name!r} (choose from fp16, {', '.join(VARIANTS)}; "
                                f"aliases {', '.join(f'{a}={v}' for a, v in ALIASES.items())})")
    return name


def _variant(name: str) -> CoremlVariant:
    name = variant_name(name)
    if name == "fp16":
        raise MiniCPMVEdgeError("fp16 is the unconverted base package (export_vision_coreml), not a compression")
    return VARIANTS[name]


def compress_model(ml, variant: str | CoremlVariant):
    """Compressed copy of an in-memory ML program."""
    coremltools_module()
    import coremltools.optimize.coreml as cto

    v = variant if isinstance(variant, CoremlVariant) else _variant(variant)
    out = _compress(cto, ml, v)
    for key, value in dict(ml.user_defined_metadata).items():       # keep our metadata (shapes, grids, target)
        if key.startswith("minicpmv_edge."):
            out.user_defined_metadata[key] = value
    out.user_defined_metadata["minicpmv_edge.compression"] = v.name
    out.short_description = ml.short_description
    return out


def _compress(cto, ml, v: CoremlVariant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if v.method == "linear":
            kw = {"block_size": v.block_size} if v.block_size else {}
            op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=v.dtype, granularity=v.granularity,
                                                 **kw)
            cfg = cto.OptimizationConfig(global_config=op_cfg, op_type_configs={"gather": None})
            return cto.linear_quantize_weights(ml, cfg)
        if v.method == "palettize":
            try:
                import sklearn  # noqa: F401  (coremltools' k-means needs it)
            except ImportError:
                raise MissingExtraError("export", "scikit-learn") from None
            cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=v.nbits),
                                         op_type_configs={"gather": None})
            return cto.palettize_weights(ml, cfg)
    raise MiniCPMVEdgeError(f"variant {v.name}: unknown method {v.method!r}")


def compress_coreml(src: str | Path, out_path: str | Path, variant: str) -> CoremlArtifact:
    """Compress a saved fp16 .mlpackage into `out_path`. Its deployment target must allow the variant."""
    ct = coremltools_module()
    v = _variant(variant)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.models.MLModel(str(src), skip_model_load=True)
    meta = dict(ml.get_spec().description.metadata.userDefined)
    ml = compress_model(ml, v)
    out = save_mlpackage(ml, out_path)
    return CoremlArtifact(out, v.name, meta.get("minicpmv_edge.target", v.target),
                          meta.get("minicpmv_edge.shapes", "range"), metadata_grids(meta), v.describe(),
                          time.perf_counter() - t0, meta.get(GRAPH_METADATA_KEY, "vision"))


def compress_vision_coreml(ckpt: Checkpoint | MergerCheckpoint | str | Path, out_dir: str | Path,
                           name: str | None = None, *, graph: str | None = None,
                           variants: Sequence[str] = ("w8", "p4"), shapes: str = "range",
                           grids: Sequence[tuple[int, int]] | None = None,
                           base: CoremlArtifact | None = None) -> list[CoremlArtifact]:
    """Write `vision-<name>-<variant>.mlpackage` (4.6: `vision-merger-<mode>-...` of `graph`) for each variant,
    converting the fp16 base once per deployment target the variants need (w4 needs iOS18; enumerated shapes
    force iOS18 for all). `base`: an fp16 package of the same graph already written by `export_vision_coreml`;
    variants whose target it meets are compressed from it instead of converting again (conversion of the 400M
    tower takes minutes)."""
    ckpt = open_vision_checkpoint(ckpt)
    name = name or ckpt.root.name
    graph = graph or vision_graphs(ckpt)[0]
    if base is not None and base.graph != graph:
        raise MiniCPMVEdgeError(f"{base.path}: holds graph {base.graph!r}, not {graph!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vs = [_variant(v) for v in dict.fromkeys(variants)]
    converted: dict[str, object] = {}                 # target -> in-memory fp16 ML program
    out = []
    for v in vs:
        target = "iOS18" if shapes == "enumerated" else v.target
        t0 = time.perf_counter()
        path = out_dir / coreml_file_name(name, v.name, graph)
        if base is not None and base.shapes == shapes and _TARGET_ORDER.index(base.target) >= _TARGET_ORDER.index(target):
            art = compress_coreml(base.path, path, v.name)
            art.grids = base.grids
            out.append(art)
            continue
        if target not in converted:
            converted[target] = convert_coreml(ckpt, graph=graph, shapes=shapes, grids=grids, target=target)
        ml = converted[target]
        save_mlpackage(compress_model(ml, v), path)
        out.append(CoremlArtifact(path, v.name, target, shapes, metadata_grids(dict(ml.user_defined_metadata)),
                                  v.describe(), time.perf_counter() - t0, graph))
    return out
