"""The resampler on device: patch features [N, kv_dim] -> query_num x D embeddings, without torch.

    r = load_resampler("bundle/resampler.mvr", threads=4)          # native kernels, numpy if missing
    emb = r.run(features, h, w)                                     # one slice   -> [64, D]
    emb = r.run_group(frames, grids, temporal_ids)                  # 4.5 frames  -> [64, D]
    r.close()

Two backends with one interface:

* `NativeResampler` owns a libmve handle (bindings/, loaded through ctypes) and frees it on `close()` or at
  exit of a `with` block. Folding, kernel variant and thread count are chosen at load.
* `NumpyResampler` is the plain math in float32 numpy (the MVE_FOLD_NONE plan of the C code), the fallback
  where the native library is missing and the readable reference the C library is pinned to in the tests.

The weights file ("MVERSMPL", written by `minicpmv_edge.export.resampler_weights`) is defined here, once, and
read by both backends and by the C library (bindings/src/weights.c):

    header, 64 bytes, little-endian:
        0  char[8] magic "MVERSMPL"   8  u32 version = 1      12 u32 dtype (0 f32, 1 f16) of the matrices
        16 u32 embed_dim D            20 u32 kv_dim C         24 u32 query_num Q          28 u32 num_heads
        32 f32 layer_norm_eps         36 u32 n_tensors = 18   40 u64 file size            48..63 zero
    tensor table, 18 x 32 bytes, in `Tensor` order: u32 id, u32 dtype, u32 rows, u32 cols, u64 offset, u64 nbytes
    tensor data, each at a 64-byte aligned offset (mmap-friendly, SIMD-friendly).

Matrices use the torch Linear layout [out, in]; `proj` is stored transposed (`PROJ_T`) so every matrix is
applied as x W^T. Vectors and the query stay float32 in an f16 file (they are small, and LayerNorm gains
are where half precision would hurt). A kv_proj that is the identity (kv_dim == D) is an empty entry.
One tensor is derived rather than copied: `KV_NORM_R` [C, C] float32, a factor R with R^T R = Wc^T Wc for
kv_proj with its column means removed, Wc (float64 Cholesky in the writer), so that
|| LN_kv input - its mean || = || R x ||: the fully folded native plan gets LN_kv's statistics from x in
2 N C^2 FLOPs instead of computing z = x Wkv^T (2 N C D).
"""
from __future__ import annotations

import ctypes
import os
import struct
import warnings
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Sequence

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.untrusted import open_regular

__all__ = [
    "MAGIC", "FORMAT_VERSION", "WeightDType", "Tensor", "LAYOUT", "ResamplerHeader", "ResamplerFormatError",
    "ResamplerError", "read_header", "read_resampler_file", "sincos_1d", "sincos_2d", "NumpyResampler",
    "NativeResampler", "load_resampler", "FOLDS",
]

MAGIC = b"MVERSMPL"
FORMAT_VERSION = 1
ALIGN = 64
HEADER = struct.Struct("<8s6IfIQ16x")       # 64 bytes
ENTRY = struct.Struct("<4I2Q")               # 32 bytes
FOLDS = {"none": 0, "query": 1, "full": 2}   # mve.h MVE_FOLD_*


class WeightDType(IntEnum):
    F32 = 0
    F16 = 1

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(np.float32 if self is WeightDType.F32 else np.float16)

    @classmethod
    def parse(cls, name: "str | WeightDType") -> "WeightDType":
        if isinstance(name, WeightDType):
            return name
        try:
            return {"f32": cls.F32, "float32": cls.F32, "f16": cls.F16, "float16": cls.F16}[str(name).lower()]
        except KeyError:
            raise ValueError(f"weight dtype {name!r}: expected 'f32' or 'f16'") from None


class Tensor(IntEnum):
    """Tensor ids in file order (mirrors mve_tensor_id in bindings/src/internal.h)."""
    QUERY = 0
    LN_Q_W = 1
    LN_Q_B = 2
    KV_PROJ = 3
    LN_KV_W = 4
    LN_KV_B = 5
    WQ = 6
    WK = 7
    WV = 8
    BQ = 9
    BK = 10
    BV = 11
    WO = 12
    BO = 13
    LN_POST_W = 14
    LN_POST_B = 15
    PROJ_T = 16
    KV_NORM_R = 17


