"""Lazy safetensors reading and streaming writing with numpy only.

Reading memory-maps each tensor on demand (an 8B checkpoint is never loaded whole) and handles
BF16, which numpy lacks, by widening to float32. Writing streams one tensor at a time to a
temporary file and renames it when complete, so peak memory is one tensor and an interrupted run
leaves no file that looks finished. The format is the public safetensors spec: an 8-byte
little-endian header length, a JSON header, then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from minicpmv_edge.untrusted import open_regular, parse_json

# safetensors dtype name -> numpy storage dtype (BF16 is stored as raw uint16 bits)
_STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# Real headers are ~100 KB (an 8B model's ~700 tensors); the spec allows 100 MB, which is more JSON than a reader
# should parse from a stranger's file.
_MAX_HEADER = 16 * 2 ** 20
_MAX_DIMS = 8
_FINITE_CHUNK = 1 << 22  # elements per NaN/Inf check: bounds the temporary boolean array


class SafetensorsFormatError(ValueError):
    """A malformed .safetensors file; `path`, `field` (the tensor, if one is to blame) and `message` apart so
    callers can re-raise it as their own error type."""

    def __init__(self, path: str | Path, message: str, field: str | None = None):
        self.path, self.message, self.field = Path(path), message, field
        super().__init__(f"{self.path}: " + (f"{field}: " if field else "") + message)


class NonFiniteTensorError(SafetensorsFormatError):
    """A tensor holds NaN or infinity."""


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
        return math.prod(self.shape)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, entry: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked against the spec and the file."""
    def bad(message: str) -> SafetensorsFormatError:
        return SafetensorsFormatError(path, message, f"tensor {name!r}")
    if not isinstance(entry, dict):
        raise bad("header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _STORAGE:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(_STORAGE)}")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of at most {_MAX_DIMS} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"data_offsets must be two integers 0 <= begin <= end <= {data_size}, the data size "
                  f"(truncated download?)")
    begin, end = offsets
    need = math.prod(shape) * np.dtype(_STORAGE[dtype]).itemsize
    if end - begin != need:
        raise bad(f"data_offsets span {end - begin} bytes but shape {shape} {dtype} needs {need}")
    return dtype, tuple(shape), begin, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a .safetensors header without touching tensor data. Every field is checked: a header that is a JSON
    object, entries with a known dtype, integer shape and offsets inside the data, no two tensors overlapping."""
    path = Path(path)
    with open_regular(path, error=SafetensorsFormatError) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(path, "file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            # the length's value is not quoted: for a file that is not safetensors it is 8 bytes of its content
            raise SafetensorsFormatError(path, f"the header length field is larger than the file ({size} bytes) "
                                         f"or than {_MAX_HEADER} bytes: not a safetensors file, or truncated")
        header = parse_json(f.read(n), path, error=SafetensorsFormatError, field="header")
    if not isinstance(header, dict):
        raise SafetensorsFormatError(path, f"must be a JSON object, not {type(header).__name__}", "header")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise SafetensorsFormatError(path, "must be a JSON object", "__metadata__")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, entry, size - base)
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise SafetensorsFormatError(path, f"data overlaps tensor {a!r}", f"tensor {b!r}")
    return infos


def check_finite(data: np.ndarray, info: TensorInfo) -> None:
    """Refuse NaN or infinity, naming the tensor; chunk by chunk so the check costs no full-size temporary."""
    if not np.issubdtype(data.dtype, np.floating):
        return
    flat = data.reshape(-1)
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if not np.isfinite(chunk).all():
            at = start + int(np.argmin(np.isfinite(chunk)))
            raise NonFiniteTensorError(info.file, f"holds NaN or infinity (first at flat index {at})",
                                       f"tensor {info.name!r}")


def load_tensor(info: TensorInfo, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
    """Read one tensor. Floating tensors are returned as `dtype` (float32 by default; None keeps
    the stored type, with BF16 widened to float32 since numpy has no bfloat16). NaN or infinity in a floating
    tensor raises NonFiniteTensorError: every exporter reads through here, so none writes such a value out."""
    storage = np.dtype(_STORAGE[info.dtype])
    arr = np.memmap(info.file, dtype=storage, mode="r", offset=info.offset, shape=info.shape or (1,))
    if not info.shape:
        arr = arr.reshape(())
    if info.dtype == "BF16":
        arr = bf16_bits_to_f32(arr)
    if dtype is not None and np.issubdtype(arr.dtype, np.floating):
        out = np.asarray(arr, dtype=dtype)
    else:
        out = np.array(arr)
    check_finite(out, info)
    return out


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
