"""MiniCPM-V language model -> GGUF for llama.cpp (F32, F16, BF16).

The `llm.*` tensors become llama.cpp's `qwen2` / `qwen3` / `llama` architecture (the facts table says
which); every hyperparameter comes from config.json; tensor names come from gguf-py's own tables
(`gguf.get_tensor_name_map`), never spelled here. The tokenizer metadata is written by
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
    w.add_rope_dimension_count(llm.head_dim)
    w.add_rope_freq_base(llm.rope_theta)
    w.add_layer_norm_rms_eps(llm.rms_norm_eps)
    w.add_vocab_size(llm.vocab_size)
    w.add_file_type(file_type)
    if llm.scale_emb is not None:
        raise MiniCPMVEdgeError("muP-scaled (scale_emb) LLMs are not exported yet: no supported version uses one")


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

    # (gguf name, function producing the float32 data, shape) in file order
    plan: list[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]] = []
    factors = _rope_factors(ckpt)
    if factors is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", lambda: factors, factors.shape))
    for name in ckpt.names("llm"):
        hf_name = name[len("llm."):]
        gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MiniCPMVEdgeError(f"{ckpt.root}: cannot map tensor {name} to a llama.cpp "
                                    f"{gguf.MODEL_ARCH_NAMES[arch]} tensor")
        heads = None
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = llm.num_attention_heads if "q_proj" in hf_name else llm.num_key_value_heads

        def load(name: str = name, heads: int | None = heads) -> np.ndarray:
            data = ckpt.tensor(name)
            return _permute_for_llama_rope(data, heads) if heads else data
        plan.append((gguf_name, load, ckpt.tensors[name].shape))

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hparams(writer, ckpt, file_type)
        add_tokenizer(writer, ckpt)
        for gguf_name, _, shape in plan:
            disk_shape, disk_dtype, raw_dtype = _disk_layout(shape, weight_type)
            writer.add_tensor_info(gguf_name, disk_shape, disk_dtype,
                                   int(np.prod(disk_shape)) * disk_dtype.itemsize, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, load, _ in plan:
            data = _encode(load(), weight_type)
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
