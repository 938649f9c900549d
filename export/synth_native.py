"""Synthetic transformers-native MiniCPM-V checkpoints (4.6), written by transformers itself.

The weights file and config.json come from `MiniCPMV4_6ForConditionalGeneration(config).save_pretrained()`,
so names, shapes, nesting and the tied lm_head are the hub's by construction; we only choose the dimensions,
give the weights sane random values (seeded, unit-variance activations, clear greedy top-1), and add our
tokenizer files, generation_config.json and preprocessor_config.json. `synth.py` calls `build_native_config`
for the plan and `write_native_checkpoint` for the weights.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import HybridLLMDims, LLMDims, ModelFacts, VisionDims

# Tiny: small enough for tests in seconds, but every kind of layer is there: 3 gated-delta-net layers and a
# full-attention layer (with its output gate and partial rotary), and a ViT deep enough to put the window
# merger after a middle layer. Widths of 256 let K-quants (256-element blocks) apply.
TINY_VISION = VisionDims(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
TINY_INSERT_LAYER_ID = 1
TINY_LLM = LLMDims(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   intermediate_size=512, vocab_size=0, max_position_embeddings=4096, rope_theta=10_000_000.0,
                   tie_word_embeddings=True)
TINY_HYBRID = HybridLLMDims(layer_pattern=("linear_attention",) * 3 + ("full_attention",), linear_conv_kernel_dim=4,
                            linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4,
                            linear_num_value_heads=4, partial_rotary_factor=0.25, attn_output_gate=True,
                            mtp_num_hidden_layers=1)
DEFAULT_MROPE_SECTION = [11, 11, 10]   # transformers' Qwen3.5 default, written only when it differs
TOP_IMAGE_SIZE = 1120                  # config.json "image_size" of the real checkpoint


def native_dims(facts: ModelFacts, size: str) -> tuple[VisionDims, LLMDims, HybridLLMDims, int]:
    """(vision, LLM, hybrid-attention dims, insert_layer_id) of a synthetic 4.6 checkpoint."""
    if size == "tiny":
        return TINY_VISION, TINY_LLM, TINY_HYBRID, TINY_INSERT_LAYER_ID
    if size == "full":
        if facts.llm_dims is None or facts.llm_hybrid_dims is None or facts.insert_layer_id is None:
            raise MiniCPMVEdgeError(f"the facts table has no real dimensions for MiniCPM-V {facts.version}")
        return facts.vision_dims, facts.llm_dims, facts.llm_hybrid_dims, facts.insert_layer_id
    raise MiniCPMVEdgeError(f"size {size!r} is not defined for MiniCPM-V {facts.version} (choose tiny or full)")


def _mrope_section(rotary_dim: int) -> list[int]:
    """t/h/w sections covering the rotary frequencies, split as evenly as Qwen's [11, 11, 10] for 32."""
    n = rotary_dim // 2
    base, rest = divmod(n, 3)
    return [base + (rest > 0), base + (rest > 1), base]


