"""`minicpmv-edge bench`: our runtime and llama.cpp's own multimodal path, same weights, same run.

Each path runs in its own spawned process (a fresh interpreter, so its peak RSS is its own). Per thread count:
both are loaded and warmed up (the vision encoder included: llama.cpp's own warm-up skips it) while their memory
is read after each stage, then their repetitions of "one image + a question, 128 answer tokens" alternate, quiet
and, with `--contended N`, again while N busy-loop processes load the CPU. Reported: median, min-max and IQR of
every stage, cached-image and follow-up-question TTFT (ours), peak RSS per stage for both paths, the per-token
overhead of each decode loop outside llama.cpp, the decode bound of this machine (measured memory bandwidth /
bytes of weights read per token) and a hardware fingerprint. `--llama-lib NAME=DIR` adds the LLM's prefill and
decode speed with other llama.cpp builds (e.g. the CPU-variants build), each in its own process, interleaved.
Output: llama-bench-style markdown, JSON, CSV and JSONL. Timings are measurements of this machine on this run;
ratios are what transfer.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime.memory import memory_status

QUESTION = "Describe this image in detail."
# The kernel comparison's prompt: plain prose, tokenized by the model's own vocabulary, repeated to length.
PROSE = ("The quick brown fox jumps over the lazy dog while the rain falls on the old stone bridge and a boat "
         "drifts slowly down the river towards the sea. ")
# CPU features worth knowing when comparing kernels (x86: /proc/cpuinfo "flags"; ARM: "Features").
KERNEL_FLAGS = ("sse4_2", "avx", "f16c", "fma", "bmi2", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp",
                "i8mm", "sve", "sve2", "bf16")
MAX_THREADS = 256
MAX_REPS = 1000
PhaseHook = Callable[[dict[str, Any]], None]


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(float(v))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """Half the range, relative to the median (± %)."""
        if len(self.values) < 2 or not self.median:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / abs(self.median)

    def quartiles(self) -> tuple[float, float]:
        if len(self.values) < 2:
            return (self.median, self.median)
        q = statistics.quantiles(self.values, n=4, method="inclusive")
        return q[0], q[2]

    def as_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles()
        lo, hi = (min(self.values), max(self.values)) if self.values else (float("nan"),) * 2
        return {"median": self.median, "spread": self.spread, "min": lo, "max": hi, "q1": q1, "q3": q3,
                "n": len(self.values), "values": self.values}


def peak_rss_mb() -> float:
    """ru_maxrss: only meaningful in a process that did not inherit a parent's peak over fork+exec."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


_SNAPSHOT_KEYS = {"peak": "peak_rss_mb", "rss": "rss_mb", "anon": "rss_anon_mb", "file": "rss_file_mb",
                  "shmem": "rss_shmem_mb"}


def memory_snapshot() -> dict[str, float]:
    """This process's memory now, MB: VmHWM (peak resident since exec), VmRSS, and VmRSS split into RssAnon (heap,
    llama.cpp's repacked weights, KV cache, ORT arena), RssFile (mmap'd model files) and RssShmem. Read inside the
    process it describes: Linux carries ru_maxrss over fork+exec, VmHWM starts afresh at exec."""
    status = memory_status()
    if status is None:               # not Linux: the peak only
        return {"peak_rss_mb": peak_rss_mb()}
    return {_SNAPSHOT_KEYS[k]: v / 2 ** 20 for k, v in status.items()}


def memory_bandwidth_gbs(size_mb: int = 1024, reps: int = 5, threads: int = 2) -> float:
    """Read bandwidth, GB/s: `threads` threads at once each sum a large array (numpy releases the GIL in the
    reduction), best of `reps`. A decode step is a read-only stream over the weights, so this is its limit."""
    import threading
    n = size_mb * 2 ** 20 // 4 // threads
    arrays = [np.ones(n, dtype=np.float32) for _ in range(threads)]
    best = float("inf")
    for _ in range(reps):
        workers = [threading.Thread(target=np.add.reduce, args=(a,)) for a in arrays]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return sum(a.nbytes for a in arrays) / best / 1e9


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of weights a decode step reads: every tensor except the token embedding (one row is read)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


# ----------------------------------------------------------------------------------------- hardware fingerprint
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo, or None where it does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, package = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def cpu_name() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware_fingerprint() -> dict[str, Any]:
    """What a timing depends on besides our code: CPU model and kernel-relevant flags, cores, RAM, OS, and the
    versions of the native runtimes. The llama.cpp build actually loaded (its CPU backend variant and
    `llama_print_system_info`) is added from the processes that loaded it (`llama_build_info`)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
        ram_gb = mem_kb / 2 ** 20
    except (OSError, StopIteration):
        ram_gb = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fp = {"cpu": cpu_name(), "machine": platform.machine(), "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
          "cores_physical": physical_cores(), "cores_logical": os.cpu_count(), "cores_usable": usable,
          "ram_gb": round(ram_gb, 1) if ram_gb else None, "os": platform.platform(), "kernel": platform.release(),
          "python": platform.python_version(), "llama_cpp_python": _version("llama_cpp_python"),
          "onnxruntime": _version("onnxruntime"), "numpy": np.__version__}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return fp


def _mapped_llama_libs() -> list[str]:
    """The llama.cpp/ggml shared objects mapped into this process (Linux), e.g. which libggml-cpu-<variant>.so
    ggml's loader picked."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if Path(p).name.startswith(("libggml", "libllama", "libmtmd")))


