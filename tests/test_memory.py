"""Memory (#18): the /proc readers the bench uses, how the LLM weights are held per load mode (each measured in
its own process, so one load does not inflate the other), and low-memory mode freeing the vision session."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minicpmv_edge
from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.runtime import memory
from minicpmv_edge.workflows.demo import demo_image

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS figures come from /proc")


@linux_only
def test_memory_status_follows_an_allocation():
    before = memory.memory_status()
    assert before is not None and before["rss"] > 0 and before["anon"] + before["file"] <= before["rss"]
    # 64 MiB of fresh private pages from the kernel, touched (a malloc'd block could reuse heap that earlier tests in
    # this process freed and left resident, and not grow RSS at all)
    block = mmap.mmap(-1, 64 * 2 ** 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.write(b"\x01" * (64 * 2 ** 20))
    after = memory.memory_status()
    grew = after["anon"] - before["anon"]
    print(f"\n64 MiB allocated: RssAnon +{grew / 2 ** 20:.1f} MiB, peak {after['peak'] / 2 ** 20:.0f} MiB")
    assert 60 * 2 ** 20 <= grew <= 80 * 2 ** 20
    assert memory.peak_rss_bytes() >= memory.rss_bytes() >= after["rss"] - 8 * 2 ** 20
    block.close()
    assert memory.peak_rss_bytes() >= after["rss"] - 4 * 2 ** 20   # the peak remembers the freed block (the
    # kernel updates VmHWM lazily: within a few pages)
    if memory.reset_peak():                                    # a stage's own peak starts from here
        assert memory.peak_rss_bytes() < after["rss"] - 32 * 2 ** 20


def test_load_mode_per_platform():
    assert memory.llama_repacks_weights("x86_64", {"avx2", "fma"})
    assert not memory.llama_repacks_weights("x86_64", {"sse4_2"})
    assert memory.llama_repacks_weights("aarch64", {"asimd", "asimddot"})
    assert memory.llama_repacks_weights("aarch64", {"asimd", "i8mm"})
    assert not memory.llama_repacks_weights("aarch64", {"asimd"})
    assert not memory.llama_repacks_weights("riscv64", {"v"})
    for mode in ("read", "mmap", "mmap-norepack"):
        assert memory.resolve_load_mode(mode) == mode
    assert memory.resolve_load_mode("auto") in ("read", "mmap")
    assert memory.resolve_load_mode(None, low_memory=True) == "mmap-norepack"
    with pytest.raises(MiniCPMVEdgeError, match="'mapped' is not one of"):
        memory.resolve_load_mode("mapped")


_LOAD_ONE = """
import json, sys
import llama_cpp
from minicpmv_edge.runtime import memory
from minicpmv_edge.runtime.decoder import Decoder
llama_cpp.llama_backend_init()
before = memory.memory_status()
dec = Decoder(sys.argv[1], n_ctx=256, load_mode=sys.argv[2])
after = memory.memory_status()
print(json.dumps({"mode": dec.load_mode, "file": after["file"] - before["file"], "anon": after["anon"] - before["anon"]}))
"""


@linux_only
def test_weights_are_read_or_mapped_as_the_load_mode_says(tiny_bundle):
    """"read": the GGUF is copied into llama.cpp's buffers (anonymous memory), no file pages stay mapped; "mmap":
    the file pages are mapped (resident file memory grows by about the file). Each load in its own process; the
    two are compared with each other, so llama.cpp's own code pages (a few MB of file memory) cancel out."""
    gguf = next(Path(tiny_bundle("4.5")).glob("*F32*.gguf"))
    size = gguf.stat().st_size
    got = {}
    for mode in ("read", "mmap"):
        out = subprocess.run([sys.executable, "-c", _LOAD_ONE, str(gguf), mode], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{gguf.name} ({size / 2 ** 20:.1f} MiB): " + ", ".join(
        f"{m}: file +{g['file'] / 2 ** 20:.1f} MiB, anon +{g['anon'] / 2 ** 20:.1f} MiB" for m, g in got.items()))
    assert got["read"]["mode"] == "read" and got["mmap"]["mode"] == "mmap"
    assert got["mmap"]["file"] - got["read"]["file"] >= 0.8 * size
    assert got["read"]["anon"] - got["mmap"]["anon"] >= 0.8 * size


def test_low_memory_frees_the_vision_session_and_answers_the_same(tiny_bundle):
    image = demo_image(448)
    messages = [{"role": "user", "content": [image, "What is this?"]}]
    normal = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    try:
        want = normal.chat(messages, greedy=True, max_tokens=12).token_ids
    finally:
        normal.close()
    low = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M", low_memory=True)
    try:
        assert low.decoder.load_mode == "mmap-norepack" and low.vision.session is not None
        first = low.chat(messages, greedy=True, max_tokens=12)
        assert low.vision.session is None            # freed once the request's images were encoded
        low.forget()                                 # encode again: the session is loaded back on demand
        second = low.chat(messages, greedy=True, max_tokens=12)
        assert first.token_ids == second.token_ids == want and second.timings.slices > 0
        assert low.vision.session is None
    finally:
        low.close()


def test_low_memory_context_quantizes_the_kv_cache_and_shrinks_micro_batches(tiny_bundle):
    """--low-memory's context (memory.low_memory_context): a q8_0 KV cache holds the same positions in about
    8.5/16 of the f16 cache's bytes (llama.cpp's saved sequence state is the cache's contents), with 128-token
    micro-batches, and a prompt longer than one micro-batch still prefills to the same greedy answer."""
    import llama_cpp

    from minicpmv_edge.runtime.decoder import Decoder
    gguf = next(Path(tiny_bundle("4.5")).glob("*Q4_K_M*.gguf"))
    assert memory.low_memory_context(False) == {}
    sizes, answers = {}, {}
    for name, kwargs in (("f16", {}), ("q8_0", memory.low_memory_context(True))):
        dec = Decoder(gguf, n_ctx=1024, **kwargs)
        try:
            assert dec.kv_type == name and dec.n_ubatch == (128 if name == "q8_0" else 512)
            prompt = dec.tokenize("word " * 300)            # hundreds of positions: several micro-batches
            answers[name] = [int(np.argmax(dec.prefill([prompt])))]
            sizes[name] = llama_cpp.llama_state_seq_get_size(dec.ctx, 0)
        finally:
            dec.close()
    print(f"\nsequence state after {len(prompt)} positions: f16 {sizes['f16']} B, q8_0 {sizes['q8_0']} B "
          f"({sizes['q8_0'] / sizes['f16']:.3f})")
    assert 0.45 < sizes["q8_0"] / sizes["f16"] < 0.6
    assert answers["q8_0"] == answers["f16"]
    with pytest.raises(MiniCPMVEdgeError, match="KV cache type 'q4' is not one of"):
        Decoder(gguf, n_ctx=256, kv_type="q4")
