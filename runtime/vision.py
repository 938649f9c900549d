"""Vision backends: one slice's pixels -> its patch features [h*w, C] (the resampler does the rest).

All backends share one small contract, `encode(slice) -> np.ndarray`, so the session does not care which
runs:
- `OnnxVision`: onnxruntime on the exported ONNX graph (fp32 / fp16 / int8 files), CPU or CoreML provider;
- `CoreMLVision`: the .mlpackage through coremltools, macOS only (import-guarded);
llama.cpp's own clip path (mmproj) lives in `llamacpp_clip.py`: it preprocesses on its own, so it is the
baseline for benchmarks rather than a backend here.

The graph I/O names are the contract with the exporter (`export/onnx_vision.py` writes graphs with them).
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

from .memory import return_freed_heap
from .preprocess import Slice


class VisionIO(str, Enum):
    """Input/output names of every vision graph (ONNX and CoreML)."""
    PIXEL_VALUES = "pixel_values"      # float32 [1, 3, 14*h, 14*w], a normalised slice
    POSITION_IDS = "position_ids"      # int64 [h, w] (int32 in CoreML), ids of preprocess.vision_position_ids
    PATCH_FEATURES = "patch_features"  # float32 [1, h*w, C], after post_layernorm
    IMAGE_EMBEDS = "image_embeds"      # float32 [1, Q, D]: with the resampler, or 4.6's mergers ([1, h*w/16, D])


class VisionBackend(Protocol):
    name: str

    def encode(self, s: Slice) -> np.ndarray:
        """[h*w, C] patch features of one slice."""


def slice_inputs(s: Slice, num_patches_per_side: int = 70, position_rule: str = "bucketize") -> dict[str, np.ndarray]:
    """Graph inputs of one slice; `position_rule` is `facts.vision_position_ids` ("nearest" for 4.6)."""
    h, w = s.tgt_size
    return {VisionIO.PIXEL_VALUES.value: np.ascontiguousarray(s.pixels[None], dtype=np.float32),
            VisionIO.POSITION_IDS.value: s.position_ids(num_patches_per_side, position_rule).reshape(h, w)}


class OnnxVision:
    def __init__(self, path: str | Path, *, threads: int | None = None, providers: list[str] | None = None,
                 num_patches_per_side: int = 70, position_rule: str = "bucketize"):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise MiniCPMVEdgeError(f"{path}: file not found")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # ORT's worker threads spin-wait after each run by default, stealing the cores llama.cpp needs next
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if sys.platform == "darwin" and "CoreMLExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CoreMLExecutionProvider")
        self._path, self._options, self._providers = path, so, providers
        self.session = self._open()
        inputs = {i.name for i in self.session.get_inputs()}
        need = {VisionIO.PIXEL_VALUES.value, VisionIO.POSITION_IDS.value}
        if not need <= inputs:
            raise MiniCPMVEdgeError(f"{path}: expected inputs {sorted(need)}, the graph has {sorted(inputs)}")
        self.output = self.session.get_outputs()[0].name
        self.n_side = num_patches_per_side
        self.position_rule = position_rule
        self.name = f"onnxruntime:{path.name}"

    def _open(self):
        import onnxruntime as ort
        try:
            return ort.InferenceSession(str(self._path), self._options, providers=self._providers)
        except Exception as exc:   # onnxruntime raises its own exception types
            raise MiniCPMVEdgeError(f"{self._path}: onnxruntime could not load this model ({exc})") from None

    def release(self) -> None:
        """Free the session (its weights, arena and threads) until the next `encode` loads it again: low-memory
        mode calls this after each request's images, trading a reload per image for the memory in between."""
        self.session = None
        return_freed_heap()

    def encode(self, s: Slice) -> np.ndarray:
        if self.session is None:
            self.session = self._open()
        out = self.session.run([self.output], slice_inputs(s, self.n_side, self.position_rule))[0]
        return out.reshape(-1, out.shape[-1])


class ResamplerInGraph:
    """The resampler step of a session whose vision graph already ends in the resampler (the fused
    vision+resampler ONNX graph, FileKind.VISION_RESAMPLER_ONNX): the backend's output is the [Q, D] block."""
    backend = "in-graph"

    def __init__(self, embed_dim: int):
        self.embed_dim = embed_dim

    def run(self, features: np.ndarray, h: int, w: int) -> np.ndarray:
        if features.ndim != 2 or features.shape[-1] != self.embed_dim:
            raise MiniCPMVEdgeError(f"the fused vision graph returned {tuple(features.shape)}, expected "
                                    f"[query_num, {self.embed_dim}]")
        return features

    def run_group(self, frames, grids, temporal_ids) -> np.ndarray:
        raise MiniCPMVEdgeError("video needs the separate resampler weights (the fused vision+resampler graph "
                                "has no temporal input); load the bundle with its vision_onnx file")

    def close(self) -> None:
        pass


def coreml_inputs(s: Slice, num_patches_per_side: int = 70, position_rule: str = "bucketize") -> dict[str, np.ndarray]:
    """`slice_inputs` as a CoreML package takes them: position ids as int32 (CoreML has no int64 inputs)."""
    feed = slice_inputs(s, num_patches_per_side, position_rule)
    feed[VisionIO.POSITION_IDS.value] = feed[VisionIO.POSITION_IDS.value].astype(np.int32)
    return feed


class CoreMLVision:
    """The .mlpackage through coremltools (prediction exists only on macOS): the 2.6-4.5 tower, or a 4.6 merger
    graph (`position_rule` "nearest"), whichever the package holds."""

    def __init__(self, path: str | Path, num_patches_per_side: int = 70, position_rule: str = "bucketize"):
        if sys.platform != "darwin":
            raise MiniCPMVEdgeError("CoreML prediction runs only on macOS; use the ONNX backend here")
        import coremltools as ct
        self.model = ct.models.MLModel(str(path))
        self.n_side = num_patches_per_side
        self.position_rule = position_rule
        self.name = f"coreml:{Path(path).name}"

    def encode(self, s: Slice) -> np.ndarray:
        out = self.model.predict(coreml_inputs(s, self.n_side, self.position_rule))
        arr = np.asarray(next(iter(out.values())), dtype=np.float32)
        return arr.reshape(-1, arr.shape[-1])