def llama_build_info() -> dict[str, Any]:
    """The llama.cpp build this process loaded: library files, CPU backend variant, its feature string."""
    import llama_cpp
    libs = _mapped_llama_libs()
    cpu = [Path(p).name for p in libs if Path(p).name.startswith("libggml-cpu")]
    return {"llama_cpp_python": llama_cpp.__version__, "libs": libs, "cpu_backend": ", ".join(cpu) or "built in",
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def default_llama_lib() -> Path | None:
    """llama-cpp-python's own library folder (found without loading it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def use_llama_lib(lib: Path) -> None:
    """Make this (fresh) process load llama.cpp from `lib`: llama-cpp-python reads LLAMA_CPP_LIB_PATH (libllama)
    and MTMD_CPP_LIB (libmtmd) at import, and both find their libggml* next to them ($ORIGIN). A build with
    GGML_BACKEND_DL keeps its CPU backends as libggml-cpu-<variant>.so files, which ggml only looks for in its
    compile-time GGML_BACKEND_DIR, the executable's folder and the working directory; here they are loaded from
    `lib`, the best-scoring variant for this CPU first, before llama.cpp initialises."""
    if "llama_cpp" in sys.modules:
        raise MiniCPMVEdgeError("llama.cpp is already loaded in this process; a build is chosen before the import")
    lib = lib.resolve()
    if not (lib / "libllama.so").is_file() and not (lib / "libllama.dylib").is_file():
        raise MiniCPMVEdgeError(f"{lib}: no libllama here (expected a llama-cpp-python lib folder)")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    if (lib / "libmtmd.so").is_file() or (lib / "libmtmd.dylib").is_file():
        os.environ["MTMD_CPP_LIB"] = str(lib)
    # else the installed libmtmd is loaded, and binds to this build's libllama/libggml already loaded (same sonames)
    variants = sorted(lib.glob("libggml-cpu-*.so")) + sorted(lib.glob("libggml-cpu-*.dylib"))
    if variants:
        ggml = ctypes.CDLL(str(next(p for p in (lib / "libggml.so", lib / "libggml.dylib") if p.exists())))
        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        if ggml.ggml_backend_reg_count() == 0:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(lib).encode())


# ------------------------------------------------------------------------------------- what runs in a worker
def _image_messages(image: str, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@contextlib.contextmanager
def _time_inside_llama_decode() -> Iterator[list[float]]:
    """Patch llama-cpp-python's `llama_decode` (both the package and the module name) to add its wall time to the
    yielded one-item list: what a decode loop spends outside it is its own per-token overhead."""
    import llama_cpp
    import llama_cpp.llama_cpp as low
    real = low.llama_decode
    spent = [0.0]

    def timed(*args):
        t0 = time.perf_counter()
        try:
            return real(*args)
        finally:
            spent[0] += time.perf_counter() - t0
    llama_cpp.llama_decode = low.llama_decode = timed
    try:
        yield spent
    finally:
        llama_cpp.llama_decode = low.llama_decode = real


def _overhead(decode_s: float, inside_s: float, steps: int) -> dict[str, float]:
    return {"decode_s": decode_s, "inside_llama_decode_s": inside_s, "steps": steps,
            "ms_per_token": (decode_s - inside_s) / steps * 1000 if steps > 0 else float("nan")}


class OursBench:
    """Our path. `warm_up()` once (vision included, memory read after each stage), then `rep()` per repetition:
    a cold first question, then the cached rows. Besides timings, each rep records per row how many prompt
    positions were computed and how many images came from the image cache, so the report shows what each row
    actually reused."""

    ROWS = ("preprocess", "vision", "resampler", "prefill", "ttft", "decode_tok_s", "repeat_ttft", "cached_ttft",
            "cached_cold_kv_ttft", "followup_ttft", "prepared_ttft", "slices")

    def __init__(self, spec: dict[str, Any]):
        from minicpmv_edge.runtime.bundle import load
        self.model = load(spec["bundle"], llm=spec["llm"], vision=spec["vision"], threads=spec["threads"],
                          n_ctx=spec["n_ctx"])
        self.memory = {"load": memory_snapshot()}
        self.n_decode, self.max_slices = spec["n_decode"], spec["max_slices"]
        self.image = spec["image"]
        self.msgs = _image_messages(spec["image"], QUESTION)
        self.other = _image_messages(spec["image"], "What colours are there?")

    def info(self) -> dict[str, Any]:
        m = self.model
        return {"llm": str(m.files["llm"]), "vision": str(m.files["vision"]), "resampler": type(m.resampler).__name__,
                "llama_cpp": llama_build_info()}

    def _chat(self, messages, stream: bool = False):
        return self.model.chat(messages, greedy=True, max_tokens=self.n_decode, max_slices=self.max_slices,
                               stream=stream)

    def warm_up(self) -> dict[str, Any]:
        """The first, cold request, in stages: the image encoded ahead (vision + resampler), then the answer,
        streamed, with memory read at its first token (prefill done) and at its end (decode done)."""
        m = self.model
        m.forget()
        m.prepare(self.msgs, max_slices=self.max_slices)
        self.memory["vision"] = memory_snapshot()
        for _ in self._chat(self.msgs, stream=True):
            self.memory.setdefault("prefill", memory_snapshot())
        self.memory["decode"] = memory_snapshot()
        return self.memory

    def _ask(self, out: dict[str, Any], row: str, messages):
        r = self._chat(messages)
        t = r.timings
        out["reuse"][row] = {"prompt_tokens": t.prompt_tokens, "prefilled_tokens": t.prefilled_tokens,
                             "vision_slices": t.slices, "image_cache_hits": t.image_cache_hits}
        out["values"][row] = t.first_token
        return r

    def rep(self) -> dict[str, Any]:
        m = self.model
        out: dict[str, Any] = {"values": {}, "reuse": {}}
        m.forget()                    # a first-time image: vision runs, nothing of the prompt is in the KV cache
        first = self._ask(out, "ttft", self.msgs)
        t = first.timings
        for k in ("preprocess", "vision", "resampler", "prefill"):
            out["values"][k] = getattr(t, k)
        out["values"]["decode_tok_s"] = t.decode_tok_s
        out["values"]["slices"] = t.slices
        # the same image and question again (regenerate, a second sample): all of the prompt is in the KV
        # cache but its last position, recomputed for its logits
        self._ask(out, "repeat_ttft", self.msgs)
        # the same image, another question: the image cache skips vision and the KV cache holds everything
        # up to the question
        self._ask(out, "cached_ttft", self.other)
        # the same image after the context was used for something else: image cache only
        m.decoder.reset()
        self._ask(out, "cached_cold_kv_ttft", self.msgs)
        # a follow-up in the same conversation (on random weights the answer may not re-tokenize to the same
        # ids, so its tokens can be prefilled again)
        self._ask(out, "followup_ttft", self.msgs + [{"role": "assistant", "content": first.text},
                                                     {"role": "user", "content": "Why?"}])
        # the image prepared while the user types (`prepare_image`: vision and the prompt through the image
        # prefilled); the row times the question only, as an app's user sees it
        m.forget()
        prepared = m.prepare_image(self.image, max_slices=self.max_slices)
        self._ask(out, "prepared_ttft", [{"role": "user", "content": [prepared, {"type": "text", "text": QUESTION}]}])
        return out

    def overhead(self) -> dict[str, float]:
        """One more cold request (not in the reps) with llama_decode timed: the decode loop's own cost per token
        (sampling, logits copy, detokenizing, streaming)."""
        self.model.forget()
        t_first = at_first = None
        steps = 0
        with _time_inside_llama_decode() as spent:
            for ev in self._chat(self.msgs, stream=True):
                if t_first is None:
                    t_first, at_first = time.perf_counter(), spent[0]
                if ev.result is not None:
                    steps = ev.result.timings.completion_tokens - 1
            end = time.perf_counter()
        return _overhead(end - (t_first or end), spent[0] - (at_first or 0.0), steps)

    def close(self) -> None:
        self.model.close()


class LlamaCppBench:
    """llama.cpp's own path: mtmd preprocesses, encodes with clip and evaluates; timed from the call. Decode
    tok/s counts the positions llama.cpp evaluated after the first token (not text chunks, which merge
    tokens that end inside a UTF-8 character)."""

    def __init__(self, spec: dict[str, Any]):
        import llama_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler

        from minicpmv_edge.runtime import llamacpp_log
        llamacpp_log.install()
        threads = spec["threads"]
        self.image = spec["image"]
        self.handler = MTMDChatHandler(clip_model_path=spec["mmproj"], verbose=False)
        self.llm = llama_cpp.Llama(spec["llm"], chat_handler=self.handler, n_ctx=spec["n_ctx"], n_threads=threads,
                                   n_threads_batch=threads, verbose=False, seed=0)
        self.handler._init_mtmd_context(self.llm)   # clip is loaded lazily otherwise: count it in "load"
        self.memory = {"load": memory_snapshot()}
        self.messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": Path(self.image).resolve().as_uri()}},
            {"type": "text", "text": QUESTION}]}]
        self.n_decode = spec["n_decode"]

    def info(self) -> dict[str, Any]:
        return {"llama_cpp": llama_build_info()}

    def _stream(self) -> Iterator[int]:
        """Run the request; yields once at the first answer token and once at the end, with llm.n_tokens."""
        llm = self.llm
        llm.reset()
        first = True
        for chunk in llm.create_chat_completion(self.messages, temperature=0.0, max_tokens=self.n_decode,
                                                stream=True):
            if first and chunk["choices"][0]["delta"].get("content") is not None:
                first = False
                yield llm.n_tokens
        if first:
            yield llm.n_tokens
        yield llm.n_tokens

    def _encode_image(self) -> None:
        """mtmd's vision encoder alone on the bench image (memory after vision; mtmd's chat path encodes and
        evaluates each image in one call)."""
        mt, ctx = self.handler._mtmd_cpp, self.handler.mtmd_ctx
        data = bytearray(Path(self.image).read_bytes())
        bitmap = mt.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer(data),
                                                     len(data), False)
        chunks = mt.mtmd_input_chunks_init()
        try:
            text = mt.mtmd_input_text()
            marker = mt.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), True, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise MiniCPMVEdgeError("mtmd could not tokenize the bench image")
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if mt.mtmd_encode_chunk(ctx, chunk) != 0:
                        raise MiniCPMVEdgeError("mtmd could not encode the bench image")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def warm_up(self) -> dict[str, Any]:
        self._encode_image()
        self.memory["vision"] = memory_snapshot()
        stream = self._stream()
        next(stream)
        self.memory["prefill"] = memory_snapshot()
        for _ in stream:
            pass
        self.memory["decode"] = memory_snapshot()
        return self.memory

    def rep(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        stream = self._stream()
        n_at_first = next(stream)
        first = time.perf_counter()
        n_end = list(stream)[-1]
        end = time.perf_counter()
        steps = n_end - n_at_first
        return {"values": {"ttft": first - t0,
                           "decode_tok_s": steps / (end - first) if steps > 0 and end > first else 0.0}}

    def overhead(self) -> dict[str, float]:
        with _time_inside_llama_decode() as spent:
            stream = self._stream()
            n_at_first = next(stream)
            first, at_first = time.perf_counter(), spent[0]
            n_end = list(stream)[-1]
            end = time.perf_counter()
        return _overhead(end - first, spent[0] - at_first, n_end - n_at_first)

    def close(self) -> None:
        self.llm.close()


class KernelBench:
    """The LLM alone through our decoder, like llama-bench's pp/tg: prefill of `prompt_tokens` prose tokens,
    then `n_decode` single-token steps (argmax). Used to compare llama.cpp builds (`--llama-lib`)."""

    def __init__(self, spec: dict[str, Any]):
        from minicpmv_edge.runtime.decoder import Decoder
        n_prompt = spec["prompt_tokens"]
        self.decoder = Decoder(spec["llm"], n_ctx=n_prompt + spec["n_decode"] + 8, threads=spec["threads"])
        self.memory = {"load": memory_snapshot()}
        ids = self.decoder.tokenize(PROSE)
        if not ids:   # a test GGUF without a usable tokenizer: fixed pseudo-random ids (speed does not care)
            ids = np.random.default_rng(0).integers(0, self.decoder.n_vocab, n_prompt).tolist()
        self.prompt = (ids * (n_prompt // len(ids) + 1))[:n_prompt]
        self.n_decode = spec["n_decode"]

    def info(self) -> dict[str, Any]:
        return {"llama_cpp": llama_build_info()}

    def warm_up(self) -> dict[str, Any]:
        self.rep()
        self.memory["decode"] = memory_snapshot()
        return self.memory

    def rep(self) -> dict[str, Any]:
        d = self.decoder
        d.reset()
        t0 = time.perf_counter()
        logits = d.prefill([self.prompt])
        t1 = time.perf_counter()
        for _ in range(self.n_decode):
            logits = d.step(int(np.argmax(logits)))
        t2 = time.perf_counter()
        return {"values": {"prefill_tok_s": len(self.prompt) / (t1 - t0), "decode_tok_s": self.n_decode / (t2 - t1)}}

    def close(self) -> None:
        self.decoder.close()


WORKER_KINDS = {"ours": OursBench, "llama_cpp": LlamaCppBench, "kernels": KernelBench}


def _worker_main(conn, kind: str, spec: dict[str, Any]) -> None:
    """A worker process: build the bench, answer `info`/`warm_up`/`rep`/`overhead`/`memory` until `close`."""
    bench = None
    try:
        if spec.get("llama_lib"):
            use_llama_lib(Path(spec["llama_lib"]))
        bench = WORKER_KINDS[kind](spec)
        conn.send(("ok", None))
        while True:
            cmd = conn.recv()
            if cmd == "close":
                break
            reply = memory_snapshot() if cmd == "memory" else getattr(bench, cmd)()
            conn.send(("ok", reply))
    except Exception as e:   # noqa: BLE001 - the parent reports it as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if bench is not None:
            bench.close()
        conn.close()


class Worker:
    """One bench path in its own spawned process (a fresh interpreter: its memory is its own, and a llama.cpp
    build chosen by `llama_lib` is the only one it loads)."""

    def __init__(self, kind: str, spec: dict[str, Any], label: str | None = None):
        ctx = multiprocessing.get_context("spawn")
        self.label = label or kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, kind, spec), daemon=True)
        self.proc.start()
        child.close()
        self._reply()

    def _reply(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise MiniCPMVEdgeError(f"bench worker {self.label} died (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise MiniCPMVEdgeError(f"bench worker {self.label}: {payload}")
        return payload

    def __call__(self, cmd: str) -> Any:
        self.conn.send(cmd)
        return self._reply()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send("close")
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _spin() -> None:
    x = 0
    while True:
        x += 1


@contextlib.contextmanager
def background_load(n: int) -> Iterator[None]:
    """`n` processes each spinning a Python busy loop at normal priority (one core each), for the duration."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.join()


