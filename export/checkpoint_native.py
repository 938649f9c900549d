"""Transformers-native MiniCPM-V checkpoints (4.6): config.json -> the reader's typed config, and the tensor list.

A 4.6 config.json has no "version" key: `model_type` is "minicpmv4_6" and the LLM and ViT settings sit in
nested `text_config` (a Qwen3.5 "qwen3_5_text" hybrid) and `vision_config` objects, with the ViT merger
settings (`insert_layer_id`, `merge_kernel_size`, `merger_times`) at the top level. Tensors are
`model.vision_tower.*` (SigLIP + `vit_merger.*`), `model.merger.*` (the 2x2 downsample MLP into the LLM),
`model.language_model.*` and, when not tied, `lm_head.weight`; the hub's `mtp.*` head is not part of the
model transformers builds and is reported as ignored. `checkpoint.parse_config` and
`checkpoint.expected_tensors` hand 4.6 configs to the two functions here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicpmv_edge.errors import CheckpointError
from minicpmv_edge.facts import ModelFacts

from .checkpoint import (CheckpointConfig, LLMConfig, PreprocessConfig, VisionConfig, _get, _positive)

LAYER_KINDS = ("linear_attention", "full_attention")
TEXT_MODEL_TYPE = "qwen3_5_text"
MAX_LAYERS = 1024          # far above any real model; bounds the per-layer loops before they run
MAX_MERGER_TIMES = 4


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Qwen3.5's gated delta net layers and how they mix with full attention."""
    layer_types: tuple[str, ...]     # per layer: "linear_attention" or "full_attention"
    conv_kernel: int                 # causal depthwise conv over q/k/v before the delta rule
    key_head_dim: int
    value_head_dim: int
    num_key_heads: int
    num_value_heads: int
    attn_output_gate: bool           # full-attention layers: q_proj also yields a per-head sigmoid gate
    mrope_section: tuple[int, ...]   # interleaved M-RoPE sections (t, h, w) in rotary-frequency units
    mtp_num_hidden_layers: int       # declared multi-token-prediction layers (dropped by every export)

    @property
    def key_dim(self) -> int:
        return self.key_head_dim * self.num_key_heads

    @property
    def value_dim(self) -> int:
        return self.value_head_dim * self.num_value_heads

    @property
    def conv_dim(self) -> int:
        """Channels of the conv (q, k and v together)."""
        return 2 * self.key_dim + self.value_dim

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"


def _object(cfg: dict, key: str, path: Path) -> dict:
    value = cfg.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(path, "missing or not an object", key)
    return value


def _pos(cfg: dict, key: str, path: Path, where: str, **kw: Any) -> int:
    return _positive(_get(cfg, key, path, where, **kw), path, where + key)


def _pair(raw: dict, key: str, path: Path, default: tuple[int, int]) -> tuple[int, int]:
    value = raw.get(key, list(default))
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise CheckpointError(path, f"expected two integers, got {value!r}", key)
    if tuple(value) != (2, 2):   # transformers' merger hard-codes 4 = 2 x 2 patches per merged token
        raise CheckpointError(path, f"{list(value)} is not supported (MiniCPM-V 4.6 merges 2x2 patches)", key)
    return (2, 2)


