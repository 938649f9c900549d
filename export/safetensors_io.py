"""Lazy safetensors reading and streaming writing with numpy only.

Reading memory-maps each tensor on demand (an 8B checkpoint is never loaded whole) and handles
BF16, which numpy lacks, by widening to float32. Writing streams one tensor at a time to a
temporary file and renames it when complete, so peak memory is one tensor and an interrupted run
leaves no file that looks finished. The format is the public safetensors spec: an 8-byte
little-endian header length, a JSON header, then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# safetensors dtype name -> numpy storage dtype (BF16 is stored as raw uint16 bits)
_STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024  # the spec's own limit


class SafetensorsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str                 # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int                # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a .safetensors header without touching tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path}: file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsFormatError(f"{path}: header length {n} is not valid for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsFormatError(f"{path}: header is not JSON ({exc})") from None
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _STORAGE:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_STORAGE[dtype]).itemsize
        if end - begin != expected or base + end > size:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} data [{begin}, {end}) does not match shape {list(shape)} {dtype} "
                f"or runs past the end of the file (truncated download?)")
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
    return infos


def load_tensor(info: TensorInfo, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
    """Read one tensor. Floating tensors are returned as `dtype` (float32 by default; None keeps
    the stored type, with BF16 widened to float32 since numpy has no bfloat16)."""
    storage = np.dtype(_STORAGE[info.dtype])
    arr = np.memmap(info.file, dtype=storage, mode="r", offset=info.offset, shape=info.shape or (1,))
    if not info.shape:
        arr = arr.reshape(())
    if info.dtype == "BF16":
        arr = bf16_bits_to_f32(arr)
    if dtype is not None and np.issubdtype(arr.dtype, np.floating):
        return np.asarray(arr, dtype=dtype)
    return np.array(arr)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even), returned as uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, shape, on-disk dtype, and a function yielding its float32 data
    as consecutive chunks along the first axis (so a 2 GB embedding never sits in memory whole)."""
    name: str
    shape: tuple[int, ...]
    dtype: str  # "BF16", "F16" or "F32"
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_STORAGE[self.dtype]).itemsize


def _encode(spec: TensorSpec, data: np.ndarray) -> memoryview:
    if spec.dtype == "BF16":
        out = f32_to_bf16_bits(data)
    else:
        out = np.ascontiguousarray(data, dtype=_STORAGE[spec.dtype])
    return memoryview(out.astype(out.dtype.newbyteorder("<"), copy=False)).cast("B")


def _write_tensor(f, spec: TensorSpec) -> None:
    rows, tail = 0, tuple(spec.shape[1:])
    for chunk in spec.chunks():
        chunk = np.asarray(chunk)
        if tuple(chunk.shape[1:]) != tail and spec.shape:
            raise ValueError(f"tensor {spec.name}: chunk shape {chunk.shape} does not fit {spec.shape}")
        rows += chunk.shape[0] if spec.shape else 1
        f.write(_encode(spec, chunk))
    if rows != (spec.shape[0] if spec.shape else 1):
        raise ValueError(f"tensor {spec.name}: produced {rows} rows, expected shape {spec.shape}")


def write_safetensors(path: Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[TensorSpec], None] | None = None) -> int:
    """Stream tensors to `path` one at a time (temporary file + rename). Returns the data size."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header to 8-byte alignment with spaces
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for s in specs:
                _write_tensor(f, s)
                if on_tensor:
                    on_tensor(s)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return offset