# ---------------------------------------------------------------------------------------------------- the run
class Tally:
    """Per-path series of one (threads, condition) run, filled from the workers' per-rep replies."""

    def __init__(self):
        self.series: dict[str, Series] = {}
        self.reuse: dict[str, Any] = {}

    def add(self, rep: dict[str, Any]) -> None:
        for k, v in rep["values"].items():
            self.series.setdefault(k, Series()).add(v)
        self.reuse.update(rep.get("reuse", {}))

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: s.as_dict() for k, s in self.series.items()}
        if self.reuse:
            out["reuse"] = self.reuse
        return out


def _interleave(workers: dict[str, Worker], reps: int) -> dict[str, dict[str, Any]]:
    """`reps` rounds, each path once per round, in a fixed order: drift over minutes stays out of the ratios."""
    tallies = {name: Tally() for name in workers}
    for _ in range(reps):
        for name, w in workers.items():
            tallies[name].add(w("rep"))
    return {name: t.result() for name, t in tallies.items()}


def _conditions(contended: int) -> list[tuple[str, int]]:
    return [("quiet", 0)] + ([("contended", contended)] if contended else [])


def bench_image_file(image: Path | None, folder: Path) -> str:
    if image is not None:
        if not image.is_file():
            raise MiniCPMVEdgeError(f"{image}: image file not found")
        return str(image.resolve())
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (448, 448), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 60, 200, 220), fill=(220, 40, 40))
    d.rectangle((240, 80, 400, 240), fill=(40, 90, 220))
    path = folder / "bench.png"
    img.save(path)
    return str(path)


