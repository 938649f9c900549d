"""ctypes loader for the native core (libmve), mirroring bindings/include/mve.h.

The library is loaded on first use, never at import time, so the runtime still imports (and
falls back to numpy) on a machine where the native build is missing.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_ENV_OVERRIDE = "MVE_LIB_PATH"
_lib: ctypes.CDLL | None = None


def _library_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libmve.dylib"]
    if sys.platform == "win32":
        return ["mve.dll", "libmve.dll"]
    return ["libmve.so"]


def _candidates() -> list[Path]:
    env = os.environ.get(_ENV_OVERRIDE)
    if env:
        return [Path(env)]
    # Editable installs split the package over several folders (source + site-packages),
    # so look in every entry of __path__, not just next to this file.
    return [Path(p) / "lib" / name for p in __path__ for name in _library_names()]


def load() -> ctypes.CDLL:
    """Load libmve once; raise OSError listing every path tried."""
    global _lib
    if _lib is not None:
        return _lib
    tried = []
    for path in _candidates():
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            _bind(lib)
            _lib = lib
            return lib
        tried.append(str(path))
    raise OSError(
        "minicpmv-edge native library not found; tried: " + ", ".join(tried)
        + f" (set {_ENV_OVERRIDE} to point at libmve, or reinstall with `pip install -e .`)"
    )


def _bind(lib: ctypes.CDLL) -> None:
    # int32_t mve_abi_version(void);
    lib.mve_abi_version.argtypes = []
    lib.mve_abi_version.restype = ctypes.c_int32
    # uint32_t mve_cpu_features(void);
    lib.mve_cpu_features.argtypes = []
    lib.mve_cpu_features.restype = ctypes.c_uint32


CPU_FEATURE_BITS = {"avx2": 1 << 0, "fma": 1 << 1, "f16c": 1 << 2, "neon": 1 << 3, "fp16_arith": 1 << 4}


def cpu_features() -> list[str]:
    bits = load().mve_cpu_features()
    return [name for name, bit in CPU_FEATURE_BITS.items() if bits & bit]


def abi_version() -> int:
    return int(load().mve_abi_version())
