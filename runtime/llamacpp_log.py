"""Route llama.cpp's (and mtmd's) log through Python: quiet by default, errors kept for our messages.

llama.cpp prints hundreds of lines per model load, and reports why a load failed only in that log
(the Python call just returns NULL). We install one callback that keeps the last warning/error lines,
so an exception can say why, and prints everything when MINICPMV_EDGE_VERBOSE=1.
"""
from __future__ import annotations

import collections
import ctypes
import os
import sys

_GGML_LOG_LEVEL_WARN = 3
_recent: collections.deque[str] = collections.deque(maxlen=20)
_callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it


def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace") if text else ""
    if level >= _GGML_LOG_LEVEL_WARN and len(msg.strip()) > 2:   # skip progress dots
        _recent.append(msg.strip())
    if os.environ.get("MINICPMV_EDGE_VERBOSE"):
        sys.stderr.write(msg)


def install() -> None:
    """Idempotent: route llama.cpp and mtmd logging through `_on_log`."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp
    _callback = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        from llama_cpp import mtmd_cpp
        mtmd_cpp.mtmd_log_set(_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_callback, ctypes.c_void_p(0))
    except (ImportError, AttributeError, ctypes.ArgumentError):
        pass


def recent_errors(n: int = 3) -> str:
    """The last `n` warnings/errors llama.cpp logged, for an exception message ("" if none)."""
    return " | ".join(list(_recent)[-n:])


def explain(message: str) -> str:
    """`message` plus what llama.cpp logged about it, then forget those lines."""
    why = recent_errors()
    _recent.clear()
    return f"{message}: {why}" if why else message