def _paths_run(bundle: Path, image: str, threads: int, *, reps: int, n_decode: int, max_slices: int | None,
               llm: str | None, vision: str | None, baseline: bool, n_ctx: int, contended: int,
               on_phase: PhaseHook) -> dict[str, Any]:
    """Ours vs llama.cpp mtmd at one thread count: quiet (and contended) runs, memory per stage, overheads."""
    spec = {"bundle": str(bundle), "image": image, "threads": threads, "n_decode": n_decode,
            "max_slices": max_slices, "llm": llm, "vision": vision, "n_ctx": n_ctx}
    with contextlib.ExitStack() as stack:
        workers = {"ours": Worker("ours", spec)}
        stack.callback(workers["ours"].close)
        info = {"ours": workers["ours"]("info")}
        mmproj = _bundle_mmproj(bundle) if baseline else None
        if mmproj is not None:
            workers["llama_cpp"] = Worker("llama_cpp", dict(spec, llm=info["ours"]["llm"], mmproj=str(mmproj)))
            stack.callback(workers["llama_cpp"].close)
            info["llama_cpp"] = workers["llama_cpp"]("info")
        memory = {name: w("warm_up") for name, w in workers.items()}
        runs = []
        for condition, procs in _conditions(contended):
            with background_load(procs):
                runs.append({"threads": threads, "condition": condition, "background_procs": procs,
                             **_interleave(workers, reps)})
            on_phase({"phase": "paths", "memory": memory, **runs[-1]})
        overhead = {name: w("overhead") for name, w in workers.items()}
        for name, w in workers.items():
            memory[name]["end"] = w("memory")
    return {"info": info, "memory": memory, "decode_overhead": overhead, "runs": runs}


