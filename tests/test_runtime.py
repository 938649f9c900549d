"""The torch-free runtime on exported tiny bundles: greedy tokens identical to the torch reference, the image
and KV caches, streaming, llama.cpp's own path as an independent check, and bad input."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minicpmv_edge
from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.export.reference import MiniCPMVReference
from minicpmv_edge.workflows.demo import demo_image

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def model_26(tiny_bundle):
    m = minicpmv_edge.load(tiny_bundle("2.6"), llm="F32", exact=True)
    yield m
    m.close()


@pytest.fixture(scope="module")
def model_45(tiny_bundle):
    m = minicpmv_edge.load(tiny_bundle("4.5"), llm="F32", exact=True)
    yield m
    m.close()


def _user(*items):
    content = []
    for it in items:
        content.append({"type": "text", "text": it} if isinstance(it, str) else {"type": "image", "image": it})
    return {"role": "user", "content": content}


def _ref(tiny_checkpoint, version):
    return MiniCPMVReference.from_checkpoint(tiny_checkpoint(version))


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_greedy_tokens_match_torch_reference(version, tiny_checkpoint, request):
    """64 greedy tokens: one image (sliced), two images, and a two-turn conversation reusing the KV cache."""
    model = request.getfixturevalue(f"model_{version.replace('.', '')}")
    ref = _ref(tiny_checkpoint, version)
    a, b = demo_image(600), demo_image(448).rotate(90)
    cases = {
        "one image": ([_user(a, QUESTION)], [{"role": "user", "content": [a, QUESTION]}]),
        "two images": ([_user(a, b, "Compare them.")], [{"role": "user", "content": [a, b, "Compare them."]}]),
    }
    first = None
    for name, (ours_msgs, ref_msgs) in cases.items():
        got = model.chat(ours_msgs, greedy=True, max_tokens=64)
        want = ref.generate_greedy(ref_msgs, max_new_tokens=64)
        print(f"\n{version} {name}: {len(want)} reference tokens, identical: {got.token_ids == want}")
        assert got.token_ids == want
        first = first or got
    # second turn: the conversation so far plus a new question; only the new tokens are prefilled
    turn2 = [_user(a, QUESTION), {"role": "assistant", "content": model.decoder.detokenize(first.token_ids)},
             _user("And the colours?")]
    ref2 = [{"role": "user", "content": [a, QUESTION]},
            {"role": "assistant", "content": model.decoder.detokenize(first.token_ids)},
            {"role": "user", "content": "And the colours?"}]
    model.chat([_user(a, QUESTION)], greedy=True, max_tokens=64)     # bring the first turn back into the cache
    got = model.chat(turn2, greedy=True, max_tokens=64)
    want = ref.generate_greedy(ref2, max_new_tokens=64)
    print(f"{version} second turn: prompt {got.timings.prompt_tokens} tokens, prefilled "
          f"{got.timings.prefilled_tokens}; identical: {got.token_ids == want}")
    assert got.token_ids == want
    assert got.timings.prefilled_tokens < got.timings.prompt_tokens / 2


def test_same_image_twice_hits_the_cache(model_45):
    img = demo_image(700)
    msgs = [_user(img, QUESTION)]
    first = model_45.chat(msgs, greedy=True, max_tokens=16)
    model_45.decoder.reset()          # a cold KV cache: only the image cache can help
    again = model_45.chat(msgs, greedy=True, max_tokens=16)
    print(f"\nvision {first.timings.vision * 1000:.1f} ms -> {again.timings.vision * 1000:.1f} ms (cache hit)")
    assert again.timings.image_cache_hits == 1 and again.timings.vision == 0.0
    assert again.token_ids == first.token_ids
    # the same pixels as bytes (another input route) hit the cache too only if the bytes are equal: PNG both times
    buf = io.BytesIO()
    img.save(buf, "PNG")
    r1 = model_45.chat([_user(buf.getvalue(), QUESTION)], greedy=True, max_tokens=4)
    r2 = model_45.chat([_user(buf.getvalue(), QUESTION)], greedy=True, max_tokens=4)
    assert r2.timings.image_cache_hits == 1 and r1.token_ids == r2.token_ids


def test_streaming_yields_tokens_as_they_come(model_45):
    events = list(model_45.chat([_user(demo_image(448), QUESTION)], stream=True, greedy=True, max_tokens=24))
    deltas = [e for e in events if e.result is None and e.delta]
    assert len(deltas) >= 5 and events[-1].result is not None
    assert "".join(e.delta for e in deltas) == events[-1].result.text
    t = events[-1].result.timings
    assert t.first_token >= t.prefill > 0 and t.completion_tokens == 24 and events[-1].result.finish_reason == "length"


def test_seeded_sampling_repeats(model_45):
    msgs = [_user(demo_image(448), QUESTION)]
    a = model_45.chat(msgs, seed=7, max_tokens=24, temperature=1.0)
    b = model_45.chat(msgs, seed=7, max_tokens=24, temperature=1.0)
    c = model_45.chat(msgs, seed=8, max_tokens=24, temperature=1.0)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_thinking_switch(model_45, model_26):
    r = model_45.chat([_user(demo_image(448), QUESTION)], thinking=True, greedy=True, max_tokens=8)
    assert r.reasoning is not None
    with pytest.raises(MiniCPMVEdgeError, match="no thinking mode"):
        model_26.chat([_user(QUESTION)], thinking=True)


def test_embeddings_and_tokens_match_llama_cpp_mtmd(model_26, tiny_bundle):
    """For a 448×448 image llama.cpp neither slices nor resizes, so its clip embeddings must match ours; with
    `<image_id>` off (mtmd never emits it) the prompt layouts agree and so must the greedy answers."""
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from minicpmv_edge.runtime.bundle import FileKind
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip
    from minicpmv_edge.runtime.preprocess import preprocess_image
    bundle = model_26.bundle
    mmproj = [f.path for f in bundle.files if f.kind == FileKind.MMPROJ_GGUF][0]
    img = demo_image(448)
    s = preprocess_image(img).slices[0]
    ours = model_26.resampler.run(model_26.vision.encode(s), *s.tgt_size)
    with LlamaCppClip(mmproj, model_26.files["llm"]) as clip:
        theirs = clip.encode(img)[0]
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"\nours vs llama.cpp clip per-row cosine: min {cos.min():.7f} (tolerance 0.999)")
    assert cos.min() >= 0.999

    png = Path(tiny_bundle("2.6")) / "probe-448.png"
    img.save(png)
    model_26.prompt_format = type(model_26.prompt_format)(**{**model_26.prompt_format.__dict__, "use_image_id": False})
    try:
        r = model_26.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                                       {"type": "text", "text": QUESTION}]}],
                          greedy=True, max_tokens=40)
    finally:
        model_26.prompt_format = type(model_26.prompt_format)(**{**model_26.prompt_format.__dict__,
                                                                "use_image_id": True})
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = llama_cpp.Llama(str(model_26.files["llm"]), chat_handler=handler, n_ctx=2048, verbose=False, seed=0,
                          type_k=0, type_v=0, flash_attn=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png.as_uri()}}, {"type": "text", "text": QUESTION}]}],
        temperature=0.0, max_tokens=24)
    text = out["choices"][0]["message"]["content"]
    # llama-cpp-python drops bytes that are not valid UTF-8 where we write U+FFFD, and may run a few tokens past
    # max_tokens to finish a character: compare bytes the same way, ours (40 tokens) must start with theirs
    ours_text = b"".join(model_26.decoder.token_bytes(t) for t in r.token_ids).decode("utf-8", "ignore")
    print(f"ours: {ours_text!r} ({len(r.token_ids)} tokens)\nmtmd: {text!r} ({out['usage']['completion_tokens']} tokens)")
    assert len(text) > 20 and ours_text.startswith(text)


# ---- bad input: clear errors, the process stays alive ----------------------------------------------

def _png_header(w: int, h: int) -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    img = demo_image(300)
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, "JPEG")
    img.save(png, "PNG")
    files = {
        "zero-byte": (d / "zero.jpg", b""),
        "truncated JPEG": (d / "trunc.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2]),
        "truncated PNG": (d / "trunc.png", png.getvalue()[: len(png.getvalue()) // 2]),
        "corrupt PNG": (d / "corrupt.png", png.getvalue()[:100] + bytes(400) + png.getvalue()[500:]),
        "bomb": (d / "bomb.png", _png_header(30000, 30000)),
        "not an image": (d / "notes.png", b"hello, I am text" * 20),
    }
    for path, data in files.values():
        path.write_bytes(data)
    gif = d / "anim.gif"
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    files["animated GIF"] = (gif, None)
    files["missing"] = (d / "nope.jpg", None)
    return {k: v[0] for k, v in files.items()}


@pytest.mark.parametrize("case", ["zero-byte", "truncated JPEG", "truncated PNG", "corrupt PNG", "bomb",
                                  "not an image", "animated GIF", "missing"])
def test_bad_images_through_the_api(model_26, bad_files, case):
    with pytest.raises(MiniCPMVEdgeError) as info:
        model_26.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(bad_files[case])}},
                                                   {"type": "text", "text": "hi"}]}], max_tokens=4)
    print(f"\n{case}: {info.value}")
    assert str(bad_files[case].name) in str(info.value) or "bytes" in str(info.value)
    # the model still answers afterwards
    assert model_26.chat([_user("hello")], greedy=True, max_tokens=2).token_ids


def test_cmyk_jpeg_is_converted(model_26, tmp_path):
    p = tmp_path / "cmyk.jpg"
    demo_image(300).convert("CMYK").save(p, "JPEG")
    r = model_26.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(p)}},
                                                   {"type": "text", "text": "hi"}]}], greedy=True, max_tokens=4)
    assert r.timings.slices == 1


def test_prompt_longer_than_the_context(tiny_bundle):
    from minicpmv_edge.runtime.decoder import ContextOverflowError
    m = minicpmv_edge.load(tiny_bundle("2.6"), llm="F32", n_ctx=256)
    try:
        with pytest.raises(ContextOverflowError, match="context holds 256"):
            m.chat([_user(demo_image(900), "hi")], max_tokens=8)        # 1 + 4 slices = 320+ positions
        with pytest.raises(ContextOverflowError):
            m.chat([_user("word " * 400)], max_tokens=8)
        assert m.chat([_user("short")], greedy=True, max_tokens=2).token_ids   # still alive
    finally:
        m.close()


def test_cli_run_json_and_errors(tiny_bundle, tmp_path, bad_files):
    png = tmp_path / "x.png"
    demo_image(448).save(png)
    cmd = [sys.executable, "-m", "minicpmv_edge", "run", str(tiny_bundle("4.5")), "--image", str(png), "-p", "Hi",
           "--max-tokens", "6", "--json", "--greedy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["timings"]) >= {"preprocess", "vision", "resampler", "prefill", "first_token", "decode_tok_s"}
    assert out["timings"]["completion_tokens"] == 6
    bad = subprocess.run(cmd[:5] + ["--image", str(bad_files["truncated JPEG"]), "-p", "Hi"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "trunc.jpg" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "minicpmv_edge", "run", str(tmp_path / "nobundle"), "-p", "x"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "manifest.json" in missing.stderr and "Traceback" not in missing.stderr