@dataclass(frozen=True)
class TensorRow:
    """Where a file tensor comes from in the checkpoint (name after `resampler.`), and how it is stored."""
    tensor: Tensor
    source: str
    chunk: int | None = None   # which third of attn.in_proj_* (q, k, v)
    transpose: bool = False    # stored transposed (proj)
    matrix: bool = False       # stored in the file's dtype; everything else is float32
    shape: str = "D"           # "D" vector, "QD", "DC", "DD", "CC"
    derived: bool = False      # computed by the writer from `source` (see export/resampler_weights.py)


LAYOUT: tuple[TensorRow, ...] = (
    TensorRow(Tensor.QUERY, "query", shape="QD"),
    TensorRow(Tensor.LN_Q_W, "ln_q.weight"),
    TensorRow(Tensor.LN_Q_B, "ln_q.bias"),
    TensorRow(Tensor.KV_PROJ, "kv_proj.weight", matrix=True, shape="DC"),
    TensorRow(Tensor.LN_KV_W, "ln_kv.weight"),
    TensorRow(Tensor.LN_KV_B, "ln_kv.bias"),
    TensorRow(Tensor.WQ, "attn.in_proj_weight", chunk=0, matrix=True, shape="DD"),
    TensorRow(Tensor.WK, "attn.in_proj_weight", chunk=1, matrix=True, shape="DD"),
    TensorRow(Tensor.WV, "attn.in_proj_weight", chunk=2, matrix=True, shape="DD"),
    TensorRow(Tensor.BQ, "attn.in_proj_bias", chunk=0),
    TensorRow(Tensor.BK, "attn.in_proj_bias", chunk=1),
    TensorRow(Tensor.BV, "attn.in_proj_bias", chunk=2),
    TensorRow(Tensor.WO, "attn.out_proj.weight", matrix=True, shape="DD"),
    TensorRow(Tensor.BO, "attn.out_proj.bias"),
    TensorRow(Tensor.LN_POST_W, "ln_post.weight"),
    TensorRow(Tensor.LN_POST_B, "ln_post.bias"),
    TensorRow(Tensor.PROJ_T, "proj", transpose=True, matrix=True, shape="DD"),
    TensorRow(Tensor.KV_NORM_R, "kv_proj.weight", shape="CC", derived=True),
)
assert [row.tensor for row in LAYOUT] == list(Tensor)


class ResamplerFormatError(MiniCPMVEdgeError):
    """A resampler weights file is malformed, truncated, or of another version."""


