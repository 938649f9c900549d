"""ctypes binding of the native core (libmve), mirroring bindings/include/mve.h one to one.

The C declaration sits in a comment above each binding; `tests/test_kernels.py` parses the header and checks
that every MVE_API function is bound with the same number of arguments. Handles are plain `c_void_p`; the
owner class that frees them is `minicpmv_edge.runtime.resampler.NativeResampler`.

The library is loaded on first use, never at import time, so the runtime still imports (and falls back to
numpy) on a machine where the native build is missing. `MVE_LIB_PATH` overrides where it is looked for.
"""
from __future__ import annotations

import ctypes
import os
import sys
from ctypes import POINTER, Structure, c_char_p, c_float, c_int32, c_size_t, c_uint32, c_void_p
from pathlib import Path

_ENV_OVERRIDE = "MVE_LIB_PATH"
_lib: ctypes.CDLL | None = None

# enum mve_status
MVE_OK = 0
MVE_ERR_INVALID_ARGUMENT = -1
MVE_ERR_IO = -2
MVE_ERR_FORMAT = -3
MVE_ERR_MISMATCH = -4
MVE_ERR_NONFINITE = -5
MVE_ERR_NOMEM = -6
MVE_ERR_UNSUPPORTED = -7

# load-time folding levels
MVE_FOLD_NONE = 0
MVE_FOLD_QUERY = 1
MVE_FOLD_FULL = 2

MVE_MAX_GRID_SIDE = 1024
MVE_MAX_PATCHES = 65536
MVE_MAX_THREADS = 64

# what a weights file's header may say (mve.h: the model facts with headroom); runtime/resampler.py's parser checks
# the same bounds
MVE_MAX_EMBED_DIM = 8192
MVE_MAX_KV_DIM = 4096
MVE_MAX_QUERY_NUM = 256
MVE_MAX_HEADS = 64
MVE_MAX_ATTENTION_ROWS = 4096


class mve_resampler_options(Structure):
    """typedef struct mve_resampler_options { int32_t n_threads; int32_t fold; const char *kernel;
    int32_t expect_embed_dim; int32_t expect_kv_dim; } mve_resampler_options;"""
    _fields_ = [("n_threads", c_int32), ("fold", c_int32), ("kernel", c_char_p),
                ("expect_embed_dim", c_int32), ("expect_kv_dim", c_int32)]


class mve_resampler_info(Structure):
    """typedef struct mve_resampler_info { int32_t embed_dim, kv_dim, query_num, num_heads, weight_dtype, fold,
    n_threads; const char *kernel; } mve_resampler_info;"""
    _fields_ = [("embed_dim", c_int32), ("kv_dim", c_int32), ("query_num", c_int32), ("num_heads", c_int32),
                ("weight_dtype", c_int32), ("fold", c_int32), ("n_threads", c_int32), ("kernel", c_char_p)]


mve_resampler_p = c_void_p
_float_p = POINTER(c_float)
_int32_p = POINTER(c_int32)

# (name, restype, argtypes), each under its C declaration
_SIGNATURES = [
    # int32_t mve_abi_version(void);
    ("mve_abi_version", c_int32, []),
    # uint32_t mve_cpu_features(void);
    ("mve_cpu_features", c_uint32, []),
    # const char *mve_last_error(void);
    ("mve_last_error", c_char_p, []),
    # const char *mve_status_string(mve_status status);
    ("mve_status_string", c_char_p, [c_int32]),
    # int32_t mve_kernel_available(const char *name);
    ("mve_kernel_available", c_int32, [c_char_p]),
    # const char *mve_kernel_auto(void);
    ("mve_kernel_auto", c_char_p, []),
    # void mve_resampler_default_options(mve_resampler_options *opts);
    ("mve_resampler_default_options", None, [POINTER(mve_resampler_options)]),
    # mve_status mve_resampler_load_file(const char *path, const mve_resampler_options *opts, mve_resampler **out);
    ("mve_resampler_load_file", c_int32, [c_char_p, POINTER(mve_resampler_options), POINTER(mve_resampler_p)]),
    # mve_status mve_resampler_load_memory(const void *data, size_t size, const mve_resampler_options *opts,
    #                                      mve_resampler **out);
    ("mve_resampler_load_memory", c_int32,
     [c_void_p, c_size_t, POINTER(mve_resampler_options), POINTER(mve_resampler_p)]),
    # void mve_resampler_free(mve_resampler *r);
    ("mve_resampler_free", None, [mve_resampler_p]),
    # mve_status mve_resampler_get_info(const mve_resampler *r, mve_resampler_info *info);
    ("mve_resampler_get_info", c_int32, [mve_resampler_p, POINTER(mve_resampler_info)]),
    # mve_status mve_resampler_run(mve_resampler *r, const float *features, int32_t h, int32_t w, float *out);
    ("mve_resampler_run", c_int32, [mve_resampler_p, _float_p, c_int32, c_int32, _float_p]),
    # mve_status mve_resampler_run_temporal(mve_resampler *r, const float *features, int32_t n_frames,
    #                                       const int32_t *grids, const int32_t *temporal_ids, float *out);
    ("mve_resampler_run_temporal", c_int32, [mve_resampler_p, _float_p, c_int32, _int32_p, _int32_p, _float_p]),
]


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
    for name, restype, argtypes in _SIGNATURES:
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    if lib.mve_abi_version() != 2:
        raise OSError(f"libmve ABI {lib.mve_abi_version()} does not match this binding (2): rebuild with "
                      "`pip install -e .`")


def bound_signatures() -> dict[str, int]:
    """{function name: argument count} of every binding (for the header-parity test)."""
    return {name: len(argtypes) for name, _, argtypes in _SIGNATURES}


KERNEL_VARIANTS = ("generic", "avx2", "neon")


def abi_version() -> int:
    return int(load().mve_abi_version())


def available_kernels() -> list[str]:
    """Kernel variants built into this library that this CPU can run."""
    lib = load()
    return [k for k in KERNEL_VARIANTS if lib.mve_kernel_available(k.encode())]


def auto_kernel() -> str | None:
    name = load().mve_kernel_auto()
    return name.decode() if name else None


def last_error() -> str:
    return load().mve_last_error().decode(errors="replace")
