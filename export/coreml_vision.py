"""Export MiniCPM-V's vision graph of one slice to a CoreML ML program (`.mlpackage`), fp16.

    art = export_vision_coreml(ckpt, "bundle/", "MiniCPM-V-4_5")               # vision-<name>-fp16.mlpackage
    art = export_vision_coreml(ckpt46, "bundle/", "X", graph="vision_merger_4x")  # vision-merger-4x-X-fp16.mlpackage
    info = inspect_mlpackage(art.path)                                            # spec summary, works on Linux

The model encodes one slice, with the same contract as the ONNX graph (export/onnx_vision.py), traced from the
same torch module (`onnx_vision.build_slice_module`):

    inputs   pixel_values   float32 [1, 3, 14h, 14w]
             position_ids   int32   [h, w]      (CoreML has no int64 inputs; ids < 4900 fit)
    output   patch_features float32 [1, h*w, C]  (fp16 inside)                       2.6 - 4.5: the SigLIP tower
             image_embeds   float32 [1, h*w/16, D] ("16x") or [1, h*w/4, D] ("4x")    4.6: tower + window merger
                                                                                       + merger, one graph per mode

Input shapes (`shapes=`):
* "range" (default, iOS17+): h, w each 1..MAX_SIDE patches, pixel sides 14..14*MAX_SIDE. Covers every grid the
  slicer can produce (up to ~1024 patches on one side for extreme aspect ratios). 4.6 graphs: h, w from the
  merge side (4 in "16x", 2 in "4x") up; a range cannot say "multiples of 4", so another size is refused at
  prediction time (as the ONNX graph refuses it), and the 4.6 slicer only makes multiples.
* "enumerated" (iOS18+: earlier targets allow only one enumerated input): the grids in `slicer_grids()` - all
  the slices LLaVA-UHD makes for images with aspect ratio within 1:4..4:1 (97 grids at 448/14/9 slices; for 4.6
  those of its slicer, whose sides are multiples of the merge side); the Neural Engine prefers enumerated
  shapes. Other grids are refused by CoreML at prediction time.

Converted from `torch.export(...).run_decompositions({})` (research toolchain §4: the traced path trips over
shape-derived ints in coremltools 9 + torch 2.13). coremltools runs on Linux for conversion and spec reading
only: prediction raises there, so `parity_coreml` works on macOS only. Weight compression (int8, 4-bit
palettes, int4 blocks) lives in quantize/coreml_compress.py.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime.bundle import COREML_VISION_KINDS, Parity, ParityGrid, file_name, kind_of_graph

from .checkpoint import Checkpoint
from .merger_tower import MergerCheckpoint, MergerSliceModel
from .onnx_vision import (EXPORT_PARITY_GRIDS, GRAPH_METADATA_KEY, GRAPHS, IO, MERGER_GRAPHS, SliceVisionModel,
                          build_slice_module, cosine_rows, merger_parity_grids, open_vision_checkpoint,
                          random_slice, reference_output, vision_graphs)
from .reference import VisionTower

__all__ = ["CoremlArtifact", "SHAPES", "MAX_SIDE", "slicer_grids", "convert_coreml", "save_mlpackage",
           "export_vision_coreml", "inspect_mlpackage", "parity_coreml", "coreml_file_name", "mlpackage_size",
           "merge_side", "slice_module", "metadata_grids"]

SHAPES = ("range", "enumerated")
MAX_SIDE = 1024                  # patches per side accepted by "range" models
DEFAULT_TARGET = "iOS17"


def coreml_file_name(name: str, precision: str, graph: str = "vision") -> str:
    """`vision-<name>-<precision>.mlpackage`, or `vision-merger-<mode>-<name>-<precision>.mlpackage` (4.6)."""
    return file_name(kind_of_graph(graph, COREML_VISION_KINDS), name, precision)


def merge_side(graph: str) -> int:
    """Patches per side a graph merges into one output row (4.6: 4 in "16x", 2 in "4x", from the facts); 1 for
    the 2.6 - 4.5 tower."""
    from minicpmv_edge.runtime.preprocess import downsample_side

    mode = next((m for m, g in MERGER_GRAPHS.items() if g == graph), None)
    return 1 if mode is None else downsample_side(mode)


def coremltools_module():
    """coremltools, with its Linux import noise (no libcoremlpython, untested torch version) silenced."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


