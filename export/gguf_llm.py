"""MiniCPM-V language model -> GGUF for llama.cpp (F32, F16, BF16).

The LLM tensors become llama.cpp's `qwen2` / `qwen3` / `llama` / `qwen35` architecture (the facts table says
which); every hyperparameter comes from config.json; tensor names come from gguf-py's own tables
(`gguf.get_tensor_name_map`), never spelled here. 4.6's Qwen3.5 hybrid (gated delta net + gated full
attention) needs a few value changes on the way, the ones llama.cpp's own converter makes: see
`_hybrid_tensor`. Its `mtp.*` head is not exported. The tokenizer metadata is written by
`gguf_tokenizer.add_tokenizer`. Quantized sizes are made from the F16 file by `quantize.gguf_ladder`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

from .checkpoint import Checkpoint
from .gguf_tokenizer import add_tokenizer

F32 = gguf.GGMLQuantizationType.F32
# output type -> (on-disk type of 2-D+ weights, gguf file type)
FLOAT_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


def _arch(ckpt: Checkpoint) -> gguf.MODEL_ARCH:
    name = ckpt.facts.llm_gguf_arch
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise MiniCPMVEdgeError(f"gguf {gguf.__version__} has no architecture named {name!r}")


def _permute_for_llama_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama stores q/k rows for rotate-half RoPE; llama.cpp's `llama` arch rotates adjacent pairs.
    Reorder each head's rows [first half | second half] -> interleaved (qwen2/qwen3 use NEOX RoPE and
    need no reordering)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_hparams(w: gguf.GGUFWriter, ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> None:
    llm = ckpt.llm
    w.add_name(f"MiniCPM-V-{ckpt.version} LLM")
    w.add_context_length(llm.max_position_embeddings)
    w.add_embedding_length(llm.hidden_size)
    w.add_block_count(llm.num_hidden_layers)
    w.add_feed_forward_length(llm.intermediate_size)
    w.add_head_count(llm.num_attention_heads)
    w.add_head_count_kv(llm.num_key_value_heads)
    w.add_key_length(llm.head_dim)
    w.add_value_length(llm.head_dim)
    w.add_rope_dimension_count(llm.rotary_dim or llm.head_dim)   # partial rotary (4.6): the rotated share
    w.add_rope_freq_base(llm.rope_theta)
    w.add_layer_norm_rms_eps(llm.rms_norm_eps)
    w.add_vocab_size(llm.vocab_size)
    w.add_file_type(file_type)
    if llm.scale_emb is not None:
        raise MiniCPMVEdgeError("muP-scaled (scale_emb) LLMs are not exported yet: no supported version uses one")
    lin = llm.linear_attention
    if lin is not None:
        # qwen35 rotates in interleaved M-RoPE sections (t, h, w, -); text positions are equal in every
        # section, so the split only matters for multi-axis positions.
        w.add_rope_dimension_sections([*lin.mrope_section, *[0] * (4 - len(lin.mrope_section))])
        w.add_ssm_conv_kernel(lin.conv_kernel)
        w.add_ssm_state_size(lin.key_head_dim)
        w.add_ssm_group_count(lin.num_key_heads)
        w.add_ssm_time_step_rank(lin.num_value_heads)
        w.add_ssm_inner_size(lin.value_dim)
        w.add_full_attention_interval(_full_attention_interval(lin.layer_types))


def _rope_factors(ckpt: Checkpoint) -> np.ndarray | None:
    """LongRoPE (4.0): llama.cpp divides each rotary frequency by `rope_freqs[i]`, which is what
    transformers does with `short_factor` while the context is within the original length."""
    scaling = ckpt.config.raw.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if not rope_type:
        return None
    if rope_type != "longrope":
        raise MiniCPMVEdgeError(f"rope_scaling type {rope_type!r} is not supported by the GGUF export")
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    if short != long:
        # llama.cpp's llama arch has one factor table; different long factors would change long contexts.
        raise MiniCPMVEdgeError("rope_scaling: long_factor differs from short_factor; llama.cpp's llama "
                                "architecture holds a single factor table")
    if float(scaling.get("factor", 1.0)) > 1.0:
        raise MiniCPMVEdgeError("rope_scaling.factor > 1 (LongRoPE attention scaling) is not supported")
    factors = np.asarray(short, dtype=np.float32)
    if factors.shape != (ckpt.llm.head_dim // 2,):
        raise MiniCPMVEdgeError(f"rope_scaling.short_factor has {factors.size} values, expected head_dim/2 = "
                                f"{ckpt.llm.head_dim // 2}")
    return factors


def _full_attention_interval(layer_types: tuple[str, ...]) -> int:
    """llama.cpp's qwen35 marks layer i recurrent unless (i + 1) % interval == 0: the layout must be periodic."""
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    interval = full[0] + 1 if full else 0
    if not full or full != list(range(interval - 1, len(layer_types), interval)):
        raise MiniCPMVEdgeError(f"text_config.layer_types {list(layer_types)} is not one full-attention layer every "
                                "N layers (the only layout llama.cpp's qwen35 reads)")
    return interval