def _text_config(raw: dict, path: Path, facts: ModelFacts) -> LLMConfig:
    tc = _object(raw, "text_config", path)
    w = "text_config."
    num = (int, float)
    if tc.get("model_type") != TEXT_MODEL_TYPE:
        raise CheckpointError(path, f"expected {TEXT_MODEL_TYPE!r} (Qwen3.5), got {tc.get('model_type')!r}",
                              w + "model_type")
    hidden = _pos(tc, "hidden_size", path, w)
    n_layers = _pos(tc, "num_hidden_layers", path, w)
    if n_layers > MAX_LAYERS:
        raise CheckpointError(path, f"{n_layers} layers is more than {MAX_LAYERS}", w + "num_hidden_layers")
    n_heads = _pos(tc, "num_attention_heads", path, w)
    n_kv = _pos(tc, "num_key_value_heads", path, w)
    if n_heads % n_kv:
        raise CheckpointError(path, f"num_attention_heads {n_heads} is not a multiple of {n_kv}",
                              w + "num_key_value_heads")
    head_dim = _pos(tc, "head_dim", path, w)

    layer_types = tc.get("layer_types")
    if (not isinstance(layer_types, list) or len(layer_types) != n_layers
            or any(t not in LAYER_KINDS for t in layer_types)):
        raise CheckpointError(path, f"expected {n_layers} entries, each one of {', '.join(LAYER_KINDS)}",
                              w + "layer_types")
    rope = tc.get("rope_parameters") if isinstance(tc.get("rope_parameters"), dict) else {}
    partial = rope.get("partial_rotary_factor", tc.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, num) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise CheckpointError(path, f"expected a number in (0, 1], got {partial!r}", w + "partial_rotary_factor")
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim == 0:
        raise CheckpointError(path, f"head_dim {head_dim} x {partial} = {head_dim * partial} rotated dims is not a "
                              "positive even number", w + "partial_rotary_factor")
    rope_theta = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    if not isinstance(rope_theta, num) or isinstance(rope_theta, bool) or rope_theta <= 0:
        raise CheckpointError(path, f"expected a positive number, got {rope_theta!r}", w + "rope_parameters.rope_theta")
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(path, f"{rope.get('rope_type')!r} is not supported (Qwen3.5 uses default RoPE)",
                              w + "rope_parameters.rope_type")
    section = rope.get("mrope_section", [11, 11, 10])   # transformers' Qwen3.5 default
    if (not isinstance(section, list) or not 1 <= len(section) <= 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in section)):
        raise CheckpointError(path, f"expected up to 4 non-negative integers, got {section!r}",
                              w + "rope_parameters.mrope_section")

    linear = LinearAttentionConfig(
        layer_types=tuple(layer_types),
        conv_kernel=_pos(tc, "linear_conv_kernel_dim", path, w),
        key_head_dim=_pos(tc, "linear_key_head_dim", path, w),
        value_head_dim=_pos(tc, "linear_value_head_dim", path, w),
        num_key_heads=_pos(tc, "linear_num_key_heads", path, w),
        num_value_heads=_pos(tc, "linear_num_value_heads", path, w),
        attn_output_gate=bool(_get(tc, "attn_output_gate", path, w, default=True, kind=(bool,))),
        mrope_section=tuple(section),
        mtp_num_hidden_layers=_get(tc, "mtp_num_hidden_layers", path, w, default=0),
    )
    if linear.num_value_heads % linear.num_key_heads:
        raise CheckpointError(path, f"{linear.num_value_heads} is not a multiple of linear_num_key_heads "
                              f"{linear.num_key_heads}", w + "linear_num_value_heads")
    # The top level decides whether lm_head is tied (MiniCPMV4_6ForConditionalGeneration reads it there).
    tie = raw.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    if not isinstance(tie, bool):
        raise CheckpointError(path, f"expected true/false, got {tie!r}", "tie_word_embeddings")
    return LLMConfig(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=_pos(tc, "intermediate_size", path, w),
        vocab_size=_pos(tc, "vocab_size", path, w),
        max_position_embeddings=_pos(tc, "max_position_embeddings", path, w, default=32768),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(_get(tc, "rms_norm_eps", path, w, default=1e-6, kind=num)),
        tie_word_embeddings=tie,
        qkv_bias=bool(_get(tc, "attention_bias", path, w, default=False, kind=(bool,))),
        qk_norm=facts.llm_qk_norm,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        rotary_dim=rotary_dim,
        linear_attention=linear,
    )


