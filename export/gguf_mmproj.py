"""The vision tower + resampler as a llama.cpp `mmproj` GGUF (clip/mtmd), so the export also runs in
llama.cpp and ollama.

Layout of the legacy MiniCPM-V converter, which every published MiniCPM-V mmproj follows and which
llama.cpp's clip loader reads (tools/mtmd/clip.cpp, clip-impl.h):
- `clip.projector_type = "resampler"`, `clip.minicpmv_version` from the facts table, `clip.minicpmv_query_num`;
- `mlp.fc1` is stored as `ffn_down` and `mlp.fc2` as `ffn_up` (swapped; the loader un-swaps when
  `ffn_down.ne[0] == n_embd`, and older loaders expect this naming);
- `resampler.proj.weight` holds `proj` transposed, so `ggml_mul_mat` computes `x @ proj`;
- `resampler.pos_embed_k`, a 70×70 2-D sincos table, must be present although the graph recomputes it.
Tensor names follow the loader's own macros; gguf-py spells one of them differently
(`resampler.pos_embd_k`), so the names below are the loader's, in one table.

MiniCPM-V 4.6 has its own projector, `clip.projector_type = "minicpmv4_6"` (`clip_graph_minicpmv4_6` in
llama.cpp's tools/mtmd/models/minicpmv.cpp; its HF converter is conversion/minicpm.py MiniCPMV4_6VisionModel):
- `clip.vision.projector.scale_factor` = patches merged per side (4 for "16x", 2 for "4x"); one file serves one
  mode, and a "4x" file carries no `v.vit_merger.*` tensors;
- `clip.vision.wa_layer_indexes` = [insert_layer_id] (the window merger runs after that layer);
- `clip.vision.image_size` = the slice size (preprocessor scale_resolution, 448), not the 980 of the position
  table: clip uses it as its slicing resolution;
- `mlp.fc1`/`fc2` keep their own names (`ffn_up`/`ffn_down`); the final merger is `mm.input_norm`, `mm.up`,
  `mm.down` (one merge round only: llama.cpp has no second one); no resampler tensors at all.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

from minicpmv_edge.runtime.resampler import sincos_2d

from .checkpoint import Checkpoint
from .merger_tower import MERGER_PREFIX, VISION_PREFIX, MergerCheckpoint

# MiniCPM-V keys that gguf-py's Keys table lacks (clip-impl.h KEY_MINICPMV_*).
KEY_MINICPMV_VERSION = "clip.minicpmv_version"
KEY_MINICPMV_QUERY_NUM = "clip.minicpmv_query_num"
KEY_HAS_MINICPMV_PROJECTOR = "clip.has_minicpmv_projector"

# checkpoint name (after "vpm."/"resampler.") -> mmproj name; {i} = layer index
_VIT_NAMES = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "post_layernorm.weight": "v.post_ln.weight",
    "post_layernorm.bias": "v.post_ln.bias",
}
_VIT_LAYER_NAMES = {
    "layer_norm1": "ln1", "layer_norm2": "ln2",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "mlp.fc1": "ffn_down",   # legacy swapped naming, see the module docstring
    "mlp.fc2": "ffn_up",
}
_RESAMPLER_NAMES = {
    "query": "resampler.query",
    "kv_proj.weight": "resampler.kv.weight",
    "attn.out_proj.weight": "resampler.attn.out.weight",
    "attn.out_proj.bias": "resampler.attn.out.bias",
    "ln_q.weight": "resampler.ln_q.weight", "ln_q.bias": "resampler.ln_q.bias",
    "ln_kv.weight": "resampler.ln_kv.weight", "ln_kv.bias": "resampler.ln_kv.bias",
    "ln_post.weight": "resampler.ln_post.weight", "ln_post.bias": "resampler.ln_post.bias",
    "proj": "resampler.proj.weight",   # stored transposed
}
POS_EMBED_K = "resampler.pos_embed_k"
KEY_WA_LAYER_INDEXES = "clip.vision.wa_layer_indexes"   # gguf 0.19's Keys table lacks it (clip-impl.h)

# MiniCPM-V 4.6: checkpoint name after "model.vision_tower." / "model.merger." -> mmproj name (leaf appended)
_V46_VIT_NAMES = {
    "embeddings.patch_embedding": "v.patch_embd",
    "embeddings.position_embedding": "v.position_embd",
    "post_layernorm": "v.post_ln",
    "vit_merger.layer_norm1": "v.vit_merger.ln1",
    "vit_merger.self_attn.q_proj": "v.vit_merger.attn_q",
    "vit_merger.self_attn.k_proj": "v.vit_merger.attn_k",
    "vit_merger.self_attn.v_proj": "v.vit_merger.attn_v",
    "vit_merger.self_attn.out_proj": "v.vit_merger.attn_out",
    "vit_merger.pre_norm": "v.vit_merger.ds_ln",
    "vit_merger.linear_1": "v.vit_merger.ds_ffn_up",
    "vit_merger.linear_2": "v.vit_merger.ds_ffn_down",
}
_V46_LAYER_NAMES = dict(_VIT_LAYER_NAMES, **{"mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"})
_V46_MERGER_NAMES = {"mlp.0.pre_norm": "mm.input_norm", "mlp.0.linear_1": "mm.up", "mlp.0.linear_2": "mm.down"}
MMPROJ_TYPES = ("F32", "F16", "Q8_0", "Q6_K")


def mmproj_tensors(ckpt: Checkpoint) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(mmproj name, loader) for every tensor, in file order."""
    out: list[tuple[str, Callable[[], np.ndarray]]] = []

    def take(src: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        return lambda: transform(ckpt.tensor(src)) if transform else ckpt.tensor(src)

    for name in ckpt.names("vision"):
        short = name[len("vpm."):]
        if short in _VIT_NAMES:
            out.append((_VIT_NAMES[short], take(name)))
            continue
        # encoder.layers.{i}.<module>.<weight|bias>
        parts = short.split(".")
        if parts[:2] != ["encoder", "layers"]:
            raise MiniCPMVEdgeError(f"{ckpt.root}: no mmproj name for vision tensor {name}")
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module not in _VIT_LAYER_NAMES:
            raise MiniCPMVEdgeError(f"{ckpt.root}: no mmproj name for vision tensor {name}")
        out.append((f"v.blk.{parts[2]}.{_VIT_LAYER_NAMES[module]}.{leaf}", take(name)))

    d = ckpt.resampler.embed_dim
    for name in ckpt.names("resampler"):
        short = name[len("resampler."):]
        if short.startswith("attn.in_proj_"):       # packed q|k|v -> three tensors
            leaf = "weight" if short.endswith("weight") else "bias"
            for k, part in enumerate("qkv"):
                out.append((f"resampler.attn.{part}.{leaf}", take(name, lambda w, k=k: w[k * d:(k + 1) * d])))
        elif short == "proj":
            out.append((_RESAMPLER_NAMES[short], take(name, lambda w: np.ascontiguousarray(w.T))))
        elif short in _RESAMPLER_NAMES:
            out.append((_RESAMPLER_NAMES[short], take(name)))
        else:
            raise MiniCPMVEdgeError(f"{ckpt.root}: no mmproj name for resampler tensor {name}")
    if "resampler.kv_proj.weight" not in ckpt.tensors:   # widths equal: the HF code uses an identity
        out.append((_RESAMPLER_NAMES["kv_proj.weight"], lambda: np.eye(d, dtype=np.float32)))
    side = ckpt.vision.num_patches_per_side
    out.append((POS_EMBED_K, lambda: sincos_2d(d, side, side)))
    return out


def merger_mmproj_tensors(ckpt: MergerCheckpoint, downsample_mode: str
                          ) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(mmproj name, loader) for every tensor of a 4.6 mmproj in `downsample_mode`, in checkpoint order."""
    if ckpt.vision.merger_times != 1:
        raise MiniCPMVEdgeError(f"{ckpt.root}: merger_times {ckpt.vision.merger_times}: llama.cpp's minicpmv4_6 "
                                "projector has one merge round only")
    skip_window_merger = ckpt.facts.downsample_side(downsample_mode) != 4
    out: list[tuple[str, Callable[[], np.ndarray]]] = []
    for name in ckpt.names():
        module, leaf = name.rsplit(".", 1)
        if module.startswith(VISION_PREFIX):
            short = module[len(VISION_PREFIX):]
            if short.startswith("vit_merger.") and skip_window_merger:
                continue
            parts = short.split(".")
            if short in _V46_VIT_NAMES:
                target = _V46_VIT_NAMES[short]
            elif parts[:2] == ["encoder", "layers"] and ".".join(parts[3:]) in _V46_LAYER_NAMES:
                target = f"v.blk.{parts[2]}.{_V46_LAYER_NAMES['.'.join(parts[3:])]}"
            else:
                raise MiniCPMVEdgeError(f"{ckpt.root}: no mmproj name for vision tensor {name}")
        else:
            target = _V46_MERGER_NAMES.get(module[len(MERGER_PREFIX):])
            if target is None:
                raise MiniCPMVEdgeError(f"{ckpt.root}: no mmproj name for merger tensor {name}")
        out.append((f"{target}.{leaf}", lambda name=name: ckpt.tensor(name)))
    return out


def _stored_type(name: str, data: np.ndarray, out_type: str) -> gguf.GGMLQuantizationType:
    """What clip.cpp expects: 1-D tensors, the query and the sincos table f32; the patch conv at least f16
    (ggml's im2col path); Q8_0 only where rows are a multiple of its 32-element block, Q6_K of 256."""
    if data.ndim < 2 or name in (_RESAMPLER_NAMES["query"], POS_EMBED_K) or out_type == "F32":
        return gguf.GGMLQuantizationType.F32
    quantizable = data.ndim == 2 and name != "v.position_embd.weight"
    if out_type == "Q6_K" and quantizable and data.shape[-1] % 256 == 0:
        return gguf.GGMLQuantizationType.Q6_K
    # Q6_K falls back to Q8_0 where rows are not whole 256-value blocks (SigLIP's 1152-wide rows)
    if out_type in ("Q8_0", "Q6_K") and quantizable and data.shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def write_mmproj_gguf(ckpt: Checkpoint | MergerCheckpoint, out: str | Path, out_type: str = "F16",
                      on_tensor: Callable[[str, int], None] | None = None, *,
                      downsample_mode: str | None = None) -> Path:
    """Write the mmproj GGUF (temporary name, renamed when complete). A 4.6 checkpoint gets the `minicpmv4_6`
    projector in `downsample_mode` (default: the checkpoint's own)."""
    if out_type not in MMPROJ_TYPES:
        raise MiniCPMVEdgeError(f"unknown mmproj type {out_type!r} (choose {', '.join(MMPROJ_TYPES)})")
    facts, v = ckpt.facts, ckpt.vision
    merger = isinstance(ckpt, MergerCheckpoint)
    if merger:
        mode = downsample_mode or v.downsample_mode
        tensors = merger_mmproj_tensors(ckpt, mode)
        slice_size, mean, std = v.slice_size, v.norm_mean, v.norm_std
    else:
        if facts.mmproj_version is None or facts.mmproj_projector_type != "resampler":
            raise MiniCPMVEdgeError(f"MiniCPM-V {facts.version} has no llama.cpp resampler mmproj layout")
        tensors = mmproj_tensors(ckpt)
        pre = ckpt.preprocess
        slice_size, mean, std = pre.slice_size, pre.norm_mean, pre.norm_std
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "clip")
    try:
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
        w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q6_K": 18}[out_type])
        w.add_name(f"MiniCPM-V-{facts.version} vision")
        w.add_description("image encoder for MiniCPM-V")
        w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, facts.mmproj_projector_type)
        if merger:
            w.add_uint32(gguf.Keys.ClipVision.Projector.SCALE_FACTOR, facts.downsample_side(mode))
            w.add_array(KEY_WA_LAYER_INDEXES, [v.insert_layer_id])
            w.add_uint32(gguf.Keys.ClipVision.PROJECTION_DIM, v.llm_hidden_size)
        else:
            w.add_bool(KEY_HAS_MINICPMV_PROJECTOR, True)
            w.add_int32(KEY_MINICPMV_VERSION, facts.mmproj_version)
            w.add_uint32(KEY_MINICPMV_QUERY_NUM, ckpt.resampler.query_num)
            w.add_uint32(gguf.Keys.ClipVision.PROJECTION_DIM, 0)
        w.add_uint32(gguf.Keys.ClipVision.IMAGE_SIZE, slice_size)
        w.add_uint32(gguf.Keys.ClipVision.PATCH_SIZE, v.patch_size)
        w.add_uint32(gguf.Keys.ClipVision.EMBEDDING_LENGTH, v.hidden_size)
        w.add_uint32(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH, v.intermediate_size)
        w.add_uint32(gguf.Keys.ClipVision.Attention.HEAD_COUNT, v.num_attention_heads)
        w.add_float32(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS, v.layer_norm_eps)
        w.add_uint32(gguf.Keys.ClipVision.BLOCK_COUNT, v.num_hidden_layers)
        w.add_array(gguf.Keys.ClipVision.IMAGE_MEAN, list(mean))
        w.add_array(gguf.Keys.ClipVision.IMAGE_STD, list(std))
        w.add_bool(gguf.Keys.ClipVision.USE_GELU, True)
        # mmproj files are small (~1 GB at most): build them in memory, then write once
        for name, load in tensors:
            data = load()
            qtype = _stored_type(name, data, out_type)
            if qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
            elif qtype == gguf.GGMLQuantizationType.Q6_K:   # gguf-py has no K-quant encoder: ggml's own
                from .ggml_lib import quantize_rows
                w.add_tensor(name, quantize_rows(data, int(qtype)), raw_dtype=qtype)
            else:
                w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            if on_tensor:
                on_tensor(name, data.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    return out
