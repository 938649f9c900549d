"""Reading files that come from strangers: checkpoints, bundles, weight files from a hub or a colleague.

Three rules, each in one function here so every reader applies them the same way:

* `inside(root, name)`: a name read from a file (an index's shard, a manifest's path) stays inside its folder,
  after resolving `..` and symlinks. The one symlink layout allowed out is the Hugging Face cache's
  (`snapshots/<rev>/x -> ../../blobs/<hash>`), so a checkpoint opened straight from the hub cache still works.
* `open_regular(path)`: only regular files are opened (a FIFO would block the reader forever; a device or a
  directory is never a weights file), and the size is known before anything is read.
* `read_json(path)`: bounded size, nesting depth and integer length, top level a JSON object; a 5000-digit
  integer or 100 000 nested brackets get an error naming the file, never a RecursionError.

Errors are raised as `error(path, message, field)`: the caller passes its own error type (CheckpointError, ...)
so the one-line message names its file and field; none quotes the file's bytes.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from minicpmv_edge.errors import UntrustedFileError

ErrorType = Callable[..., Exception]

MAX_JSON_BYTES = 64 * 2 ** 20   # a 151k-vocabulary tokenizer.json is ~11 MB
MAX_JSON_DEPTH = 64             # real configs and tokenizers nest < 10 deep
MAX_INT_DIGITS = 20             # every integer a config holds fits in 64 bits
MAX_TEXT_BYTES = 1 * 2 ** 20    # a chat template is a few KB

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def inside(root: Path, name: str, *, error: ErrorType = UntrustedFileError, source: Path | None = None,
           field: str | None = None) -> Path:
    """`root / name`, refused unless it resolves to a path inside `root` (or, for a Hugging Face cache snapshot,
    inside the cache's blobs folder). `source` is the file that named it, for the message."""
    where = source if source is not None else root
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute():
        raise error(where, f"{name!r} is not a relative file name inside {root}", field)
    base = Path(root).resolve()
    target = (Path(root) / name).resolve()
    allowed = [base]
    if base.parent.name == "snapshots":        # HF cache: models--org--name/snapshots/<rev>/ -> ../../blobs/
        allowed.append(base.parent.parent / "blobs")
    if not any(target == a or a in target.parents for a in allowed):
        raise error(where, f"{name!r} points outside the folder {root} (a path or symlink escape)", field)
    return Path(root) / name


def open_regular(path: Path, *, error: ErrorType = UntrustedFileError, field: str | None = None) -> BinaryIO:
    """Open a regular file for reading without ever blocking (O_NONBLOCK: a FIFO fails its check instead)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error(path, f"cannot open ({exc.strerror or exc.__class__.__name__})", field) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error(path, "not a regular file (a FIFO, device or folder where a file should be)", field)
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, limit: int, *, error: ErrorType = UntrustedFileError, field: str | None = None
               ) -> bytes:
    """A regular file's bytes, refused when it is larger than `limit`."""
    with open_regular(path, error=error, field=field) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(path, f"{size} bytes is more than the {limit} this file may have", field)
        return f.read(limit + 1)[:limit]


def read_text(path: Path, limit: int = MAX_TEXT_BYTES, *, error: ErrorType = UntrustedFileError,
              field: str | None = None) -> str:
    data = read_bytes(path, limit, error=error, field=field)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(path, f"not UTF-8 text (bad byte at offset {exc.start})", field) from None


def json_depth(data: bytes) -> int:
    """Deepest bracket nesting of a JSON text, in linear time without recursion (strings are skipped)."""
    brackets = _JSON_BRACKET.findall(_JSON_STRING.sub(b'""', data))
    if not brackets:
        return 0
    kinds = np.frombuffer(b"".join(brackets), dtype=np.uint8)
    steps = np.where((kinds == ord("[")) | (kinds == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(data: bytes, path: Path, *, error: ErrorType = UntrustedFileError, field: str | None = None,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes with bounded depth and integer length."""
    depth = json_depth(data)
    if depth > max_depth:
        raise error(path, f"JSON nested {depth} deep, more than {max_depth}", field)

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (more than {MAX_INT_DIGITS})")
        return int(text)

    try:
        return json.loads(data.decode("utf-8"), parse_int=bounded_int)
    except UnicodeDecodeError as exc:
        raise error(path, f"not UTF-8 text (bad byte at offset {exc.start})", field) from None
    except json.JSONDecodeError as exc:
        raise error(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", field) from None
    except ValueError as exc:     # bounded_int
        raise error(path, f"not accepted JSON: {exc}", field) from None
    except RecursionError:        # json_depth bounds the nesting already; this keeps the promise if it is raised
        raise error(path, "JSON nested too deep", field) from None


def read_json(path: Path, *, error: ErrorType = UntrustedFileError, limit: int = MAX_JSON_BYTES,
              field: str | None = None) -> dict[str, Any]:
    """A JSON file whose top level is an object, with every bound above applied."""
    data = parse_json(read_bytes(path, limit, error=error, field=field), path, error=error, field=field)
    if not isinstance(data, dict):
        raise error(path, f"top level must be a JSON object, not {type(data).__name__}", field)
    return data


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_INT_DIGITS", "MAX_TEXT_BYTES", "inside", "open_regular",
           "read_bytes", "read_text", "json_depth", "parse_json", "read_json"]