def read_vision_config(raw: dict, path: Path, facts: ModelFacts) -> VisionConfig:
    """The SigLIP fields of a 4.6 config.json's `vision_config`, validated (also used by merger_tower)."""
    vc = _object(raw, "vision_config", path)
    w = "vision_config."
    if vc.get("model_type", facts.vision_model_type) != facts.vision_model_type:
        raise CheckpointError(path, f"expected {facts.vision_model_type!r}, got {vc.get('model_type')!r}",
                              w + "model_type")
    vision = VisionConfig(
        hidden_size=_pos(vc, "hidden_size", path, w),
        num_hidden_layers=_pos(vc, "num_hidden_layers", path, w),
        num_attention_heads=_pos(vc, "num_attention_heads", path, w),
        intermediate_size=_pos(vc, "intermediate_size", path, w),
        patch_size=_pos(vc, "patch_size", path, w, default=14),
        image_size=_pos(vc, "image_size", path, w, default=980),
        layer_norm_eps=float(_get(vc, "layer_norm_eps", path, w, default=1e-6, kind=(int, float))),
        hidden_act=_get(vc, "hidden_act", path, w, default="gelu_pytorch_tanh", kind=(str,)),
    )
    if vision.num_hidden_layers > MAX_LAYERS:
        raise CheckpointError(path, f"{vision.num_hidden_layers} layers is more than {MAX_LAYERS}",
                              w + "num_hidden_layers")
    if vision.hidden_size % vision.num_attention_heads:
        raise CheckpointError(path, f"hidden_size {vision.hidden_size} is not divisible by "
                              f"num_attention_heads {vision.num_attention_heads}", w + "num_attention_heads")
    return vision


