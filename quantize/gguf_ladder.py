"""The GGUF quantization ladder, through llama.cpp's own quantizer (`llama_model_quantize`).

One F16 GGUF in, one file per type out, named the llama.cpp/ollama way (`<name>-Q4_K_M.gguf`).
After each file is written we read it back and report which ggml type every tensor got: llama.cpp
silently falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, ...) when a row is not a multiple of the K-quant
block (256), which is exactly what happens on tiny test models, so the report shows it.
"""
from __future__ import annotations

import ctypes
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from minicpmv_edge.errors import MiniCPMVEdgeError

# The sizes users pick from, smallest first. F16/BF16/F32 are written by the exporter directly.
LADDER = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "IQ4_NL", "Q5_K_M", "Q6_K", "Q8_0")


def llama_ftype(qtype: str) -> int:
    import llama_cpp
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if value is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise MiniCPMVEdgeError(f"unknown quantization type {qtype!r}; llama.cpp knows: {', '.join(known)}")
    return int(value)


@dataclass
class QuantReport:
    qtype: str
    path: Path
    file_bytes: int
    n_params: int
    tensor_types: dict[str, int] = field(default_factory=dict)   # ggml type -> number of tensors
    bytes_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * sum(self.bytes_by_type.values()) / max(self.n_params, 1)

    @property
    def fallback_types(self) -> dict[str, int]:
        """Tensor types llama.cpp used that the requested type does not call for. K-quants need rows that
        are a multiple of 256; otherwise llama.cpp picks Q5_0 / Q5_1 / Q8_0 / IQ4_NL for those tensors."""
        expected = set(_K_FAMILY) if "_K" in self.qtype else {self.qtype, "Q6_K", "Q8_0"}
        expected |= {"F32", "F16", "BF16"}
        return {t: n for t, n in self.tensor_types.items() if t not in expected}


_K_FAMILY = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def describe_gguf(path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """(tensor count by ggml type, bytes by type, parameter count) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    params = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] += 1
        sizes[name] += int(t.n_bytes)
        params += int(t.n_elements)
    return dict(counts), dict(sizes), params


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, *, nthread: int | None = None) -> QuantReport:
    """Quantize `src` (F16/BF16/F32 GGUF) to `qtype` at `dst`; temporary name until complete."""
    import llama_cpp

    from minicpmv_edge.runtime import llamacpp_log
    llamacpp_log.install()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MiniCPMVEdgeError(f"{src}: file not found")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(qtype)
    params.nthread = nthread or os.cpu_count() or 1
    tmp = dst.with_name(dst.name + ".partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise MiniCPMVEdgeError(llamacpp_log.explain(
                f"llama.cpp could not quantize {src.name} to {qtype} (code {rc})"))
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    counts, sizes, n_params = describe_gguf(dst)
    return QuantReport(qtype, dst, dst.stat().st_size, n_params, counts, sizes)
