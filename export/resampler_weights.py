"""Write the resampler weights file the native kernels (bindings/) and the numpy runtime load.

    write_resampler_weights(Checkpoint.open("MiniCPM-V-4_5"), "resampler.mvr", dtype="f16")
    python -m minicpmv_edge.export.resampler_weights CHECKPOINT OUT [--dtype f16]

The format ("MVERSMPL" v1) is defined in `minicpmv_edge.runtime.resampler` (header, tensor table, 64-byte
aligned tensors). Why not safetensors: the C side would need a JSON parser to find its tensors, and
safetensors only aligns to 8 bytes; a fixed 64-byte header and a 17-entry table are ~100 lines of C that check
every field, and the file can be memory-mapped and read in place by SIMD code.

The file holds the checkpoint's own tensors, not folded ones: `in_proj_*` split into q / k / v, and `proj`
transposed to the [out, in] layout of every other matrix (both exact). One tensor is derived: `KV_NORM_R`,
a [C, C] factor R with R^T R = Wc^T Wc for kv_proj with its column means removed (`kv_norm_r`, float64
Cholesky): the native plan takes LN_kv's variance as ||R x||^2 / D from it. The Gram matrix needs float64
(its rounding error would be squared by the conditioning of kv_proj), which is why this is done at export. Folding (LN_q(query) Wq through Wk,
LN_kv and kv_proj through the key and value paths) happens when the library loads the file, where it costs
well under a second and can be switched off to run the plain math for comparison; see mve.h MVE_FOLD_*.

Matrices are stored in the requested dtype (f32, or f16 with round-to-nearest-even; a value beyond f16's range
is an error, not an infinity). Vectors and the 64 queries stay float32. Written to a temporary file and renamed,
one tensor at a time.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import numpy as np

from minicpmv_edge.runtime.resampler import ResamplerHeader, Tensor, WeightDType

from .checkpoint import Checkpoint

__all__ = ["write_resampler_weights", "write_resampler_file", "resampler_header", "kv_norm_r"]

_F16_MAX = float(np.finfo(np.float16).max)


def resampler_header(ckpt: Checkpoint, dtype: str | WeightDType = "f32") -> ResamplerHeader:
    r = ckpt.resampler
    return ResamplerHeader(WeightDType.parse(dtype), r.embed_dim, r.kv_dim, r.query_num, r.num_heads,
                           float(r.layer_norm_eps))


def kv_norm_r(kv_proj: np.ndarray | None, embed_dim: int, kv_dim: int) -> np.ndarray:
    """[C, C] float32 R with ||R x|| = ||z - mean(z)|| for z = kv_proj x (kv_proj [D, C], or the identity when
    None): R^T R = Wc^T Wc for the column-centred Wc = (I - 11^T/D) Wkv, all in float64. R is the transposed
    Cholesky factor (upper triangular); where Wc^T Wc is singular (D < C, or an identity kv_proj, whose
    centring loses one dimension) it is sqrt(L) V^T from the eigendecomposition instead."""
    w = np.eye(embed_dim) if kv_proj is None else np.asarray(kv_proj, dtype=np.float64)
    centred = w - w.mean(axis=0, keepdims=True)
    gram = centred.T @ centred                                         # [C, C]
    try:
        r = np.linalg.cholesky(gram).T
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(gram)
        r = np.sqrt(np.clip(lam, 0.0, None))[:, None] * vec.T
    return np.ascontiguousarray(r, dtype=np.float32)


def _tensor(get: Callable[[str], np.ndarray], header: ResamplerHeader, row, where: str) -> np.ndarray:
    rows, cols = header.shape(row)
    if row.tensor is Tensor.KV_NORM_R:
        kv = None if header.kv_dim == header.embed_dim else get(row.source)
        r = kv_norm_r(kv, header.embed_dim, header.kv_dim)
        assert r.shape == (rows, cols), (r.shape, rows, cols)
        return r
    if rows == 0:
        return np.zeros((0,), np.float32)
    data = np.asarray(get(row.source), dtype=np.float32)               # bf16 widens exactly
    if row.chunk is not None:
        data = np.split(data, 3, axis=0)[row.chunk]
    if row.transpose:
        data = data.T
    data = np.ascontiguousarray(data, dtype=np.float32).reshape(rows, cols)
    if not np.isfinite(data).all():
        raise ValueError(f"{where}: resampler.{row.source} holds NaN or infinity")
    dtype = header.entry_dtype(row)
    if dtype is WeightDType.F16:
        peak = float(np.abs(data).max(initial=0.0))
        if peak > _F16_MAX:
            raise ValueError(f"{where}: resampler.{row.source} has |value| {peak:g} > {_F16_MAX:g}, which "
                             f"float16 cannot hold; write f32")
    return data.astype(dtype.numpy)


def write_resampler_weights(ckpt: Checkpoint, path: str | Path, dtype: str | WeightDType = "f32") -> Path:
    """Write `ckpt`'s resampler to `path` (temporary file + rename). Returns the path."""
    return write_resampler_file(path, resampler_header(ckpt, dtype),
                                lambda name: ckpt.tensor("resampler." + name), where=str(ckpt.root))


def write_resampler_file(path: str | Path, header: ResamplerHeader, get: Callable[[str], np.ndarray],
                         where: str = "") -> Path:
    """Write a weights file from `get(name)`, which returns a resampler tensor by its checkpoint name without
    the "resampler." prefix (e.g. a torch state_dict's values as numpy). Tests and bench/ use this with
    random weights at full model widths."""
    path = Path(path)
    last: dict[str, np.ndarray] = {}

    def get_once(name: str) -> np.ndarray:  # q, k and v are thirds of one tensor: read it once, not thrice
        if name not in last:
            last.clear()
            last[name] = get(name)
        return last[name]

    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(header.pack())
            for row, offset, nbytes, _ in header.layout():
                f.write(b"\0" * (offset - f.tell()))
                data = _tensor(get_once, header, row, where or str(path))
                f.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
            if f.tell() != header.file_size():
                raise AssertionError(f"wrote {f.tell()} bytes, the header says {header.file_size()}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minicpmv_edge.export.resampler_weights",
                                 description="write the resampler weights file for the native kernels")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    args = ap.parse_args(argv)
    out = write_resampler_weights(Checkpoint.open(args.checkpoint), args.out, args.dtype)
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
