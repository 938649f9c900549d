"""MiniCPM-V 4.6 reference for the vision tests: transformers' own MiniCPMV4_6ForConditionalGeneration.

A small random model is built from a MiniCPMV4_6Config and written with `save_pretrained`, so the folder has
the hub layout by construction (model.vision_tower.* incl. vit_merger.*, model.merger.*, model.language_model.*).
Every parameter is re-drawn from a seeded normal (LayerNorm weights around 1, biases non-zero): the default
init leaves biases at zero and LayerNorms at identity, which would hide a missing bias or a swapped norm.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Small but structurally complete: 4 ViT layers with the window merger after layer 1, head_dim 16, a 70x70
# position table (image_size 980 / patch 14, as the real model). LLM width 256 (!= vision width 64) equals the
# tiny 4.5 synthetic's, so llama.cpp's mtmd accepts that GGUF as the text model of our 4.6 mmproj.
VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=14,
              image_size=980, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
TEXT = dict(model_type="qwen3_5_text", vocab_size=512, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
            layer_types=["linear_attention", "full_attention"], tie_word_embeddings=True)
INSERT_LAYER_ID = 1


def build_model(seed: int = 0):
    """A random transformers MiniCPMV4_6ForConditionalGeneration (fp32, eager attention, eval mode)."""
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    cfg = MiniCPMV4_6Config(vision_config=dict(VISION), text_config=dict(TEXT), insert_layer_id=INSERT_LAYER_ID,
                            image_token_id=500, video_token_id=501, downsample_mode="16x")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MiniCPMV4_6ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "position_embedding" in name or name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:                                         # weights: keep activations O(1) through the layers
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(noise / np.sqrt(fan_in))
    return model


def write_checkpoint(out: Path, seed: int = 0) -> Path:
    """`save_pretrained` of `build_model(seed)` into `out` (safetensors, config.json)."""
    build_model(seed).save_pretrained(out)
    return out


def image_features(model, slices, downsample_mode: str) -> list[np.ndarray]:
    """transformers `get_image_features(...).pooler_output` for normalised slices [3, H, W] packed as its processor
    packs them (reshape_by_patch, concatenated): one [tokens, D] array per slice."""
    import torch

    from minicpmv_edge.runtime.preprocess import reshape_by_patch

    p = model.config.vision_config.patch_size
    pv = np.concatenate([reshape_by_patch(s, p) for s in slices], axis=-1)[None]
    sizes = torch.tensor([[s.shape[1] // p, s.shape[2] // p] for s in slices], dtype=torch.int32)
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(pv), sizes, downsample_mode=downsample_mode)
    return [t.numpy() for t in out.pooler_output]
