"""Export MiniCPM-V's SigLIP vision tower to a CoreML ML program (`.mlpackage`), fp16.

    art = export_vision_coreml(ckpt, "bundle/", "MiniCPM-V-4_5")               # vision-<name>-fp16.mlpackage
    info = inspect_mlpackage(art.path)                                            # spec summary, works on Linux

The model encodes one slice, with the same contract as the ONNX graph (export/onnx_vision.py):

    inputs   pixel_values   float32 [1, 3, 14h, 14w]
             position_ids   int32   [h, w]      (CoreML has no int64 inputs; ids < 4900 fit)
    output   patch_features float32 [1, h*w, C]  (fp16 inside)

Input shapes (`shapes=`):
* "range" (default, iOS17+): h, w each 1..MAX_SIDE patches, pixel sides 14..14*MAX_SIDE. Covers every grid the
  slicer can produce (up to ~1024 patches on one side for extreme aspect ratios).
* "enumerated" (iOS18+: earlier targets allow only one enumerated input): the grids in `slicer_grids()` - all
  the slices LLaVA-UHD makes for images with aspect ratio within 1:4..4:1 (97 grids at 448/14/9 slices);
  the Neural Engine prefers enumerated shapes. Other grids are refused by CoreML at prediction time.

Converted from `torch.export(...).run_decompositions({})` (research toolchain §4: the traced path trips over
shape-derived ints in coremltools 9 + torch 2.13). coremltools runs on Linux for conversion and spec reading
only: prediction raises there, so `parity_coreml` works on macOS only. Weight compression (int8, 4-bit
palettes, int4 blocks) lives in quantize/coreml_compress.py.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime.bundle import FileKind, Parity, ParityGrid, file_name

from .checkpoint import Checkpoint
from .onnx_vision import IO, SliceVisionModel, random_slice, reference_output, cosine_rows, EXPORT_PARITY_GRIDS
from .reference import VisionTower

__all__ = ["CoremlArtifact", "SHAPES", "MAX_SIDE", "slicer_grids", "convert_coreml", "save_mlpackage",
           "export_vision_coreml", "inspect_mlpackage", "parity_coreml", "coreml_file_name", "mlpackage_size"]

SHAPES = ("range", "enumerated")
MAX_SIDE = 1024                  # patches per side accepted by "range" models
DEFAULT_TARGET = "iOS17"


def coreml_file_name(name: str, precision: str) -> str:
    return file_name(FileKind.VISION_COREML, name, precision)


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
                 patch_size: int = 14) -> tuple[tuple[int, int], ...]:
    """Every slice grid (h, w) in patches that LLaVA-UHD slicing (runtime/preprocess.py) produces for images
    from 32 px to 8192 px a side with aspect ratio within 1:max_aspect..max_aspect:1 (3 % size steps),
    most frequent first."""
    from minicpmv_edge.runtime.preprocess import find_best_resize, get_refine_size, get_sliced_grid

    sizes = sorted({int(round(32 * 1.03 ** k)) for k in range(170)})
    seen: Counter = Counter()
    for width in sizes:
        for height in sizes:
            if not 1 / max_aspect <= width / height <= max_aspect:
                continue
            grid = get_sliced_grid((width, height), max_slice_nums, slice_size)
            if grid is None:
                w, h = find_best_resize((width, height), slice_size, patch_size, allow_upscale=True)
                seen[(h // patch_size, w // patch_size)] += 1
                continue
            w, h = find_best_resize((width, height), slice_size, patch_size)
            seen[(h // patch_size, w // patch_size)] += 1
            rw, rh = get_refine_size((width, height), grid, slice_size, patch_size, True)
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

    def record(self):
        """How the manifest lists this package (export/bundle.py)."""
        from .bundle import BundleFileSpec
        return BundleFileSpec(self.path, FileKind.VISION_COREML, self.precision,
                              dict(format="mlpackage", graph="vision", quant=self.quant, io=self.io,
                                   minimum_deployment_target=self.target))

    @property
    def io(self) -> dict[str, Any]:
        side = "1..%d" % MAX_SIDE if self.shapes == "range" else f"{len(self.grids)} enumerated grids"
        return {"inputs": {IO.PIXEL_VALUES.value: ["float32", [1, 3, "14*h", "14*w"]],
                           IO.POSITION_IDS.value: ["int32", ["h", "w"]]},
                "outputs": {IO.PATCH_FEATURES.value: ["float32", [1, "h*w", "C"]]},
                "shapes": self.shapes, "h_w": side}

    @property
    def size(self) -> int:
        return mlpackage_size(self.path)


def mlpackage_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _inputs(ct, patch: int, shapes: str, grids: Sequence[tuple[int, int]]):
    if shapes == "range":
        big, small = ct.RangeDim(patch, patch * MAX_SIDE, default=32 * patch), ct.RangeDim(1, MAX_SIDE, default=32)
        big_w, small_w = ct.RangeDim(patch, patch * MAX_SIDE, default=32 * patch), ct.RangeDim(1, MAX_SIDE, default=32)
        px_shape, id_shape = (1, 3, big, big_w), (small, small_w)
    elif shapes == "enumerated":
        if not grids:
            raise MiniCPMVEdgeError("enumerated CoreML shapes need at least one grid")
        default = (32, 32) if (32, 32) in grids else tuple(grids[0])
        px_shape = ct.EnumeratedShapes([(1, 3, patch * h, patch * w) for h, w in grids],
                                       default=(1, 3, patch * default[0], patch * default[1]))
        id_shape = ct.EnumeratedShapes([tuple(g) for g in grids], default=default)
    else:
        raise MiniCPMVEdgeError(f"unknown CoreML shape mode {shapes!r} (choose from {', '.join(SHAPES)})")
    return [ct.TensorType(IO.PIXEL_VALUES.value, shape=px_shape, dtype=np.float32),
            ct.TensorType(IO.POSITION_IDS.value, shape=id_shape, dtype=np.int32)]


def convert_coreml(source: Checkpoint | str | Path | SliceVisionModel, *, shapes: str = "range",
                   grids: Sequence[tuple[int, int]] | None = None, target: str | None = None,
                   fp32_ops: Sequence[str] = ()):
    """The fp16 ML program of one slice (an in-memory `ct.models.MLModel`).

    fp32_ops: MIL op types kept in fp32 (e.g. ("layer_norm", "softmax")); default none: the Neural Engine
    computes in fp16 anyway, and CoreML accuracy cannot be measured on Linux."""
    ct = coremltools_module()
    if isinstance(source, SliceVisionModel):
        module = source.eval()
    else:
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
        module = SliceVisionModel(VisionTower.from_checkpoint(ckpt)).eval()
    if module.resampler is not None:
        raise MiniCPMVEdgeError("the CoreML export covers the vision tower only (the resampler runs natively)")
    if target is None:
        target = "iOS18" if shapes == "enumerated" else DEFAULT_TARGET
    if shapes == "enumerated" and _target(ct, target) < ct.target.iOS18:
        raise MiniCPMVEdgeError(f"enumerated shapes on two inputs need an iOS18 target (got {target})")
    grids = tuple(grids) if grids is not None else (slicer_grids() if shapes == "enumerated" else ())
    p = module.tower.cfg.patch_size
    px = torch.zeros(1, 3, 32 * p, 32 * p)
    ids = torch.zeros(32, 32, dtype=torch.int64)
    dh, dw = torch.export.Dim("h", min=1, max=MAX_SIDE), torch.export.Dim("w", min=1, max=MAX_SIDE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.export.export(module, (px, ids), dynamic_shapes={
            "pixel_values": {2: p * dh, 3: p * dw}, "position_ids": {0: dh, 1: dw}}).run_decompositions({})
        precision = ct.precision.FLOAT16
        if fp32_ops:
            keep = set(fp32_ops)
            precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type not in keep)
        ml = ct.convert(prog, inputs=_inputs(ct, p, shapes, grids),
                        outputs=[ct.TensorType(IO.PATCH_FEATURES.value, dtype=np.float32)],
                        convert_to="mlprogram", minimum_deployment_target=_target(ct, target),
                        compute_precision=precision, skip_model_load=True)
    ml.short_description = "MiniCPM-V vision tower: one slice -> patch features"
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


def export_vision_coreml(ckpt: Checkpoint | str | Path | SliceVisionModel, out_dir: str | Path,
                         name: str | None = None, *, shapes: str = "range",
                         grids: Sequence[tuple[int, int]] | None = None, target: str | None = None,
                         ) -> CoremlArtifact:
    """Write `vision-<name>-fp16.mlpackage`. Compressed variants: quantize/coreml_compress.py."""
    t0 = time.perf_counter()
    if not isinstance(ckpt, SliceVisionModel):
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
        name = name or ckpt.root.name
    if name is None:
        raise MiniCPMVEdgeError("export_vision_coreml needs a name when given a module")
    ml = convert_coreml(ckpt, shapes=shapes, grids=grids, target=target)
    meta = ml.user_defined_metadata
    out = save_mlpackage(ml, Path(out_dir) / coreml_file_name(name, "fp16"))
    used_grids = tuple(tuple(int(x) for x in g.split("x")) for g in meta["minicpmv_edge.grids"].split(";")) \
        if "minicpmv_edge.grids" in meta else ()
    return CoremlArtifact(out, "fp16", meta["minicpmv_edge.target"], shapes, used_grids,
                          {"compute": "fp16", "weights": "fp16"}, time.perf_counter() - t0)


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
    enumerated shapes), outputs, op counts, and how the weights of every linear/conv op are stored
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
        "metadata": dict(spec.description.metadata.userDefined),
        "size": mlpackage_size(path),
    }


# =============================================================================================
# Prediction (macOS only)
# =============================================================================================

def parity_coreml(path: str | Path, ckpt: Checkpoint, grids: Sequence[tuple[int, int]] | None = None, *,
                  seed: int = 0) -> dict[str, Any]:
    """Run the .mlpackage (CPU only, macOS) and the torch reference on random slices; per-row cosine.
    Same result layout as onnx_vision.parity. Raises on other platforms: CoreML cannot predict there."""
    if sys.platform != "darwin":
        raise MiniCPMVEdgeError("CoreML prediction needs macOS; on Linux only the spec can be checked")
    ct = coremltools_module()
    from minicpmv_edge.runtime.preprocess import position_bucket_ids

    ml = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    tower = VisionTower.from_checkpoint(ckpt)
    p, side = ckpt.vision.patch_size, ckpt.vision.num_patches_per_side
    rows = []
    for h, w in grids or EXPORT_PARITY_GRIDS:
        px = random_slice(h, w, p, seed)
        ids = position_bucket_ids(h, w, side).reshape(h, w).astype(np.int32)
        got = ml.predict({IO.PIXEL_VALUES.value: px[None], IO.POSITION_IDS.value: ids})[IO.PATCH_FEATURES.value]
        got = np.asarray(got, dtype=np.float32).reshape(h * w, -1)
        want = reference_output(tower, None, px)
        cos = cosine_rows(got, want)
        rows.append(ParityGrid(grid=[h, w], min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
                               max_abs=float(np.abs(got - want).max())))
    return Parity(reference="torch (export/reference.py)", graph="vision", runtime="coreml CPU_ONLY", grids=rows,
                  min_cosine=min(r.min_cosine for r in rows),
                  mean_cosine=float(np.mean([r.mean_cosine for r in rows]))).to_dict()
