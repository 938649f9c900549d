"""Memory of this process (RSS, peak, anonymous vs file pages), how the LLM weights are loaded, and how many
threads to compute with by default.

How llama.cpp holds a GGUF's weights decides whether they are resident once or twice:
- mmap (llama.cpp's usual default): the file is mapped. Where the CPU backend *repacks* weights for its
  kernels (x86 AVX2/AVX-512: Q4_0/Q4_K/IQ4_NL/Q8_0 interleaved 8x8; ARM with dotprod/i8mm/SVE), it reads the
  mapped tensors into a second, repacked buffer, and the file pages it read stay mapped as well: measured on a
  Qwen3-0.6B-shaped Q4_K_M (373 MiB file): 650 MB RSS after load (250 anon + 390 file), weights held ~1.6x.
- "read" (LLAMA_LOAD_MODE_NONE): tensors are read into llama.cpp's own buffers, repacked ones straight into the
  repacked buffer: 440 MB (420 anon + 20 file), weights held once, same kernels.
- "mmap-norepack" (mmap, llama.cpp's extra buffer types off): no second copy and the weights stay clean file pages
  the kernel can drop and re-read under memory pressure (a phone without swap cannot drop anonymous memory),
  at the price of the plain (not repacked) matmul kernels: 438 MB (45 anon + 393 file).
So: where llama.cpp repacks, "read" (the default there); elsewhere "mmap" (nothing is copied, the pages are
shared and evictable); `--low-memory` picks "mmap-norepack", a q8_0 KV cache and small micro-batches
(`low_memory_context`), and frees the vision session after each request's images. Linux only reports these
figures (/proc); elsewhere the readers return None.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

from minicpmv_edge.errors import MiniCPMVEdgeError

LOAD_MODES = ("auto", "read", "mmap", "mmap-norepack")
_STATUS_FIELDS = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def memory_status(pid: int | str = "self") -> dict[str, int] | None:
    """{"rss", "peak", "anon", "file", "shmem"} of a process in bytes, from /proc/<pid>/status (VmRSS, VmHWM,
    RssAnon, RssFile, RssShmem); None where there is no /proc. `peak` is the high-water mark since the process started (or since
    `reset_peak()`)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            out[_STATUS_FIELDS[key]] = int(value.split()[0]) * 1024     # the kernel reports kB
    return out if len(out) == len(_STATUS_FIELDS) else None


def rss_bytes() -> int | None:
    """Resident memory of this process now, in bytes (None without /proc)."""
    s = memory_status()
    return s["rss"] if s else None


def peak_rss_bytes() -> int | None:
    """Highest resident memory of this process so far, in bytes (None without /proc)."""
    s = memory_status()
    return s["peak"] if s else None


def reset_peak() -> bool:
    """Restart the peak (VmHWM) at the current RSS, so a stage's own peak can be read (Linux >= 4.0); False where
    this is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def return_freed_heap() -> None:
    """Hand memory the C heap has freed back to the system (glibc keeps it otherwise: freeing a 440 MB ONNX session
    lowered RSS by 285 MB without this); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):     # not glibc (musl, Android's bionic)
            pass


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):       # x86 / ARM
            flags.update(value.split())
    return flags


def llama_repacks_weights(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether llama.cpp's CPU backend repacks quantized weights on this CPU (its CPU_REPACK buffer type has kernels
    for it): x86-64 with AVX2 (AVX-512 machines have it too), ARM64 with dotprod, i8mm or SVE."""
    machine = (machine or platform.machine()).lower()
    flags = _cpu_flags() if flags is None else flags
    if machine in ("x86_64", "amd64"):
        return "avx2" in flags or (not flags and sys.platform != "linux")   # no /proc: any x86-64 laptop has AVX2
    if machine in ("aarch64", "arm64"):
        return bool({"asimddot", "i8mm", "sve"} & flags)
    return False


def resolve_load_mode(mode: str | None = None, *, low_memory: bool = False) -> str:
    """"read", "mmap" or "mmap-norepack" for `mode` ("auto"/None: the platform's default, see the module doc)."""
    mode = mode or "auto"
    if mode not in LOAD_MODES:
        raise MiniCPMVEdgeError(f"load mode {mode!r} is not one of {', '.join(LOAD_MODES)}")
    if mode != "auto":
        return mode
    if low_memory:
        return "mmap-norepack"
    # macOS: Metal maps the same file pages for the GPU (unified memory), so mmap holds them once
    return "read" if sys.platform != "darwin" and llama_repacks_weights() else "mmap"


def low_memory_context(low_memory: bool) -> dict:
    """The llama.cpp context settings of `--low-memory` (Decoder keyword arguments), on top of its load mode.
    On edge-4b (Qwen3-4B shape, 151 936-token vocabulary, 4 096 context) llama.cpp logs a 576 MiB f16 KV cache and
    a 307 MiB compute buffer; q8_0 stores the cache in 0.54 of f16's bytes (tests/test_memory.py), and the
    buffer is reserved for the worst-case logits of one micro-batch (512 x 151 936 x 4 B = 297 MiB of it), so
    128-token micro-batches cut it to a quarter. Measured peak: 4 277 -> 3 993 MiB (bench/README)."""
    return {"n_ubatch": 128, "kv_type": "q8_0"} if low_memory else {}


def default_threads() -> int:
    """Physical cores this process may run on (SMT siblings counted once), as llama.cpp's own default: more
    threads than cores only make llama.cpp's barrier-synchronised workers wait for each other."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:                          # macOS, Windows
        return max((os.cpu_count() or 2) // 2, 1) if platform.machine().lower() in ("x86_64", "amd64") \
            else os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(len(cores), 1)
