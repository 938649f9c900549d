"""ctypes access to the ggml that llama-cpp-python ships (libggml-base, already loaded with libllama): the few
functions the importance-matrix collector and the mmproj K-quant writer need, bound once."""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

_SIGNATURES = (
    ("ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
    ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
    ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
    ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
    ("ggml_backend_buffer_is_host", ctypes.c_bool, [ctypes.c_void_p]),
    ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    ("ggml_row_size", ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    ("ggml_blck_size", ctypes.c_int64, [ctypes.c_int]),
    ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
    ("ggml_quantize_chunk", ctypes.c_size_t,
     [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
      ctypes.c_void_p]),
)


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    import llama_cpp
    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(p for p in libdir.glob("*ggml-base*") if p.suffix in (".so", ".dylib", ".dll"))
    if not found:
        raise MiniCPMVEdgeError(f"{libdir}: libggml-base not found (llama-cpp-python installed oddly?)")
    handle = ctypes.CDLL(str(found[0]))
    for name, res, args in _SIGNATURES:
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = res, args
    return handle


@lru_cache(maxsize=None)
def op_id(name: str) -> int:
    """An op's enum value (its order changes between ggml versions): found by name, -1 if absent."""
    for i in range(1024):
        got = lib().ggml_op_name(i)
        if got is None or got == b"COUNT":
            break
        if got == name.encode():
            return i
    return -1


def quantize_rows(data: np.ndarray, qtype: int) -> np.ndarray:
    """A 2-D float array -> ggml blocks of `qtype` (ggml's own quantizer), as uint8 [rows, row bytes]."""
    x = np.ascontiguousarray(data, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % lib().ggml_blck_size(qtype):
        raise MiniCPMVEdgeError(f"rows of {x.shape[-1]} values do not split into {qtype}-type blocks")
    if lib().ggml_quantize_requires_imatrix(qtype):
        raise MiniCPMVEdgeError(f"ggml type {qtype} needs an importance matrix")
    row_bytes = lib().ggml_row_size(qtype, x.shape[1])
    out = np.empty((x.shape[0], row_bytes), dtype=np.uint8)
    n = lib().ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    if n != out.nbytes:
        raise MiniCPMVEdgeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.nbytes}")
    return out
