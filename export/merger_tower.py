"""MiniCPM-V 4.6 vision side: SigLIP with a window-attention merger inside the ViT, then the final merger.

    ckpt = MergerCheckpoint.open("MiniCPM-V-4.6")          # config.json model_type "minicpmv4_6"
    model = MergerSliceModel(ckpt, "16x")                  # one slice -> LLM-ready embeddings

There is no resampler in 4.6 (docs/minicpmv-4.6-vision.md). One slice of h x w patches goes through:

    patch conv + learned position table (nearest ids, runtime.preprocess.position_nearest_ids)
    layers 0 .. insert_layer_id                     on h*w tokens
    vit_merger ("16x" only): LayerNorm, self-attention inside each 2x2 window, + residual; each window's
        4 tokens concatenated -> LayerNorm -> Linear -> gelu(tanh) -> Linear, + the window's mean
    remaining layers                                 on h*w/4 tokens ("16x") or h*w ("4x", no window merger)
    post_layernorm
    merger: 2x2 neighbours concatenated -> LayerNorm -> Linear -> GELU(erf) -> Linear   (merger_times rounds)
    -> [h*w/16, D] ("16x") or [h*w/4, D] ("4x"), rows in row-major order of the merged grid

The checkpoint layout is transformers' `MiniCPMV4_6ForConditionalGeneration` (tensors `model.vision_tower.*`,
`model.merger.*`). `MergerCheckpoint` reads only the vision half: the 4.6 LLM belongs to the text reader
(export/checkpoint.py), which will recognise `model_type` itself; until then `is_merger_checkpoint` is how the
vision exporters tell a 4.6 folder from a 2.6 - 4.5 one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv_edge.errors import CheckpointError
from minicpmv_edge.facts import ModelFacts, facts_for

from .checkpoint import CONFIG, PREPROCESSOR_CONFIG, VisionConfig, _index_tensors, _read_json
from .checkpoint_native import read_vision_config
from .safetensors_io import TensorInfo, load_tensor

__all__ = ["MODEL_TYPES", "MergerVisionConfig", "MergerCheckpoint", "MergerSliceModel", "is_merger_checkpoint",
           "merger_tensor_shapes", "VISION_PREFIX", "MERGER_PREFIX"]

# config.json model_type -> facts version, for checkpoints without a "version" key.
MODEL_TYPES = {"minicpmv4_6": "4.6"}
VISION_PREFIX = "model.vision_tower."
MERGER_PREFIX = "model.merger."
# transformers MiniCPMV4_6DownsampleMLP builds its LayerNorm with a literal eps, not the config's.
MERGER_LN_EPS = 1e-6


@dataclass(frozen=True)
class MergerVisionConfig(VisionConfig):
    """The SigLIP fields of `VisionConfig` plus what a 4.6 config.json (+ preprocessor_config.json) adds."""
    insert_layer_id: int            # the window merger runs after this layer ("16x")
    merger_times: int               # rounds of 2x2 merging in the final merger
    llm_hidden_size: int            # text_config.hidden_size: width of the output embeddings
    downsample_mode: str            # the checkpoint's default ("16x" / "4x")
    slice_size: int                 # preprocessor scale_resolution
    max_slice_nums: int
    norm_mean: tuple[float, float, float]
    norm_std: tuple[float, float, float]


def is_merger_checkpoint(root: str | Path) -> bool:
    """True for a folder whose config.json names a merger-style model_type (MiniCPM-V 4.6)."""
    path = Path(root) / CONFIG
    try:
        raw = _read_json(path, required=False)
    except CheckpointError:
        return False
    return isinstance(raw, dict) and raw.get("model_type") in MODEL_TYPES


def _field(cfg: dict, key: str, path: Path, where: str, kind: tuple = (int,), default: Any = ...) -> Any:
    value = cfg.get(key, default)
    if value is ...:
        raise CheckpointError(path, "missing required field", where + key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(path, f"expected {'/'.join(k.__name__ for k in kind)}, got {value!r}", where + key)
    if kind == (int,) and value <= 0 and key != "insert_layer_id":
        raise CheckpointError(path, f"must be positive, got {value}", where + key)
    return value


def _pair_is_2x2(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and list(value) == [2, 2]


def _triple(cfg: dict, key: str, path: Path) -> tuple[float, float, float]:
    value = cfg.get(key, [0.5, 0.5, 0.5])
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        raise CheckpointError(path, f"expected a list of 3 numbers, got {value!r}", key)
    return tuple(float(x) for x in value)


def parse_merger_config(raw: Any, path: Path, pre: dict | None = None) -> tuple[ModelFacts, MergerVisionConfig]:
    if not isinstance(raw, dict):
        raise CheckpointError(path, "top level must be a JSON object")
    if raw.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(path, f"expected one of {sorted(MODEL_TYPES)}, got {raw.get('model_type')!r}",
                              "model_type")
    facts = facts_for(MODEL_TYPES[raw["model_type"]], allow_unsupported=True)
    vc, tc = raw.get("vision_config"), raw.get("text_config")
    for name, sub in (("vision_config", vc), ("text_config", tc)):
        if not isinstance(sub, dict):
            raise CheckpointError(path, "missing or not an object", name)
    v = "vision_config."
    if not _pair_is_2x2(vc.get("window_kernel_size", [2, 2])):
        raise CheckpointError(path, f"only 2x2 windows are supported, got {vc['window_kernel_size']!r}",
                              v + "window_kernel_size")
    if not _pair_is_2x2(raw.get("merge_kernel_size", [2, 2])):
        raise CheckpointError(path, f"only 2x2 merging is supported, got {raw['merge_kernel_size']!r}",
                              "merge_kernel_size")
    pre = pre or {}
    pre_path = path.with_name(PREPROCESSOR_CONFIG)
    mode = _field(raw, "downsample_mode", path, "", (str,), facts.default_downsample_mode)
    if mode not in dict(facts.downsample_modes):
        raise CheckpointError(path, f"expected one of {sorted(dict(facts.downsample_modes))}, got {mode!r}",
                              "downsample_mode")
    cfg = MergerVisionConfig(
        **asdict(read_vision_config(raw, path, facts)),      # the SigLIP fields, as the checkpoint reader reads them
        # MiniCPMV4_6Config copies its own insert_layer_id into the vision config, so the top level wins
        insert_layer_id=_field(raw, "insert_layer_id", path, "", default=vc.get("insert_layer_id", 6)),
        merger_times=_field(raw, "merger_times", path, "", default=1),
        llm_hidden_size=_field(tc, "hidden_size", path, "text_config."),
        downsample_mode=mode,
        slice_size=_field(pre, "scale_resolution", pre_path, "", default=448),
        max_slice_nums=_field(pre, "max_slice_nums", pre_path, "", default=facts.max_slice_nums),
        norm_mean=_triple(pre, "image_mean", pre_path),
        norm_std=_triple(pre, "image_std", pre_path),
    )
    if not 0 <= cfg.insert_layer_id < cfg.num_hidden_layers:
        raise CheckpointError(path, f"{cfg.insert_layer_id} is not a layer of the {cfg.num_hidden_layers}-layer "
                              "vision tower", "insert_layer_id")
    if cfg.hidden_act != "gelu_pytorch_tanh":
        raise CheckpointError(path, f"only gelu_pytorch_tanh is supported, got {cfg.hidden_act!r}", v + "hidden_act")
    return facts, cfg


def merger_tensor_shapes(cfg: MergerVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every vision / merger tensor a 4.6 checkpoint must hold, with its shape."""
    c, i, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[name + ".weight"], out[name + ".bias"] = (n_out, n_in), (n_out,)

    def norm(name: str, n: int) -> None:
        out[name + ".weight"], out[name + ".bias"] = (n,), (n,)

    def attention(prefix: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{prefix}.self_attn.{proj}", c, c)

    t = VISION_PREFIX
    out[t + "embeddings.patch_embedding.weight"] = (c, 3, p, p)
    out[t + "embeddings.patch_embedding.bias"] = (c,)
    out[t + "embeddings.position_embedding.weight"] = (cfg.num_patches_per_side ** 2, c)
    for layer in range(cfg.num_hidden_layers):
        pre = f"{t}encoder.layers.{layer}"
        norm(pre + ".layer_norm1", c)
        attention(pre)
        norm(pre + ".layer_norm2", c)
        linear(pre + ".mlp.fc1", i, c)
        linear(pre + ".mlp.fc2", c, i)
    norm(t + "post_layernorm", c)
    norm(t + "vit_merger.layer_norm1", c)
    attention(t + "vit_merger")
    norm(t + "vit_merger.pre_norm", 4 * c)
    linear(t + "vit_merger.linear_1", 4 * i, 4 * c)
    linear(t + "vit_merger.linear_2", c, 4 * i)
    for k in range(cfg.merger_times):
        n_out = cfg.llm_hidden_size if k == cfg.merger_times - 1 else c
        norm(f"{MERGER_PREFIX}mlp.{k}.pre_norm", 4 * c)
        linear(f"{MERGER_PREFIX}mlp.{k}.linear_1", 4 * c, 4 * c)
        linear(f"{MERGER_PREFIX}mlp.{k}.linear_2", n_out, 4 * c)
    return out


@dataclass
class MergerCheckpoint:
    """The vision half of a MiniCPM-V 4.6 checkpoint folder: config plus the tensors it names (validated)."""
    root: Path
    facts: ModelFacts
    vision: MergerVisionConfig
    tensors: dict[str, TensorInfo] = field(repr=False)

    @classmethod
    def open(cls, root: str | Path) -> "MergerCheckpoint":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(root, "not a directory")
        pre = _read_json(root / PREPROCESSOR_CONFIG, required=False)
        facts, cfg = parse_merger_config(_read_json(root / CONFIG), root / CONFIG, pre)
        infos = _index_tensors(root)
        for name, shape in merger_tensor_shapes(cfg).items():
            if name not in infos:
                raise CheckpointError(root, f"missing tensor {name} (config.json implies it)", name)
            if tuple(infos[name].shape) != shape:
                raise CheckpointError(root, f"tensor {name} has shape {list(infos[name].shape)}, config.json "
                                      f"implies {list(shape)}", name)
        return cls(root, facts, cfg, infos)

    def tensor(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(self.root, f"no tensor {name}")
        return load_tensor(self.tensors[name], dtype)

    def names(self) -> list[str]:
        """The vision and merger tensor names, in config order."""
        return list(merger_tensor_shapes(self.vision))


# =============================================================================================
# One slice in torch (export-friendly: no Python ints taken from tensor values)
# =============================================================================================

class _Attention(nn.Module):
    """Unmasked multi-head self-attention over the middle axis of [B, N, C] (B = 1, or one batch row per window)."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, c // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [B, N, C]
        split = lambda t: t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)   # [B, H, N, hd]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5, dim=-1)
        return self.out_proj(torch.matmul(probs, v).transpose(1, 2).flatten(2))          # [B, N, C]


class _Layer(nn.Module):
    def __init__(self, cfg: MergerVisionConfig):
        super().__init__()
        c, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(c, eps=eps), nn.LayerNorm(c, eps=eps)
        self.self_attn = _Attention(c, cfg.num_attention_heads)
        self.fc1, self.fc2 = nn.Linear(c, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


def _blocks_2x2(x: torch.Tensor, h, w) -> torch.Tensor:
    """[h*w, C] row-major -> [h/2 * w/2, 4, C]: each 2x2 block (top-left, top-right, bottom-left,
    bottom-right), blocks in row-major order of the halved grid."""
    c = x.shape[-1]
    return x.reshape(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(-1, 4, c)


class _WindowMerger(nn.Module):
    """transformers MiniCPMV4_6ViTWindowAttentionMerger for one slice: [h*w, C] -> [h*w/4, C]."""

    def __init__(self, cfg: MergerVisionConfig):
        super().__init__()
        c, i, eps = cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(c, eps=eps)
        self.self_attn = _Attention(c, cfg.num_attention_heads)
        self.pre_norm = nn.LayerNorm(4 * c, eps=eps)
        self.linear_1, self.linear_2 = nn.Linear(4 * c, 4 * i), nn.Linear(4 * i, c)

    def forward(self, x: torch.Tensor, h, w) -> torch.Tensor:
        windows = _blocks_2x2(x, h, w)                                      # [n, 4, C] residual
        windows = windows + self.self_attn(_blocks_2x2(self.layer_norm1(x), h, w))   # attention inside windows
        flat = windows.flatten(1)                                           # [n, 4C]
        mlp = self.linear_2(F.gelu(self.linear_1(self.pre_norm(flat)), approximate="tanh"))
        return mlp + windows.mean(dim=1)                                    # [n, C]


class _MergerMLP(nn.Module):
    """transformers MiniCPMV4_6DownsampleMLP: [n, 4C] -> [n, out]."""

    def __init__(self, c: int, n_out: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(4 * c, eps=MERGER_LN_EPS)
        self.linear_1, self.linear_2 = nn.Linear(4 * c, 4 * c), nn.Linear(4 * c, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))      # exact (erf) GELU


class MergerSliceModel(nn.Module):
    """(pixel_values [1, 3, p*h, p*w], position_ids [h, w] int64) -> image_embeds [1, h*w / s^2, D],
    s = 4 in "16x" mode (h, w multiples of 4) and 2 in "4x" mode (multiples of 2)."""

    def __init__(self, ckpt: MergerCheckpoint, downsample_mode: str | None = None):
        super().__init__()
        cfg = ckpt.vision
        self.cfg = cfg
        self.mode = downsample_mode or cfg.downsample_mode
        self.side = ckpt.facts.downsample_side(self.mode)
        self.use_window_merger = self.side == 4
        c = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, c, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side ** 2, c)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.vit_merger = _WindowMerger(cfg) if self.use_window_merger else None
        self.merger = nn.ModuleList(_MergerMLP(c, cfg.llm_hidden_size if k == cfg.merger_times - 1 else c)
                                    for k in range(cfg.merger_times))
        self._load(ckpt)
        self.eval()

    def _load(self, ckpt: MergerCheckpoint) -> None:
        state = {}
        for name in ckpt.names():
            if name.startswith(VISION_PREFIX):
                key = name[len(VISION_PREFIX):].replace("embeddings.", "").replace("encoder.", "")
                key = key.replace(".mlp.fc", ".fc")
                if key.startswith("vit_merger.") and self.vit_merger is None:
                    continue                                                # "4x" skips the window merger
            else:
                key = "merger." + name[len(MERGER_PREFIX) + len("mlp."):]
            state[key] = torch.from_numpy(np.array(ckpt.tensor(name)))   # a writable copy of the memmap
        self.load_state_dict(state, strict=True)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h, w = position_ids.shape
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)   # [1, h*w, C] row-major
        x = x + self.position_embedding(position_ids.flatten())[None]
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if self.vit_merger is not None and index == self.cfg.insert_layer_id:
                x = self.vit_merger(x[0], h, w)[None]                       # [1, h*w/4, C]
                h, w = h // 2, w // 2
        x = self.post_layernorm(x)[0]
        for mlp in self.merger:
            x = mlp(_blocks_2x2(x, h, w).flatten(1))
            h, w = h // 2, w // 2
        return x[None]                                                      # [1, n, D]