def _check_hybrid(ckpt: Checkpoint) -> None:
    """What llama.cpp's qwen35 graph assumes of the gated delta net."""
    lin = ckpt.llm.linear_attention
    if lin.key_head_dim != lin.value_head_dim:
        raise MiniCPMVEdgeError(f"{ckpt.root}: linear_key_head_dim {lin.key_head_dim} != linear_value_head_dim "
                                f"{lin.value_head_dim}; llama.cpp's qwen35 uses one state size for both")
    if lin.num_key_heads != lin.num_value_heads:
        raise MiniCPMVEdgeError(f"{ckpt.root}: linear_num_value_heads {lin.num_value_heads} != linear_num_key_heads "
                                f"{lin.num_key_heads} is not exported yet (llama.cpp would need the V heads "
                                "reordered; MiniCPM-V 4.6 has equal counts)")
    if not lin.attn_output_gate:
        raise MiniCPMVEdgeError(f"{ckpt.root}: attn_output_gate false: llama.cpp's qwen35 always gates attention")


def _hybrid_tensor(hf_name: str, data: np.ndarray) -> tuple[str, np.ndarray]:
    """Qwen3.5 tensors as llama.cpp's qwen35 wants them (the changes its HF converter makes):
    - A_log holds log(-A): llama.cpp stores A itself, -exp(A_log);
    - dt_bias is the bias of the dt projection (gguf-py knows it as `dt_proj.bias`);
    - conv1d weights [channels, 1, kernel] lose the singleton axis;
    - Qwen3.5's RMSNorms scale by (1 + weight), llama.cpp's by weight: add 1 (not the delta net's gated norm,
      which scales by its weight)."""
    if hf_name.endswith(".A_log"):
        return hf_name, -np.exp(data)
    if hf_name.endswith(".dt_bias"):
        return hf_name[:-len(".dt_bias")] + ".dt_proj.bias", data
    if hf_name.endswith(".conv1d.weight"):
        return hf_name, data.reshape(data.shape[0], data.shape[-1])
    if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
        return hf_name, data + np.float32(1.0)
    return hf_name, data


def _disk_layout(shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType
                 ) -> tuple[tuple[int, ...], np.dtype, gguf.GGMLQuantizationType | None]:
    """(shape, numpy dtype, raw ggml type) of a tensor as `_encode` writes it."""
    if len(shape) < 2 or weight_type == gguf.GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32), None
    if weight_type == gguf.GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16), None
    return (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), weight_type   # BF16 as raw bytes


def _encode(data: np.ndarray, weight_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """On-disk form of one tensor: llama.cpp keeps 1-D tensors (norms, biases) in f32 in every file type."""
    if data.ndim < 2 or weight_type == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if weight_type == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), weight_type)  # bytes (BF16)


def write_llm_gguf(ckpt: Checkpoint, out: str | Path, out_type: str = "F16",
                   on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Write the LLM of `ckpt` as one GGUF file, streaming one tensor at a time (an 8B model is never
    held in memory), to a temporary name renamed when complete."""
    if out_type not in FLOAT_TYPES:
        raise MiniCPMVEdgeError(f"unknown GGUF float type {out_type!r} (choose {', '.join(FLOAT_TYPES)})")
    weight_type, file_type = FLOAT_TYPES[out_type]
    arch = _arch(ckpt)
    llm = ckpt.llm
    tmap = gguf.get_tensor_name_map(arch, llm.num_hidden_layers)

    hybrid = llm.linear_attention is not None
    if hybrid:
        _check_hybrid(ckpt)
    # (gguf name, function producing the float32 data, shape, keep in f32) in file order
    plan: list[tuple[str, Callable[[], np.ndarray], tuple[int, ...], bool]] = []
    factors = _rope_factors(ckpt)
    if factors is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", lambda: factors, factors.shape,
                     True))
    for name in ckpt.names("llm"):
        hf_name = ckpt.causal_lm_name(name)
        shape = ckpt.tensors[name].shape
        if hybrid:
            hf_name, _ = _hybrid_tensor(hf_name, np.zeros(0, np.float32))
            if hf_name.endswith(".conv1d.weight"):
                shape = (shape[0], shape[-1])
        gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MiniCPMVEdgeError(f"{ckpt.root}: cannot map tensor {name} to a llama.cpp "
                                    f"{gguf.MODEL_ARCH_NAMES[arch]} tensor")
        heads = None
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = llm.num_attention_heads if "q_proj" in hf_name else llm.num_key_value_heads

        def load(name: str = name, heads: int | None = heads) -> np.ndarray:
            data = ckpt.tensor(name)
            if hybrid:
                data = _hybrid_tensor(ckpt.causal_lm_name(name), data)[1]
            return _permute_for_llama_rope(data, heads) if heads else data
        # llama.cpp keeps the delta net's conv kernel and A (stored without ".weight") in f32 in every file type
        keep_f32 = gguf_name.endswith(".ssm_conv1d.weight") or not gguf_name.endswith(".weight")
        plan.append((gguf_name, load, shape, keep_f32))

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hparams(writer, ckpt, file_type)
        add_tokenizer(writer, ckpt)
        for gguf_name, _, shape, keep_f32 in plan:
            disk_shape, disk_dtype, raw_dtype = _disk_layout(shape, F32 if keep_f32 else weight_type)
            writer.add_tensor_info(gguf_name, disk_shape, disk_dtype,
                                   int(np.prod(disk_shape)) * disk_dtype.itemsize, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, load, _, keep_f32 in plan:
            data = _encode(load(), F32 if keep_f32 else weight_type)
            writer.write_tensor_data(data)
            if on_tensor:
                on_tensor(gguf_name, data.nbytes)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return out