class ResamplerError(MiniCPMVEdgeError):
    """The native resampler refused a call; carries the library's status code and message."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class ResamplerHeader:
    dtype: WeightDType
    embed_dim: int
    kv_dim: int
    query_num: int
    num_heads: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def shape(self, row: TensorRow) -> tuple[int, int]:
        d, c, q = self.embed_dim, self.kv_dim, self.query_num
        if row.shape == "DC":
            return (0, 0) if c == d else (d, c)   # identity kv_proj: empty entry
        return {"D": (1, d), "QD": (q, d), "DD": (d, d), "CC": (c, c)}[row.shape]

    def entry_dtype(self, row: TensorRow) -> WeightDType:
        return self.dtype if row.matrix else WeightDType.F32

    def layout(self) -> list[tuple[TensorRow, int, int, int]]:
        """(row, offset, nbytes, rows*cols) for every tensor, 64-byte aligned after the table."""
        offset = HEADER.size + ENTRY.size * len(LAYOUT)
        out = []
        for row in LAYOUT:
            rows, cols = self.shape(row)
            nbytes = rows * cols * self.entry_dtype(row).numpy.itemsize
            offset += -offset % ALIGN
            out.append((row, offset, nbytes, rows * cols))
            offset += nbytes
        return out

    def file_size(self) -> int:
        row, offset, nbytes, _ = self.layout()[-1]
        return offset + nbytes

    def pack(self) -> bytes:
        """Header + tensor table."""
        blob = HEADER.pack(MAGIC, FORMAT_VERSION, int(self.dtype), self.embed_dim, self.kv_dim, self.query_num,
                           self.num_heads, self.layer_norm_eps, len(LAYOUT), self.file_size())
        for row, offset, nbytes, _ in self.layout():
            rows, cols = self.shape(row)
            blob += ENTRY.pack(int(row.tensor), int(self.entry_dtype(row)), rows, cols, offset, nbytes)
        return blob


def _format_error(path: Path, message: str, field: str | None = None) -> ResamplerFormatError:
    return ResamplerFormatError(f"{path}: " + (f"{field}: " if field else "") + message)


def _check_header_bounds(path: Path, d: int, c: int, q: int, heads: int, eps: float) -> None:
    """The bounds bindings/src/weights.c checks (mve.h MVE_MAX_*: the model facts with headroom)."""
    from minicpmv_edge import _native as n
    if d < 4 or d > n.MVE_MAX_EMBED_DIM or d % 4:
        raise ResamplerFormatError(f"{path}: embed_dim {d} is not a multiple of 4 in [4, {n.MVE_MAX_EMBED_DIM}]")
    for field, value, top in (("kv_dim", c, n.MVE_MAX_KV_DIM), ("query_num", q, n.MVE_MAX_QUERY_NUM),
                              ("num_heads", heads, n.MVE_MAX_HEADS)):
        if not 1 <= value <= top:
            raise ResamplerFormatError(f"{path}: {field} {value} out of range [1, {top}]")
    if heads * q > n.MVE_MAX_ATTENTION_ROWS:
        raise ResamplerFormatError(f"{path}: num_heads {heads} x query_num {q} is more than "
                                   f"{n.MVE_MAX_ATTENTION_ROWS} attention rows")
    if not 0.0 < eps <= 1.0:
        raise ResamplerFormatError(f"{path}: layer_norm_eps {eps} is not a number in (0, 1]")


def read_header(path: str | Path) -> ResamplerHeader:
    """Parse and check a weights file's header and tensor table (no tensor data is read)."""
    path = Path(path)
    with open_regular(path, error=_format_error) as f:   # a FIFO fails here instead of blocking
        size = os.fstat(f.fileno()).st_size
        raw = f.read(HEADER.size + ENTRY.size * len(LAYOUT))
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise ResamplerFormatError(f"{path}: not a resampler weights file (no {MAGIC.decode()} magic)")
    magic, version, dtype, d, c, q, heads, eps, n_tensors, file_size = HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise ResamplerFormatError(f"{path}: format version {version}, this code reads {FORMAT_VERSION}")
    if dtype not in (0, 1) or n_tensors != len(LAYOUT) or not (d and c and q and heads) or d % heads:
        raise ResamplerFormatError(f"{path}: inconsistent header (dtype {dtype}, {n_tensors} tensors, D={d}, "
                                   f"C={c}, Q={q}, heads={heads})")
    _check_header_bounds(path, d, c, q, heads, eps)
    if file_size != size:
        raise ResamplerFormatError(f"{path}: header says {file_size} bytes, the file has {size} (truncated?)")
    header = ResamplerHeader(WeightDType(dtype), d, c, q, heads, float(eps))
    if raw != header.pack():
        raise ResamplerFormatError(f"{path}: tensor table does not match the layout its header implies")
    return header


def read_resampler_file(path: str | Path) -> tuple[ResamplerHeader, dict[Tensor, np.ndarray]]:
    """Header and memory-mapped tensors ({Tensor: array of its stored dtype}); an identity kv_proj is absent."""
    header = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for row, offset, nbytes, count in header.layout():
        if nbytes == 0:
            continue
        arr = mm[offset:offset + nbytes].view(header.entry_dtype(row).numpy)
        tensors[row.tensor] = arr.reshape(header.shape(row))
    return header, tensors


# =============================================================================================
# Position terms (float32 numpy, exactly as the HF code computes them; export/reference.py has the same)
# =============================================================================================

def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[..., E]: concat(sin(pos w), cos(pos w)), w_k = 10000^(-k/(E/2)), all in float32."""
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("...,d->...d", np.asarray(pos, dtype=np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def sincos_2d(embed_dim: int, h: int, w: int) -> np.ndarray:
    """[h*w, D] row-major: the x (width) coordinate's half first, then y."""
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], axis=-1)
    return emb.reshape(h * w, embed_dim)


# =============================================================================================
# Backends
# =============================================================================================