def _bundle_mmproj(bundle: Path) -> Path | None:
    from minicpmv_edge.runtime.bundle import Bundle, FileKind
    mm = [f for f in Bundle.open(bundle).files if f.kind == FileKind.MMPROJ_GGUF]
    return mm[0].path if mm else None


def _kernels_run(llm_path: str, builds: dict[str, Path], threads: int, *, reps: int, n_decode: int,
                 prompt_tokens: int, contended: int, on_phase: PhaseHook) -> list[dict[str, Any]]:
    """The LLM's prefill and decode speed with each llama.cpp build, one process per build, interleaved."""
    spec = {"llm": llm_path, "threads": threads, "n_decode": n_decode, "prompt_tokens": prompt_tokens}
    out = []
    with contextlib.ExitStack() as stack:
        workers = {}
        for name, lib in builds.items():
            workers[name] = Worker("kernels", dict(spec, llama_lib=str(lib)), label=f"kernels[{name}]")
            stack.callback(workers[name].close)
        info = {name: w("info") for name, w in workers.items()}
        memory = {name: w("warm_up") for name, w in workers.items()}
        for condition, procs in _conditions(contended):
            with background_load(procs):
                results = _interleave(workers, reps)
            for name, res in results.items():
                out.append({"build": name, "lib": str(builds[name]), "threads": threads, "condition": condition,
                            "background_procs": procs, "llama_cpp": info[name]["llama_cpp"],
                            "memory": memory[name], **res})
            on_phase({"phase": "kernels", "threads": threads, "condition": condition, "builds": results})
    return out