def _target(ct, name: str):
    try:
        return getattr(ct.target, name)
    except AttributeError:
        raise MiniCPMVEdgeError(f"unknown CoreML deployment target {name!r} (e.g. iOS17, iOS18, macOS15)") from None


@lru_cache(maxsize=4)
def slicer_grids(max_aspect: float = 4.0, max_slice_nums: int = 9, slice_size: int = 448,
                 patch_size: int = 14, merge: int = 1) -> tuple[tuple[int, int], ...]:
    """Every slice grid (h, w) in patches that LLaVA-UHD slicing (runtime/preprocess.py) produces for images
    from 32 px to 8192 px a side with aspect ratio within 1:max_aspect..max_aspect:1 (3 % size steps),
    most frequent first. `merge` > 1: the 4.6 slicer of that merge side (`slice_image_v46`: sides multiples of
    patch_size * merge, its grid rule)."""
    from minicpmv_edge.runtime.preprocess import (find_best_resize, get_refine_size, get_sliced_grid,
                                                  get_sliced_grid_v46)

    sliced_grid = get_sliced_grid if merge == 1 else get_sliced_grid_v46
    align = patch_size * merge
    sizes = sorted({int(round(32 * 1.03 ** k)) for k in range(170)})
    seen: Counter = Counter()
    for width in sizes:
        for height in sizes:
            if not 1 / max_aspect <= width / height <= max_aspect:
                continue
            grid = sliced_grid((width, height), max_slice_nums, slice_size)
            if grid is None:
                w, h = find_best_resize((width, height), slice_size, align, allow_upscale=True)
                seen[(h // patch_size, w // patch_size)] += 1
                continue
            w, h = find_best_resize((width, height), slice_size, align)
            seen[(h // patch_size, w // patch_size)] += 1
            rw, rh = get_refine_size((width, height), grid, slice_size, align, True)
            seen[(int(rh / grid[1]) // patch_size, int(rw / grid[0]) // patch_size)] += 1
    return tuple(g for g, _ in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class CoremlArtifact:
    """One written .mlpackage."""
    path: Path
    precision: str                     # "fp16", "w8", "p4", "w4"
    target: str                        # minimum deployment target
    shapes: str                        # "range" | "enumerated"
    grids: tuple[tuple[int, int], ...] = ()
    quant: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    graph: str = "vision"              # onnx_vision.GRAPHS name: "vision", or 4.6's "vision_merger_16x" / "_4x"

    def record(self):
        """How the manifest lists this package (export/bundle.py)."""
        from .bundle import BundleFileSpec
        return BundleFileSpec(self.path, kind_of_graph(self.graph, COREML_VISION_KINDS), self.precision,
                              dict(format="mlpackage", graph=self.graph, quant=self.quant, io=self.io,
                                   minimum_deployment_target=self.target))

    @property
    def io(self) -> dict[str, Any]:
        m = merge_side(self.graph)
        if self.shapes == "enumerated":
            side = f"{len(self.grids)} enumerated grids"
        else:
            side = f"{m}..{MAX_SIDE}" + (f", multiples of {m}" if m > 1 else "")
        out = IO.PATCH_FEATURES if m == 1 else IO.IMAGE_EMBEDS
        return {"inputs": {IO.PIXEL_VALUES.value: ["float32", [1, 3, "14*h", "14*w"]],
                           IO.POSITION_IDS.value: ["int32", ["h", "w"]]},
                "outputs": {out.value: ["float32", [1, "h*w", "C"] if m == 1 else [1, f"h*w/{m * m}", "D"]]},
                "shapes": self.shapes, "h_w": side}

    @property
    def size(self) -> int:
        return mlpackage_size(self.path)


def mlpackage_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _inputs(ct, patch: int, shapes: str, grids: Sequence[tuple[int, int]], merge: int = 1):
    if shapes == "range":
        lo = merge                       # the smallest slice: one merge block
        big, small = ct.RangeDim(lo * patch, patch * MAX_SIDE, default=32 * patch), ct.RangeDim(lo, MAX_SIDE, default=32)
        big_w, small_w = ct.RangeDim(lo * patch, patch * MAX_SIDE, default=32 * patch), ct.RangeDim(lo, MAX_SIDE, default=32)
        px_shape, id_shape = (1, 3, big, big_w), (small, small_w)
    elif shapes == "enumerated":
        if not grids:
            raise MiniCPMVEdgeError("enumerated CoreML shapes need at least one grid")
        odd = [g for g in grids if g[0] % merge or g[1] % merge]
        if odd:
            raise MiniCPMVEdgeError(f"enumerated grids {odd[:3]} are not whole {merge}x{merge} merge blocks")
        default = (32, 32) if (32, 32) in grids else tuple(grids[0])
        px_shape = ct.EnumeratedShapes([(1, 3, patch * h, patch * w) for h, w in grids],
                                       default=(1, 3, patch * default[0], patch * default[1]))
        id_shape = ct.EnumeratedShapes([tuple(g) for g in grids], default=default)
    else:
        raise MiniCPMVEdgeError(f"unknown CoreML shape mode {shapes!r} (choose from {', '.join(SHAPES)})")
    return [ct.TensorType(IO.PIXEL_VALUES.value, shape=px_shape, dtype=np.float32),
            ct.TensorType(IO.POSITION_IDS.value, shape=id_shape, dtype=np.int32)]


# torch's gelu `approximate` -> MIL gelu mode
GELU_MODES = {"none": "EXACT", "tanh": "TANH_APPROXIMATION"}


@contextmanager
def gelu_keeps_its_approximation():
    """For the length of one conversion, a gelu converter that reads torch's `approximate` keyword.

    coremltools 9.0 reads it only as a positional input (TorchScript's form); torch.export passes it as a keyword,
    so every tanh GELU (SigLIP's gelu_pytorch_tanh: each layer's MLP, and 4.6's window merger) became an EXACT
    gelu, up to ~5e-4 off per activation (apple/coremltools PR #2863, open when this was written). The MIL op is
    the same `gelu`, with the mode the torch module asks for."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import register_torch_op
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    original = _TORCH_OPS_REGISTRY.get_func("gelu")

    def gelu(context, node):
        if len(node.inputs) > 1:                                   # TorchScript: a const's name; export: the string
            approximate = node.inputs[1]
            approximate = context[approximate].val if approximate in context else approximate
        else:
            approximate = (node.kwinputs or {}).get("approximate", ("none",))[0]
        if approximate not in GELU_MODES:
            raise MiniCPMVEdgeError(f"gelu approximate={approximate!r}: not convertible (CoreML has "
                                    f"{', '.join(GELU_MODES)})")
        context.add(mb.gelu(x=context[node.inputs[0]], mode=GELU_MODES[approximate], name=node.name))

    register_torch_op(gelu, override=True)
    try:
        yield
    finally:
        _TORCH_OPS_REGISTRY.set_func_by_name(original, "gelu")


SliceModule = SliceVisionModel | MergerSliceModel


def slice_module(source: Checkpoint | MergerCheckpoint | str | Path | SliceModule, graph: str | None = None
                 ) -> tuple[SliceModule, str]:
    """(the torch module of one slice, its graph name): the module the ONNX export traces
    (`onnx_vision.build_slice_module`). `graph` defaults to "vision", or a 4.6 checkpoint's first merger graph."""
    if isinstance(source, MergerSliceModel):
        module, found = source, MERGER_GRAPHS[source.mode]
    elif isinstance(source, SliceVisionModel):
        if source.resampler is not None:
            raise MiniCPMVEdgeError("the CoreML export covers the vision tower only (the resampler runs natively)")
        module, found = source, "vision"
    else:
        ckpt = open_vision_checkpoint(source)
        graph = graph or vision_graphs(ckpt)[0]
        if graph == "vision_resampler":
            raise MiniCPMVEdgeError("the CoreML export covers the vision tower only (the resampler runs natively)")
        return build_slice_module(ckpt, graph).eval(), graph
    if graph is not None and graph != found:
        raise MiniCPMVEdgeError(f"graph {graph!r} does not match the module (it is {found!r})")
    return module.eval(), found


def convert_coreml(source: Checkpoint | MergerCheckpoint | str | Path | SliceModule, *, graph: str | None = None,
                   shapes: str = "range", grids: Sequence[tuple[int, int]] | None = None,
                   target: str | None = None, fp32_ops: Sequence[str] = ()):
    """The fp16 ML program of one slice (an in-memory `ct.models.MLModel`) for `graph` (see `slice_module`).

    fp32_ops: MIL op types kept in fp32 (e.g. ("layer_norm", "softmax")); default none: the Neural Engine
    computes in fp16 anyway, and CoreML accuracy cannot be measured on Linux."""
    ct = coremltools_module()
    module, graph = slice_module(source, graph)
    merge = merge_side(graph)
    cfg = module.cfg if isinstance(module, MergerSliceModel) else module.tower.cfg
    if target is None:
        target = "iOS18" if shapes == "enumerated" else DEFAULT_TARGET
    if shapes == "enumerated" and _target(ct, target) < ct.target.iOS18:
        raise MiniCPMVEdgeError(f"enumerated shapes on two inputs need an iOS18 target (got {target})")
    if grids is None and shapes == "enumerated":
        grids = slicer_grids() if merge == 1 else slicer_grids(max_slice_nums=cfg.max_slice_nums,
                                                              slice_size=cfg.slice_size, merge=merge)
    grids = tuple(grids or ())
    p = cfg.patch_size
    inputs = _inputs(ct, p, shapes, grids, merge)          # bad shape requests fail before the minutes of tracing
    px = torch.zeros(1, 3, 32 * p, 32 * p)
    ids = torch.zeros(32, 32, dtype=torch.int64)
    # h, w in whole merge blocks for 4.6 (as the ONNX export)
    dh, dw = torch.export.Dim("h", min=1, max=MAX_SIDE // merge), torch.export.Dim("w", min=1, max=MAX_SIDE // merge)
    ph, pw = (dh, dw) if merge == 1 else (merge * dh, merge * dw)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.export.export(module, (px, ids), dynamic_shapes={
            "pixel_values": {2: p * ph, 3: p * pw}, "position_ids": {0: ph, 1: pw}}).run_decompositions({})
        precision = ct.precision.FLOAT16
        if fp32_ops:
            keep = set(fp32_ops)
            precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type not in keep)
        with gelu_keeps_its_approximation():
            ml = ct.convert(prog, inputs=inputs,
                            outputs=[ct.TensorType(GRAPHS[graph].value, dtype=np.float32)],
                            convert_to="mlprogram", minimum_deployment_target=_target(ct, target),
                            compute_precision=precision, skip_model_load=True)
    ml.short_description = ("MiniCPM-V vision tower: one slice -> patch features" if merge == 1 else
                            f"MiniCPM-V 4.6 vision tower + mergers ({graph}): one slice -> LLM embeddings")
    ml.user_defined_metadata[GRAPH_METADATA_KEY] = graph
    ml.user_defined_metadata["minicpmv_edge.shapes"] = shapes
    ml.user_defined_metadata["minicpmv_edge.target"] = target
    if grids:
        ml.user_defined_metadata["minicpmv_edge.grids"] = ";".join(f"{h}x{w}" for h, w in grids)
    return ml


def save_mlpackage(ml, path: str | Path) -> Path:
    """Save into a temporary folder beside `path`, then rename it into place (replacing an old package)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(".partial-" + path.name)         # coremltools insists on the .mlpackage suffix
    shutil.rmtree(staging, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml.save(str(staging))
    old = path.with_name("." + path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def metadata_grids(meta: Any) -> tuple[tuple[int, int], ...]:
    """The enumerated grids a package's metadata lists (none for range shapes)."""
    text = meta.get("minicpmv_edge.grids") if hasattr(meta, "get") else None
    return tuple(tuple(int(x) for x in g.split("x")) for g in text.split(";")) if text else ()


def export_vision_coreml(ckpt: Checkpoint | MergerCheckpoint | str | Path | SliceModule, out_dir: str | Path,
                         name: str | None = None, *, graph: str | None = None, shapes: str = "range",
                         grids: Sequence[tuple[int, int]] | None = None, target: str | None = None,
                         ) -> CoremlArtifact:
    """Write `vision-<name>-fp16.mlpackage` (4.6: `vision-merger-<mode>-<name>-fp16.mlpackage` for `graph`, one
    call per mode). Compressed variants: quantize/coreml_compress.py."""
    t0 = time.perf_counter()
    if not isinstance(ckpt, (SliceVisionModel, MergerSliceModel)):
        ckpt = open_vision_checkpoint(ckpt)
        name = name or ckpt.root.name
    if name is None:
        raise MiniCPMVEdgeError("export_vision_coreml needs a name when given a module")
    ml = convert_coreml(ckpt, graph=graph, shapes=shapes, grids=grids, target=target)
    meta = dict(ml.user_defined_metadata)
    graph = meta[GRAPH_METADATA_KEY]
    out = save_mlpackage(ml, Path(out_dir) / coreml_file_name(name, "fp16", graph))
    return CoremlArtifact(out, "fp16", meta["minicpmv_edge.target"], shapes, metadata_grids(meta),
                          {"compute": "fp16", "weights": "fp16"}, time.perf_counter() - t0, graph)


# =============================================================================================
# Reading a package's spec (works on Linux)
# =============================================================================================

def _dtype_name(value_type, with_shape: bool = False) -> str | None:
    from coremltools.proto import MIL_pb2

    if not value_type.HasField("tensorType"):
        return None
    t = value_type.tensorType
    name = MIL_pb2.DataType.Name(t.dataType).lower()
    if with_shape:      # palettes: the entry count is the product of the lut dims
        name += "[" + str(int(np.prod([d.constant.size for d in t.dimensions]))) + "]"
    return name


def inspect_mlpackage(path: str | Path) -> dict[str, Any]:
    """What the spec of a saved .mlpackage says: spec version, MIL opset, inputs (dtype, shape, range or
    enumerated shapes), outputs, op counts, gelu modes (EXACT / TANH_APPROXIMATION: 4.6 uses both), and how
    the weights of every linear/conv op are stored
    (`weights`: "float16", or "<constexpr op>:<input>=<stored dtype>,..." e.g.
    "constexpr_lut_to_dense:indices=uint8,lut=float16[16]": 4-bit indices packed in bytes, 16 palette entries)."""
    ct = coremltools_module()
    from coremltools.proto import FeatureTypes_pb2

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise MiniCPMVEdgeError(f"{path}: not an .mlpackage (no Manifest.json)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise MiniCPMVEdgeError(f"{path}: not an ML program (spec type {spec.WhichOneof('Type')})")

    def feature(f) -> dict[str, Any]:
        arr = f.type.multiArrayType
        info: dict[str, Any] = {"dtype": FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType).lower(),
                                "default_shape": list(arr.shape)}
        if arr.HasField("shapeRange"):
            info["range"] = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]
        if arr.HasField("enumeratedShapes"):
            info["enumerated"] = [list(s.shape) for s in arr.enumeratedShapes.shapes]
        return info

    fn = spec.mlProgram.functions["main"]
    ops = list(fn.block_specializations[fn.opset].operations)
    producer = {out.name: op for op in ops for out in op.outputs}

    def stored(op) -> str:
        """How the tensor an op produces is stored: its blob dtypes."""
        if op.type == "const":
            return _dtype_name(op.attributes["val"].type) or "?"
        kinds = [f"{key}={_dtype_name(val.type, key == 'lut')}" for key, val in op.attributes.items()
                 if key != "name" and val.HasField("blobFileValue")]                     # iOS16/17 constexpr ops
        for key, arg in op.inputs.items():                                                   # iOS18 constexpr ops
            for a in arg.arguments:
                if a.HasField("value") and a.value.HasField("blobFileValue"):
                    kinds.append(f"{key}={_dtype_name(a.value.type, key == 'lut')}")
                elif a.name in producer and producer[a.name].type == "const":
                    kinds.append(f"{key}={stored(producer[a.name])}")
        return f"{op.type}:" + ",".join(sorted(kinds))

    def const_string(op, key: str) -> str:
        """A string argument of an op (e.g. gelu's mode), inline or from a const op."""
        arg = op.inputs[key].arguments[0]
        value = arg.value if arg.HasField("value") else producer[arg.name].attributes["val"]
        return value.immediateValue.tensor.strings.values[0]

    weights: Counter = Counter()
    for op in ops:
        if op.type in ("linear", "conv"):
            arg = op.inputs["weight"].arguments[0]
            src = producer.get(arg.name)
            weights[stored(src) if src is not None else "inline"] += 1
    return {
        "path": str(path),
        "specification_version": spec.specificationVersion,
        "opset": fn.opset,
        "inputs": {f.name: feature(f) for f in spec.description.input},
        "outputs": {f.name: {"dtype": FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(
            f.type.multiArrayType.dataType).lower()} for f in spec.description.output},
        "ops": dict(Counter(op.type for op in ops).most_common()),
        "weights": dict(weights),
        "gelu_modes": dict(Counter(const_string(op, "mode") for op in ops if op.type == "gelu")),
        "metadata": dict(spec.description.metadata.userDefined),
        "size": mlpackage_size(path),
    }


# =============================================================================================
# Prediction (macOS only)
# =============================================================================================

def parity_coreml(path: str | Path, ckpt: Checkpoint | MergerCheckpoint, grids: Sequence[tuple[int, int]] | None = None,
                  *, seed: int = 0) -> dict[str, Any]:
    """Run the .mlpackage (CPU only, macOS) on the runtime's own input feed (`runtime.vision.coreml_inputs`) and
    the torch reference on random slices; per-row cosine. Same result layout as onnx_vision.parity; a 4.6 merger
    package is measured against the merger module (export/merger_tower.py) on grids snapped to whole merge blocks.
    Raises on other platforms: CoreML cannot predict there."""
    if sys.platform != "darwin":
        raise MiniCPMVEdgeError("CoreML prediction needs macOS; on Linux only the spec can be checked")
    ct = coremltools_module()
    from minicpmv_edge.runtime.preprocess import Slice
    from minicpmv_edge.runtime.vision import coreml_inputs

    ml = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    graph = ml.user_defined_metadata.get(GRAPH_METADATA_KEY, "vision")
    ckpt = open_vision_checkpoint(ckpt)
    p, n_side, merge = ckpt.vision.patch_size, ckpt.vision.num_patches_per_side, merge_side(graph)
    rule = ckpt.facts.vision_position_ids
    grids = grids or EXPORT_PARITY_GRIDS
    if merge > 1:
        grids = merger_parity_grids(merge, grids)
        module, _ = slice_module(ckpt, graph)
        reference = "torch (export/merger_tower.py)"
    else:
        tower = VisionTower.from_checkpoint(ckpt)
        reference = "torch (export/reference.py)"
    rows = []
    for h, w in grids:
        px = random_slice(h, w, p, seed)
        feed = coreml_inputs(Slice(px, (h, w), "source"), n_side, rule)
        got = ml.predict(feed)[GRAPHS[graph].value]
        if merge > 1:
            with torch.no_grad():
                want = module(torch.from_numpy(feed[IO.PIXEL_VALUES.value]),
                              torch.from_numpy(feed[IO.POSITION_IDS.value].astype(np.int64)))[0].numpy()
        else:
            want = reference_output(tower, None, px)
        got = np.asarray(got, dtype=np.float32).reshape(want.shape)
        cos = cosine_rows(got, want)
        rows.append(ParityGrid(grid=[h, w], min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
                               max_abs=float(np.abs(got - want).max())))
    return Parity(reference=reference, graph=graph, runtime="coreml CPU_ONLY", grids=rows,
                  min_cosine=min(r.min_cosine for r in rows),
                  mean_cosine=float(np.mean([r.mean_cosine for r in rows]))).to_dict()