def parse_native_config(raw: dict[str, Any], path: Path, facts: ModelFacts, preprocessor: dict[str, Any] | None,
                        preprocessor_path: Path) -> CheckpointConfig:
    """Validate a transformers-native (4.6) config.json (+ preprocessor_config.json) into the reader's config."""
    vision = read_vision_config(raw, path, facts)
    llm = _text_config(raw, path, facts)
    insert = _get(raw, "insert_layer_id", path, default=facts.insert_layer_id)
    if not 0 <= insert < vision.num_hidden_layers:
        raise CheckpointError(path, f"{insert} is not a layer of the {vision.num_hidden_layers}-layer ViT",
                              "insert_layer_id")
    _pair(raw, "merge_kernel_size", path, (2, 2))
    _pair(raw.get("vision_config", {}), "window_kernel_size", path, (2, 2))
    merger_times = _pos(raw, "merger_times", path, "", default=1)
    if merger_times > MAX_MERGER_TIMES:
        raise CheckpointError(path, f"{merger_times} is more than {MAX_MERGER_TIMES}", "merger_times")
    if raw.get("drop_vision_last_layer"):
        raise CheckpointError(path, "true is not supported: 4.6 uses all ViT layers", "drop_vision_last_layer")
    for key in ("image_token_id", "video_token_id"):
        token = raw.get(key)
        if token is not None and (not isinstance(token, int) or isinstance(token, bool)
                                  or not 0 <= token < llm.vocab_size):
            raise CheckpointError(path, f"{token!r} is not a token id below vocab_size {llm.vocab_size}", key)

    pp = preprocessor or {}
    slice_size = pp.get("scale_resolution", 448)
    patch = pp.get("patch_size", vision.patch_size)
    for key, value in (("scale_resolution", slice_size), ("patch_size", patch)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(preprocessor_path, f"expected a positive integer, got {value!r}", key)
    if patch != vision.patch_size:
        raise CheckpointError(preprocessor_path, f"{patch} disagrees with config.json ({vision.patch_size})",
                              "patch_size")
    if slice_size % patch:
        raise CheckpointError(preprocessor_path, f"{slice_size} is not a multiple of patch size {patch}",
                              "scale_resolution")
    pre = PreprocessConfig(
        slice_size=slice_size,
        patch_size=patch,
        max_slice_nums=int(pp.get("max_slice_nums", facts.max_slice_nums)),
        slice_mode=bool(pp.get("slice_mode", True)),
        use_image_id=bool(pp.get("use_image_id", facts.use_image_id)),
        # a full slice in the default 16x mode: (side / patch)^2 patches, 16 patches per token
        image_feature_size=(slice_size // patch) ** 2 // 16,
        norm_mean=tuple(float(x) for x in pp.get("image_mean", (0.5, 0.5, 0.5))),
        norm_std=tuple(float(x) for x in pp.get("image_std", (0.5, 0.5, 0.5))),
    )
    return CheckpointConfig(facts.version, facts, vision, llm, None, pre, raw)


def native_expected_tensors(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `MiniCPMV4_6ForConditionalGeneration.save_pretrained` writes for this config, with its shape."""
    v, llm = cfg.vision, cfg.llm
    lin = llm.linear_attention
    vp = cfg.facts.tensor_prefixes["vision"][0]
    d, inner = v.hidden_size, v.intermediate_size
    out: dict[str, tuple[int, ...]] = {
        vp + "embeddings.patch_embedding.weight": (d, 3, v.patch_size, v.patch_size),
        vp + "embeddings.patch_embedding.bias": (d,),
        vp + "embeddings.position_embedding.weight": (v.num_patches_per_side ** 2, d),
    }

    def attention_block(p: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}self_attn.{proj}.weight"] = (d, d)
            out[f"{p}self_attn.{proj}.bias"] = (d,)

    for i in range(v.num_hidden_layers):
        p = f"{vp}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + ln + ".weight"] = out[p + ln + ".bias"] = (d,)
        attention_block(p)
        out[p + "mlp.fc1.weight"] = (inner, d)
        out[p + "mlp.fc1.bias"] = (inner,)
        out[p + "mlp.fc2.weight"] = (d, inner)
        out[p + "mlp.fc2.bias"] = (d,)
    out[vp + "post_layernorm.weight"] = out[vp + "post_layernorm.bias"] = (d,)
    def merge_mlp(p: str, inner_width: int, out_width: int) -> None:
        """LayerNorm over 2x2 patches concatenated (4d), then Linear -> GELU -> Linear."""
        out[p + "pre_norm.weight"] = out[p + "pre_norm.bias"] = (4 * d,)
        out[p + "linear_1.weight"] = (inner_width, 4 * d)
        out[p + "linear_1.bias"] = (inner_width,)
        out[p + "linear_2.weight"] = (out_width, inner_width)
        out[p + "linear_2.bias"] = (out_width,)

    # window-attention merger after layer insert_layer_id: attention inside each 2x2 window, then the MLP
    p = vp + "vit_merger."
    attention_block(p)
    out[p + "layer_norm1.weight"] = out[p + "layer_norm1.bias"] = (d,)
    merge_mlp(p, 4 * inner, d)
    # final merger: `merger_times` 2x2 downsample MLPs, the last one projecting into the LLM
    mp = cfg.facts.tensor_prefixes["merger"][0]
    times = cfg.raw.get("merger_times", 1)
    for i in range(times):
        merge_mlp(f"{mp}mlp.{i}.", 4 * d, llm.hidden_size if i == times - 1 else d)

    lp = cfg.facts.tensor_prefixes["llm"][0]
    h, hd = llm.hidden_size, llm.head_dim
    out[lp + "embed_tokens.weight"] = (llm.vocab_size, h)
    for i in range(llm.num_hidden_layers):
        p = f"{lp}layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (h,)
        if lin.is_linear(i):
            a = p + "linear_attn."
            out[a + "in_proj_qkv.weight"] = (lin.conv_dim, h)
            out[a + "in_proj_z.weight"] = (lin.value_dim, h)
            out[a + "in_proj_a.weight"] = out[a + "in_proj_b.weight"] = (lin.num_value_heads, h)
            out[a + "conv1d.weight"] = (lin.conv_dim, 1, lin.conv_kernel)
            out[a + "A_log"] = out[a + "dt_bias"] = (lin.num_value_heads,)
            out[a + "norm.weight"] = (lin.value_head_dim,)
            out[a + "out_proj.weight"] = (h, lin.value_dim)
        else:
            a = p + "self_attn."
            q_rows = llm.num_attention_heads * hd * (2 if lin.attn_output_gate else 1)
            out[a + "q_proj.weight"] = (q_rows, h)
            out[a + "k_proj.weight"] = out[a + "v_proj.weight"] = (llm.num_key_value_heads * hd, h)
            out[a + "o_proj.weight"] = (h, llm.num_attention_heads * hd)
            out[a + "q_norm.weight"] = out[a + "k_norm.weight"] = (hd,)
            if llm.qkv_bias:
                out[a + "q_proj.bias"] = (q_rows,)
                out[a + "k_proj.bias"] = out[a + "v_proj.bias"] = (llm.num_key_value_heads * hd,)
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (llm.intermediate_size, h)
        out[p + "mlp.down_proj.weight"] = (h, llm.intermediate_size)
    out[lp + "norm.weight"] = (h,)
    if not llm.tie_word_embeddings:
        out["lm_head.weight"] = (llm.vocab_size, h)
    return out