def run_bench(bundle: Path, *, image: Path | None = None, reps: int = 5, n_decode: int = 128,
              max_slices: int | None = None, threads: int | list[int] = 2, llm: str | None = None,
              vision: str | None = None, baseline: bool = True, n_ctx: int = 4096, contended: int = 0,
              llama_libs: dict[str, Path] | None = None, prompt_tokens: int = 128,
              on_phase: PhaseHook | None = None) -> dict[str, Any]:
    """Per thread count, our path and llama.cpp's, each in its own process, loaded and warmed up, then their
    repetitions alternate (ours, llama.cpp, ours, ...): on a shared or thermally throttled machine the speed
    drifts over minutes, and alternating keeps the drift out of the ratios. `bundle` may also be a bare LLM GGUF:
    then only the kernel comparison runs (`llama_libs`, plus the installed build as "default"). `on_phase` gets
    each (threads, condition) phase's results as soon as it finishes: a run of an hour is not lost to its end."""
    on_phase = on_phase or (lambda _: None)
    sweep = [threads] if isinstance(threads, int) else list(threads)
    fp = hardware_fingerprint()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": fp["machine"], "cpu": fp["cpu"], "fingerprint": fp,
        "threads": sweep[0], "threads_sweep": sweep, "bundle": str(bundle), "n_decode": n_decode, "reps": reps,
        "order": "interleaved", "contended_procs": contended, "runs": [], "per_threads": {}}
    builds = dict(llama_libs or {})
    default = default_llama_lib()
    if builds and "default" not in builds and default is not None:
        builds = {"default": default, **builds}
    only_llm = bundle.is_file() and bundle.suffix == ".gguf"
    if only_llm and not builds:
        builds = {"default": default}
    with tempfile.TemporaryDirectory() as tmp:
        img = None if only_llm else bench_image_file(image, Path(tmp))
        llm_path = str(bundle) if only_llm else None
        for t in sweep:
            per: dict[str, Any] = {}
            if not only_llm:
                paths = _paths_run(bundle, img, t, reps=reps, n_decode=n_decode, max_slices=max_slices, llm=llm,
                                   vision=vision, baseline=baseline, n_ctx=n_ctx, contended=contended,
                                   on_phase=on_phase)
                llm_path = paths["info"]["ours"]["llm"]
                report["runs"] += paths.pop("runs")
                per.update(paths)
            if builds:
                report.setdefault("builds", []).extend(
                    _kernels_run(llm_path, builds, t, reps=reps, n_decode=n_decode, prompt_tokens=prompt_tokens,
                                 contended=contended, on_phase=on_phase))
            bw = memory_bandwidth_gbs(threads=t)
            per_tok = gguf_bytes_per_token(Path(llm_path))
            per["decode_bound"] = {"bandwidth_gbs": bw, "bytes_per_token": per_tok, "tok_s": bw * 1e9 / per_tok}
            report["per_threads"][str(t)] = per
    report["llm"] = Path(llm_path).name
    first = report["per_threads"][str(sweep[0])]
    report["decode_bound"] = first["decode_bound"]
    if not only_llm:
        ours_info = first["info"]["ours"]
        report["vision"] = Path(ours_info["vision"]).name
        report["resampler"] = ours_info["resampler"]
        fp["llama_cpp"] = ours_info["llama_cpp"]
        quiet = report["runs"][0]
        report["ours"] = quiet["ours"]
        if "llama_cpp" in quiet:
            report["llama_cpp"] = quiet["llama_cpp"]
        report["memory"] = first["memory"]
        report["ours_peak_rss_mb"] = first["memory"]["ours"]["end"].get("peak_rss_mb")
        if "llama_cpp" in first["memory"]:
            report["llama_cpp_peak_rss_mb"] = first["memory"]["llama_cpp"]["end"].get("peak_rss_mb")
    else:
        fp["llama_cpp"] = report["builds"][0]["llama_cpp"]
    return report


# ------------------------------------------------------------------------------------------------- reporting
def _ms(s: dict[str, Any]) -> str:
    return f"{s['median'] * 1000:.1f} ({s['min'] * 1000:.0f}–{s['max'] * 1000:.0f})"