def _as_features(features: np.ndarray, rows: int, kv_dim: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != kv_dim or x.shape[0] < rows:
        raise ValueError(f"{what}: features of shape {tuple(np.shape(features))}, expected at least "
                         f"[{rows}, {kv_dim}]")
    return x[:rows]


class _Resampler:
    """What both backends share: shapes, and batch helpers shaped like export/reference.py's Resampler."""
    header: ResamplerHeader

    @property
    def embed_dim(self) -> int:
        return self.header.embed_dim

    @property
    def kv_dim(self) -> int:
        return self.header.kv_dim

    @property
    def query_num(self) -> int:
        return self.header.query_num

    def run(self, features: np.ndarray, h: int, w: int) -> np.ndarray:
        """One slice: features [h*w, kv_dim] (patch y*w + x) -> [query_num, D]."""
        return self.run_group([features], [(h, w)], [-1])

    def run_group(self, frames: Sequence[np.ndarray], grids: Sequence[tuple[int, int]],
                  temporal_ids: Sequence[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, features: Sequence[np.ndarray], tgt_sizes) -> np.ndarray:
        """Slices -> [B, Q, D] (like the torch reference's `forward`)."""
        sizes = [(int(h), int(w)) for h, w in np.asarray(tgt_sizes).reshape(-1, 2)]
        return np.stack([self.run(f, h, w) for f, (h, w) in zip(features, sizes, strict=True)])

    def forward_temporal(self, features_per_slice: Sequence[np.ndarray], tgt_sizes,
                         temporal_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Frame groups -> [G, Q, D] (like the torch reference's `forward_temporal`)."""
        sizes = [(int(h), int(w)) for h, w in np.asarray(tgt_sizes).reshape(-1, 2)]
        if sum(len(g) for g in temporal_ids) != len(sizes):
            raise ValueError(f"temporal_ids name {sum(len(g) for g in temporal_ids)} frames but {len(sizes)} "
                             f"slices were given")
        out, start = [], 0
        for group in temporal_ids:
            end = start + len(group)
            out.append(self.run_group(features_per_slice[start:end], sizes[start:end], list(group)))
            start = end
        return np.stack(out)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NumpyResampler(_Resampler):
    """The plain resampler math in float32 numpy (no folding): the fallback and the readable reference."""
    backend = "numpy"

    def __init__(self, path: str | Path):
        self.header, stored = read_resampler_file(path)
        self.t = {k: np.asarray(v, dtype=np.float32) for k, v in stored.items()}
        for k, v in self.t.items():   # as bindings/src/weights.c does: a NaN weight never reaches a result
            if not np.isfinite(v).all():
                raise ResamplerFormatError(f"{path}: tensor {LAYOUT[k].source}: holds NaN or infinity")
        self._pos: dict[tuple[int, int], np.ndarray] = {}

    def _ln(self, x: np.ndarray, g: Tensor, b: Tensor) -> np.ndarray:
        mean = x.mean(-1, keepdims=True, dtype=np.float64)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        y = ((x - mean) / np.sqrt(var + self.header.layer_norm_eps)).astype(np.float32)
        return y * self.t[g][0] + self.t[b][0]

    def pos_2d(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._pos:
            self._pos[(h, w)] = sincos_2d(self.embed_dim, h, w)
        return self._pos[(h, w)]

    def run_group(self, frames, grids, temporal_ids) -> np.ndarray:
        t, hdr = self.t, self.header
        keys, values = [], []
        for f, (h, w), tid in zip(frames, grids, temporal_ids, strict=True):
            x = _as_features(f, h * w, hdr.kv_dim, f"frame {h}x{w}")
            z = x @ t[Tensor.KV_PROJ].T if Tensor.KV_PROJ in t else x            # [N, D]
            xl = self._ln(z, Tensor.LN_KV_W, Tensor.LN_KV_B)
            k = xl + self.pos_2d(h, w)
            if tid >= 0:
                k = k + sincos_1d(hdr.embed_dim, np.asarray([tid]))                # [1, D] over all patches
            keys.append(k)
            values.append(xl)
        k, v = np.concatenate(keys), np.concatenate(values)                      # [N, D]
        nh, hd = hdr.num_heads, hdr.head_dim
        q = self._ln(t[Tensor.QUERY], Tensor.LN_Q_W, Tensor.LN_Q_B)
        qp = (q @ t[Tensor.WQ].T + t[Tensor.BQ][0]).reshape(-1, nh, hd).transpose(1, 0, 2)     # [H, Q, hd]
        kp = (k @ t[Tensor.WK].T + t[Tensor.BK][0]).reshape(-1, nh, hd).transpose(1, 0, 2)     # [H, N, hd]
        vp = (v @ t[Tensor.WV].T + t[Tensor.BV][0]).reshape(-1, nh, hd).transpose(1, 0, 2)     # [H, N, hd]
        s = (qp * np.float32(hd ** -0.5)) @ kp.transpose(0, 2, 1)                               # [H, Q, N]
        s = np.exp(s - s.max(-1, keepdims=True))
        p = s / s.sum(-1, keepdims=True)
        o = (p @ vp).transpose(1, 0, 2).reshape(hdr.query_num, hdr.embed_dim)                  # [Q, D]
        o = o @ t[Tensor.WO].T + t[Tensor.BO][0]
        return self._ln(o, Tensor.LN_POST_W, Tensor.LN_POST_B) @ t[Tensor.PROJ_T].T


class NativeResampler(_Resampler):
    """Owner of a libmve resampler handle: frees it on close() (also via `with` and at garbage collection).

    fold: "full" (default), "query" or "none" (see bindings/include/mve.h); kernel: None = the library's choice
    (MVE_KERNEL or the best for this CPU), or "generic" / "avx2" / "neon"."""
    backend = "native"

    def __init__(self, path: str | Path, threads: int = 1, fold: str = "full", kernel: str | None = None,
                 expect_embed_dim: int = 0, expect_kv_dim: int = 0):
        from minicpmv_edge import _native

        self._n = _native
        self._lib = _native.load()
        if fold not in FOLDS:
            raise ValueError(f"fold {fold!r}: expected one of {', '.join(FOLDS)}")
        opts = _native.mve_resampler_options()
        self._lib.mve_resampler_default_options(ctypes.byref(opts))
        opts.n_threads, opts.fold = int(threads), FOLDS[fold]
        opts.kernel = kernel.encode() if kernel else None
        opts.expect_embed_dim, opts.expect_kv_dim = int(expect_embed_dim), int(expect_kv_dim)
        handle = _native.mve_resampler_p()
        self._check(self._lib.mve_resampler_load_file(os.fsencode(path), ctypes.byref(opts), ctypes.byref(handle)))
        self._handle = handle
        info = _native.mve_resampler_info()
        self._check(self._lib.mve_resampler_get_info(self._handle, ctypes.byref(info)))
        self.kernel, self.fold, self.threads = info.kernel.decode(), fold, info.n_threads
        self.header = read_header(path)

    def _check(self, status: int) -> None:
        if status != self._n.MVE_OK:
            raise ResamplerError(status, self._n.last_error() or self._lib.mve_status_string(status).decode())

    def run_group(self, frames, grids, temporal_ids) -> np.ndarray:
        if getattr(self, "_handle", None) is None:
            raise ResamplerError(self._n.MVE_ERR_INVALID_ARGUMENT, "resampler is closed")
        grids = [(int(h), int(w)) for h, w in grids]
        if not frames or not (len(frames) == len(grids) == len(temporal_ids)):
            raise ValueError(f"{len(frames)} frames, {len(grids)} grids, {len(temporal_ids)} temporal ids")
        parts = [_as_features(f, h * w, self.kv_dim, f"frame {h}x{w}") for f, (h, w) in zip(frames, grids)]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        g = np.ascontiguousarray(np.asarray(grids, dtype=np.int32).reshape(-1))
        ids = np.ascontiguousarray(np.asarray(temporal_ids, dtype=np.int32))
        out = np.empty((self.query_num, self.embed_dim), dtype=np.float32)
        fp = ctypes.POINTER(ctypes.c_float)
        ip = ctypes.POINTER(ctypes.c_int32)
        self._check(self._lib.mve_resampler_run_temporal(
            self._handle, x.ctypes.data_as(fp), len(parts), g.ctypes.data_as(ip), ids.ctypes.data_as(ip),
            out.ctypes.data_as(fp)))
        return out

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.mve_resampler_free(handle)

    def __del__(self) -> None:
        self.close()


def load_resampler(path: str | Path, backend: str = "auto", threads: int | None = None, fold: str = "full",
                   kernel: str | None = None, expect_embed_dim: int = 0, expect_kv_dim: int = 0) -> _Resampler:
    """Open a resampler weights file. backend: "native", "numpy", or "auto" (native, else numpy with a
    warning when libmve cannot be loaded). threads: native worker count (default: all CPUs)."""
    if backend not in ("auto", "native", "numpy"):
        raise ValueError(f"backend {backend!r}: expected auto, native or numpy")
    if backend != "numpy":
        try:
            return NativeResampler(path, threads=threads or os.cpu_count() or 1, fold=fold, kernel=kernel,
                                   expect_embed_dim=expect_embed_dim, expect_kv_dim=expect_kv_dim)
        except OSError as exc:
            if backend == "native":
                raise
            warnings.warn(f"native resampler unavailable, using numpy (slower): {exc}", RuntimeWarning,
                          stacklevel=2)
    r = NumpyResampler(path)
    for name, want, got in (("embed_dim", expect_embed_dim, r.embed_dim), ("kv_dim", expect_kv_dim, r.kv_dim)):
        if want and want != got:
            raise ResamplerFormatError(f"{path}: {name} is {got} but {want} was expected (weights of another model?)")
    return r