def build_native_config(facts: ModelFacts, size: str, vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """config.json content with the fields the real 4.6 config carries (the nested layout)."""
    vision, llm, hyb, insert = native_dims(facts, size)
    pattern = hyb.layer_pattern
    if llm.num_hidden_layers % len(pattern):
        raise MiniCPMVEdgeError(f"{llm.num_hidden_layers} layers is not a whole number of {len(pattern)}-layer "
                                "linear/full attention groups")
    rotary_dim = int(llm.head_dim * hyb.partial_rotary_factor)
    rope = {"partial_rotary_factor": hyb.partial_rotary_factor, "rope_theta": llm.rope_theta, "rope_type": "default"}
    if _mrope_section(rotary_dim) != DEFAULT_MROPE_SECTION:
        rope["mrope_section"] = _mrope_section(rotary_dim)
    text = {
        "model_type": "qwen3_5_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": hyb.attn_output_gate,
        "full_attention_interval": len(pattern),
        "head_dim": llm.head_dim,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "layer_types": list(pattern) * (llm.num_hidden_layers // len(pattern)),
        "linear_conv_kernel_dim": hyb.linear_conv_kernel_dim,
        "linear_key_head_dim": hyb.linear_key_head_dim,
        "linear_num_key_heads": hyb.linear_num_key_heads,
        "linear_num_value_heads": hyb.linear_num_value_heads,
        "linear_value_head_dim": hyb.linear_value_head_dim,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": llm.max_position_embeddings,
        "mlp_only_layers": [],
        "mtp_num_hidden_layers": hyb.mtp_num_hidden_layers,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "partial_rotary_factor": hyb.partial_rotary_factor,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_parameters": rope,
        "vocab_size": vocab_size,
        "tie_word_embeddings": llm.tie_word_embeddings,
    }
    return {
        "architectures": ["MiniCPMV4_6ForConditionalGeneration"],
        "model_type": facts.hf_model_type,
        "bos_token_id": None,
        "eos_token_id": token_ids["eos"],
        "pad_token_id": None,
        "drop_vision_last_layer": False,
        "image_size": TOP_IMAGE_SIZE,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "use_cache": True,
        "vision_config": {
            "model_type": facts.vision_model_type,
            "attention_dropout": 0.0,
            "hidden_act": vision.hidden_act,
            "hidden_size": vision.hidden_size,
            "image_size": vision.image_size,
            "intermediate_size": vision.intermediate_size,
            "layer_norm_eps": vision.layer_norm_eps,
            "num_attention_heads": vision.num_attention_heads,
            "num_channels": 3,
            "num_hidden_layers": vision.num_hidden_layers,
            "patch_size": vision.patch_size,
        },
        "text_config": text,
        "insert_layer_id": insert,
        "image_token_id": token_ids["image_pad"],
        "video_token_id": token_ids["video_pad"],
    }


def build_native_preprocessor_config(facts: ModelFacts, vision: VisionDims) -> dict[str, Any]:
    """preprocessor_config.json with the real 4.6 keys."""
    return {
        "image_processor_type": "MiniCPMV4_6ImageProcessor",
        "processor_class": "MiniCPMV4_6Processor",
        "max_slice_nums": facts.max_slice_nums,
        "scale_resolution": 448,
        "patch_size": vision.patch_size,
        "use_image_id": facts.use_image_id,
        "slice_mode": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def native_token_ids(facts: ModelFacts, added: dict[str, int]) -> dict[str, int]:
    """Ids config.json and generation_config.json name, resolved from our tokenizer's added tokens."""
    tokens = facts.special_tokens
    return {"eos": added["<|endoftext|>"], "im_end": added["<|im_end|>"], "pad": added["<|endoftext|>"],
            "image_pad": added[tokens["image_pad"]], "video_pad": added[tokens["video_pad"]]}


# --------------------------------------------------------------------------------------------- weights

# RMSNorms of Qwen3.5 scale by (1 + weight): their weights sit near 0. The gated norm inside the delta-net
# layers and every LayerNorm of the vision side scale by the weight itself.
def _zero_centred(name: str) -> bool:
    return ".language_model." in name and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight")


def _init(name: str, shape: tuple[int, ...]) -> tuple[float, float] | None:
    """(mean, std) for a parameter, or None to keep the value the constructor gave it (A_log, dt_bias)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("A_log", "dt_bias")):
        return None
    if "norm" in name.rsplit(".", 2)[-2] or "layernorm" in name or "layer_norm" in name:
        if leaf == "bias":
            return 0.0, 0.02
        return (0.0, 0.1) if _zero_centred(name) else (1.0, 0.1)
    if leaf == "bias":
        return 0.0, 0.02
    if name.endswith("position_embedding.weight"):
        return 0.0, 0.5
    if name.endswith("embed_tokens.weight"):
        # also the tied lm_head: logits of std ~2, a clear top-1 for greedy parity without a saturated softmax
        # (the first RMSNorm makes the input scale irrelevant)
        return 0.0, 2.0 / np.sqrt(shape[1])
    if name.endswith("conv1d.weight"):
        return 0.0, 1.0 / np.sqrt(shape[-1])
    if name.endswith("patch_embedding.weight"):
        return 0.0, 1.0 / np.sqrt(np.prod(shape[1:]))
    return 0.0, 1.0 / np.sqrt(shape[-1])     # Linear weight [out, in]


def _fill(param: Any, name: str, seed: int, live_rows: int | None, chunk_elements: int) -> None:
    """Seeded values for one parameter, generated in row blocks (the 248k x 1024 embedding never exists twice
    in float32); rows from `live_rows` on stay zero (vocabulary padding no token uses)."""
    import torch

    mean_std = _init(name, tuple(param.shape))
    if mean_std is None:
        return
    mean, std = mean_std
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(param.shape)
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, chunk_elements // row)
    total = shape[0] if shape else 1
    with torch.no_grad():
        for start in range(0, total, rows):
            n = min(rows, total - start)
            block = rng.standard_normal((n, *shape[1:]), dtype=np.float32) * np.float32(std) + np.float32(mean)
            if live_rows is not None and start + n > live_rows:
                block[max(live_rows - start, 0):] = 0.0
            param[start:start + n].copy_(torch.from_numpy(block))


def write_native_checkpoint(config: dict[str, Any], folder: Path, *, seed: int, n_tokens: int,
                            shard_bytes: int, chunk_elements: int,
                            on_tensor: Callable[[str, int], None] | None = None) -> None:
    """Build the model with transformers, give it our seeded weights, and `save_pretrained` it (bf16)."""
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration
    from transformers.initialization import no_init_weights

    cfg = MiniCPMV4_6Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)             # the values we keep from the constructors (A_log, dt_bias) stay seeded
    # built directly in bf16 (the full model is 1.3 B parameters: 2.6 GB, not 5.2 GB in f32), and without
    # transformers' weight init, which _fill replaces anyway
    with no_init_weights():
        model = MiniCPMV4_6ForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    model.tie_weights()                 # skipped with the init; the hub's lm_head is the embedding
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise MiniCPMVEdgeError("transformers did not tie lm_head to the embeddings")
    for name, param in model.named_parameters():   # tied lm_head is the embedding: listed once
        live = n_tokens if name.endswith("embed_tokens.weight") else None
        _fill(param, name, seed, live, chunk_elements)
        if on_tensor:
            on_tensor(name, param.numel() * param.element_size())
    model.save_pretrained(str(folder), max_shard_size=shard_bytes)
    del model


def check_saved_layout(folder: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The reader's tensor list must be exactly what transformers wrote (a guard against drift either way)."""
    from .checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder)
    extra = sorted(set(ckpt.tensors) - set(expected))
    if extra:
        raise MiniCPMVEdgeError(f"transformers wrote tensors the reader does not expect: {extra[:5]}")


__all__ = ["native_dims", "build_native_config", "build_native_preprocessor_config", "native_token_ids",
           "write_native_checkpoint", "check_saved_layout"]