def _rate(s: dict[str, Any]) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def markdown_table(report: dict[str, Any], run: dict[str, Any] | None = None,
                   decode_bound: dict[str, Any] | None = None) -> str:
    """One run's table (default: the quiet run at the first thread count): medians (min–max)."""
    run = run or {"ours": report["ours"], "llama_cpp": report.get("llama_cpp")}
    ours, base = run["ours"], run.get("llama_cpp")
    ratio = lambda a, b: f"{a / b:.2f}" if b and b == b else "–"   # noqa: E731
    rows = [("preprocess", _ms(ours["preprocess"]), "–", "–"),
            ("vision (all slices)", _ms(ours["vision"]), "–", "–"),
            ("resampler", _ms(ours["resampler"]), "–", "–"),
            ("prefill", _ms(ours["prefill"]), "–", "–")]
    if base:
        rows.append(("TTFT", _ms(ours["ttft"]), _ms(base["ttft"]),
                     ratio(ours["ttft"]["median"], base["ttft"]["median"])))
        rows.append(("decode tok/s", _rate(ours["decode_tok_s"]), _rate(base["decode_tok_s"]),
                     ratio(ours["decode_tok_s"]["median"], base["decode_tok_s"]["median"])))
    else:
        rows.append(("TTFT", _ms(ours["ttft"]), "–", "–"))
        rows.append(("decode tok/s", _rate(ours["decode_tok_s"]), "–", "–"))
    for key, label in (("repeat_ttft", "same image and question again"), ("cached_ttft", "same image, new question"),
                       ("cached_cold_kv_ttft", "same image, cold KV cache"), ("followup_ttft", "follow-up question"),
                       ("prepared_ttft", "image prepared ahead (prepare_image), then the question")):
        u = ours["reuse"][key]
        what = (f"TTFT, {label} ({u['prefilled_tokens']} of {u['prompt_tokens']} positions computed, "
                f"{u['vision_slices']} slices encoded)")
        rows.append((what, _ms(ours[key]), "–", f"{ours[key]['median'] / ours['ttft']['median']:.2f} of first"))
    bound = decode_bound or report["decode_bound"]
    rows.append(("decode bound (bandwidth / bytes per token)", f"{bound['tok_s']:.1f} tok/s", "–",
                 f"ours reaches {ours['decode_tok_s']['median'] / bound['tok_s'] * 100:.0f}%"))
    out = ["| stage | minicpmv-edge | llama.cpp mtmd | ratio |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def memory_table(memory: dict[str, dict[str, dict[str, float]]]) -> str:
    """Peak RSS (VmHWM) per stage and path, with the anonymous / file-backed split of RSS at that moment, MB."""
    stages = ("load", "vision", "prefill", "decode", "end")
    out = ["| path | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for path, snaps in memory.items():
        cells = []
        for s in stages:
            m = snaps.get(s)
            if not m:
                cells.append("–")
            elif "rss_anon_mb" in m:
                cells.append(f"{m['peak_rss_mb']:.0f} (anon {m['rss_anon_mb']:.0f} + file {m['rss_file_mb']:.0f})")
            else:
                cells.append(f"{m['peak_rss_mb']:.0f}")
        out.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def builds_table(builds: list[dict[str, Any]]) -> str:
    out = ["| threads | condition | build | CPU backend | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|"]
    for b in builds:
        out.append(f"| {b['threads']} | {b['condition']} | {b['build']} | {b['llama_cpp']['cpu_backend']} | "
                   f"{_rate(b['prefill_tok_s'])} | {_rate(b['decode_tok_s'])} |")
    return "\n".join(out)


def fingerprint_line(fp: dict[str, Any]) -> str:
    lc = fp.get("llama_cpp", {})
    return (f"{fp['cpu']} ({fp['machine']}; {fp['cores_physical']} physical / {fp['cores_logical']} logical cores, "
            f"{fp['ram_gb']} GB RAM; flags {' '.join(fp['cpu_flags']) or '–'}); {fp['os']}; Python {fp['python']}, "
            f"llama-cpp-python {fp['llama_cpp_python']} (CPU backend: {lc.get('cpu_backend', '?')}), "
            f"onnxruntime {fp['onnxruntime']}; fingerprint {fp['id']}")


def markdown_report(report: dict[str, Any]) -> str:
    parts = [f"{report['date']}, LLM {report['llm']}" +
             (f", vision {report['vision']}, resampler {report['resampler']}" if "vision" in report else "") +
             f", {report['reps']} interleaved reps, medians (min–max)", fingerprint_line(report["fingerprint"])]
    if report["fingerprint"].get("llama_cpp", {}).get("system_info"):
        parts.append(f"llama.cpp: `{report['fingerprint']['llama_cpp']['system_info']}`")
    for run in report["runs"]:
        per = report["per_threads"][str(run["threads"])]
        load = f", {run['background_procs']} busy-loop processes" if run["background_procs"] else ""
        parts += [f"### {run['threads']} threads, {run['condition']}{load}",
                  markdown_table(report, run, per["decode_bound"])]
    for t, per in report["per_threads"].items():
        if "memory" in per:
            parts += [f"### Memory, {t} threads (each path in its own process; MB; VmHWM, then RSS split)",
                      memory_table(per["memory"])]
            oh = per["decode_overhead"]
            parts.append("Decode loop overhead outside llama_decode, per token: " + ", ".join(
                f"{name} {o['ms_per_token']:.3f} ms ({o['steps']} steps)" for name, o in oh.items()))
    if report.get("builds"):
        parts += ["### llama.cpp builds (LLM alone: prefill and decode tok/s)", builds_table(report["builds"])]
    return "\n\n".join(parts)


def records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report flattened: one record per (threads, condition, path, build, metric), for CSV and JSONL."""
    fp = report["fingerprint"]
    out = []

    def add(threads, condition, path, build, metric, stats, unit):
        out.append({"threads": threads, "condition": condition, "path": path, "build": build, "metric": metric,
                    "unit": unit, **{k: stats.get(k) for k in ("median", "min", "max", "q1", "q3", "n")},
                    "values": stats.get("values", []), "llm": report["llm"], "fingerprint": fp})
    for run in report["runs"]:
        for path in ("ours", "llama_cpp"):
            for metric, stats in run.get(path, {}).items():
                if metric != "reuse":
                    unit = "tok/s" if metric.endswith("tok_s") else "count" if metric == "slices" else "s"
                    add(run["threads"], run["condition"], path, "default", metric, stats, unit)
    for t, per in report["per_threads"].items():
        for path, snaps in per.get("memory", {}).items():
            for stage, snap in snaps.items():
                for key, mb in snap.items():
                    add(int(t), "quiet", path, "default", f"{key}@{stage}",
                        {"median": mb, "min": mb, "max": mb, "q1": mb, "q3": mb, "n": 1, "values": [mb]}, "MB")
        for path, o in per.get("decode_overhead", {}).items():
            v = o["ms_per_token"]
            add(int(t), "quiet", path, "default", "decode_overhead_ms_per_token",
                {"median": v, "min": v, "max": v, "q1": v, "q3": v, "n": 1, "values": [v]}, "ms")
    for b in report.get("builds", []):
        for metric in ("prefill_tok_s", "decode_tok_s"):
            add(b["threads"], b["condition"], "kernels", b["build"], metric, b[metric], "tok/s")
    return out


CSV_FINGERPRINT = ("id", "cpu", "cores_physical", "cores_logical", "ram_gb", "os", "llama_cpp_python", "onnxruntime")


def write_csv(recs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = ["threads", "condition", "path", "build", "metric", "unit", "median", "min", "max", "q1", "q3", "n", "llm"]
    w = csv.writer(buf)
    w.writerow(cols + [f"fp_{k}" for k in CSV_FINGERPRINT] + ["fp_cpu_flags", "fp_cpu_backend"])
    for r in recs:
        fp = r["fingerprint"]
        w.writerow([r[c] for c in cols] + [fp.get(k) for k in CSV_FINGERPRINT] +
                   [" ".join(fp["cpu_flags"]), fp.get("llama_cpp", {}).get("cpu_backend")])
    return buf.getvalue()


def write_jsonl(recs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------- CLI
def _thread_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes counts separated by commas, e.g. 1,2,4 (got {text!r})")
    if not values or any(not 1 <= v <= MAX_THREADS for v in values):
        raise argparse.ArgumentTypeError(f"--threads: each count must be between 1 and {MAX_THREADS} (got {text!r})")
    return values


def _bounded(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v
    return parse


def _log_phase(phase: dict[str, Any], progress: Path | None) -> None:
    """One line on stderr per finished phase; with a progress file, the phase's full results appended to it."""
    series = phase.get("builds") if phase["phase"] == "kernels" else {
        k: v for k, v in phase.items() if k in ("ours", "llama_cpp")}
    summary = ", ".join(f"{name} {k} {s['median']:.4g}" for name, res in series.items()
                        for k, s in res.items() if k in ("ttft", "decode_tok_s", "prefill_tok_s", "prepared_ttft"))
    print(f"[bench] {phase['phase']} threads={phase['threads']} {phase['condition']} done: {summary}",
          file=sys.stderr, flush=True)
    if progress:
        with progress.open("a") as f:  # one write per line: a killed run leaves whole lines
            f.write(json.dumps(phase) + "\n")


def _llama_lib(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--llama-lib takes NAME=DIR, got {text!r}")
    if not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"--llama-lib {name}: {folder} is not a folder")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge bench", description=__doc__.strip().splitlines()[0])
    ap.add_argument("bundle", type=Path, help="a bundle folder, or an LLM .gguf (then only the build comparison)")
    ap.add_argument("--image", type=Path, help="image to ask about (default: a generated 448x448 picture)")
    ap.add_argument("--max-slices", type=int)
    ap.add_argument("--reps", type=_bounded(1, MAX_REPS), default=5,
                    help="interleaved repetitions per path (default 5)")
    ap.add_argument("--decode", type=_bounded(1, 4096), default=128, help="answer tokens per repetition (tg128)")
    ap.add_argument("--threads", type=_thread_list, default=[os.cpu_count() or 2],
                    help="thread counts, e.g. 1,2,4: one run per count (default: all logical cores)")
    ap.add_argument("--contended", type=_bounded(0, MAX_THREADS), nargs="?", const=1, default=0, metavar="N",
                    help="also run every measurement while N busy-loop processes load the CPU (default N: 1)")
    ap.add_argument("--llama-lib", type=_llama_lib, action="append", default=[], metavar="NAME=DIR",
                    help="also time the LLM alone with the llama.cpp build in DIR (a llama_cpp/lib folder), "
                         "against the installed one; repeatable")
    ap.add_argument("--prompt-tokens", type=_bounded(1, 8192), default=128,
                    help="prompt length of the build comparison's prefill (pp128)")
    ap.add_argument("--llm", help="LLM precision in the bundle")
    ap.add_argument("--vision", help="vision precision in the bundle")
    ap.add_argument("--no-baseline", action="store_true", help="skip llama.cpp's own path")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    ap.add_argument("--csv", type=Path, help="also write one row per measured series here (CSV)")
    ap.add_argument("--jsonl", type=Path, help="the same rows as JSON lines, each with the full fingerprint")
    ap.add_argument("--markdown", type=Path, help="also write the printed tables here")
    ap.add_argument("--progress", type=Path,
                    help="append each finished phase's results here as one JSON line (default: next to --json)")
    args = ap.parse_args(argv)
    if not args.bundle.exists():
        ap.error(f"{args.bundle}: no such bundle folder or GGUF file")
    progress = args.progress or (args.json.with_suffix(".progress.jsonl") if args.json else None)
    if progress:
        progress.unlink(missing_ok=True)
    report = run_bench(args.bundle, image=args.image, reps=args.reps, n_decode=args.decode,
                       max_slices=args.max_slices, threads=args.threads, llm=args.llm, vision=args.vision,
                       baseline=not args.no_baseline, contended=args.contended, llama_libs=dict(args.llama_lib),
                       prompt_tokens=args.prompt_tokens, on_phase=lambda ph: _log_phase(ph, progress))
    text = markdown_report(report)
    print(text)
    recs = records(report)
    for path, body in ((args.json, lambda: json.dumps(report, indent=2) + "\n"), (args.csv, lambda: write_csv(recs)),
                       (args.jsonl, lambda: write_jsonl(recs)), (args.markdown, lambda: text + "\n")):
        if path:
            _write(path, body())
    return 0
