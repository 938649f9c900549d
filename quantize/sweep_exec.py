"""How sweep cells run: an append-only JSONL result log many processes can share, and two executors
(`local`: one after another in this process; `ray`: tasks on a Ray cluster, the optional `cluster` extra).

A cell is a pure function of its spec and a few shared inputs (paths on a filesystem every worker sees, and the
baseline arrays, put into Ray's object store once). Each finished cell appends its own row to the log, so a
sweep that is killed keeps every finished cell, and a rerun skips them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from minicpmv_edge.errors import MiniCPMVEdgeError, MissingExtraError

EXECUTORS = ("local", "ray")
MAX_ROW_BYTES = 1 << 20


class ResultLog:
    """One JSON object per line. A row is appended with a single `write` on an O_APPEND descriptor under an
    exclusive `flock`, so concurrent writers (Ray workers, several sweeps) never interleave or tear lines."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        if len(line) > MAX_ROW_BYTES:
            raise MiniCPMVEdgeError(f"{self.path}: a result row of {len(line)} bytes is too large")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)   # closing releases the lock

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row, in append order. A torn last line (a writer killed mid-write on a filesystem
        without atomic appends) is ignored, and the cell simply runs again."""
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise MiniCPMVEdgeError(f"{self.path}:{n}: not a JSON row") from None
                if not isinstance(row, dict):
                    raise MiniCPMVEdgeError(f"{self.path}:{n}: not a JSON object")
                out.append(row)
        return out


def hardware_tag(threads: int) -> dict[str, Any]:
    """Where a speed cell ran: a cluster is heterogeneous, so speed rows are only comparable within a tag."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "threads": threads, "system": platform.system()}


def checkpoint_id(ckpt) -> str:
    """A short content address for a checkpoint: its config, its tensor index (names, dtypes, shapes, sizes)
    and the first 4 KiB of every tensor's data (two synthetic checkpoints that differ only in seed differ here),
    without reading gigabytes."""
    h = hashlib.sha256()
    h.update((ckpt.root / "config.json").read_bytes())
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        h.update(f"{name}|{info.dtype}|{info.shape}|{info.nbytes}\n".encode())
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            h.update(f.read(min(info.nbytes, 4096)))
    return h.hexdigest()[:16]


def file_sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_local(fn: Callable[..., dict], specs: Sequence[Any], *shared: Any) -> Iterator[dict]:
    for spec in specs:
        yield fn(spec, *shared)


def run_ray(fn: Callable[..., dict], specs: Sequence[Any], *shared: Any, address: str | None = None,
            cpus_per_cell: float = 1.0, init_kwargs: dict[str, Any] | None = None) -> Iterator[dict]:
    """Each spec a Ray task; `shared` objects are put into the object store once and handed to every task.
    `address=None` starts (or joins) a local cluster; "auto" or "ray://host:10001" joins an existing one."""
    try:
        import ray
    except ModuleNotFoundError:
        raise MissingExtraError("cluster", "ray") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
    try:
        refs = [ray.put(obj) for obj in shared]
        task = ray.remote(num_cpus=cpus_per_cell, max_retries=1)(fn)
        pending = [task.remote(spec, *refs) for spec in specs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()
