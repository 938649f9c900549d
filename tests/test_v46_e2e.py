"""MiniCPM-V 4.6 end to end: a bundle exported from the tiny synthetic checkpoint (F32 GGUF, fp32 merger ONNX),
run by our runtime, against transformers' own `MiniCPMV4_6ForConditionalGeneration.generate` fed by transformers'
own `MiniCPMV4_6Processor` (never our torch code). Greedy tokens must be identical, 32 of them, for: one
1000x700 image (max_slice_nums 9), two images, a second turn on the warm session, the same image in 4x mode,
and thinking on. Plus llama.cpp's mtmd on our minicpmv4_6 mmproj, and the server, bench and sweep on 4.6."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers.models.minicpmv4_6")

N_NEW = 32
QUESTION = "What is in this picture?"


def _image(w: int, h: int, seed: int) -> Image.Image:
    """Structured pixels (gradients + blocks + noise), so every slice differs from its neighbours."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, ((x // 37 + y // 53) % 2) * 200], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def model46(tiny_bundle):
    from minicpmv_edge.runtime.bundle import load
    model = load(tiny_bundle("4.6"), llm="F32", vision="fp32")
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf46(tiny_checkpoint):
    from minicpmv_edge.export.reference_native import native_model, native_processor
    folder = tiny_checkpoint("4.6")
    return native_model(folder), native_processor(folder)


def _ours(messages, images):
    """Our messages: each image part carries its PIL image."""
    it = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": next(it)} if p["type"] == "image" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _hf_greedy(hf46, messages, images, mode: str, thinking: bool) -> tuple[int, list[int]]:
    from minicpmv_edge.export.reference_native import native_greedy
    model, processor = hf46
    return native_greedy(model, processor, messages, images, max_new_tokens=N_NEW, downsample_mode=mode,
                         thinking=thinking)


def _user(n_images: int, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


BIG = (1000, 700)
CASES = {
    "one 1000x700 image": ([_user(1, QUESTION)], [BIG], "16x", False),
    "two images": ([_user(2, "Compare the two pictures.")], [BIG, (300, 520)], "16x", False),
    "second turn": ([_user(1, QUESTION), {"role": "assistant", "content": "A striped pattern with noise."},
                     {"role": "user", "content": [{"type": "text", "text": "Which colours does it use?"}]}],
                    [BIG], "16x", False),
    "4x mode": ([_user(1, QUESTION)], [BIG], "4x", False),
    "thinking on": ([_user(1, QUESTION)], [BIG], "16x", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(model46, hf46, case):
    messages, sizes, mode, thinking = CASES[case]
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    n_hf, want = _hf_greedy(hf46, messages, images, mode, thinking)
    if case == "second turn":   # the first turn runs on the same session first: the second reuses its cache
        model46.chat(_ours(messages[:1], images), greedy=True, max_tokens=N_NEW, downsample_mode=mode)
    r = model46.chat(_ours(messages, images), greedy=True, max_tokens=N_NEW, downsample_mode=mode,
                     thinking=thinking)
    t = r.timings
    same = next((i for i, (a, b) in enumerate(zip(r.token_ids, want)) if a != b), min(len(want), len(r.token_ids)))
    print(f"\n[4.6 {case}] prompt {t.prompt_tokens} positions (transformers {n_hf}), {t.slices} slices, "
          f"{t.prefilled_tokens} prefilled; greedy tokens identical: {same}/{len(want)} (tolerance: all)"
          f"\n  ours {r.token_ids}\n  HF   {want}")
    assert t.prompt_tokens == n_hf
    assert len(want) == N_NEW, "transformers stopped early: the comparison would be shorter than asked"
    assert r.token_ids == want


def test_llama_cpp_mtmd_on_our_mmproj(model46, tiny_checkpoint, tmp_path):
    """llama.cpp's mtmd with our minicpmv4_6 mmproj and the bundle's qwen35 GGUF, unsliced 448x448 image (llama.cpp
    neither slices nor resizes it): the same embeddings as ours, the same positions for the image rows (mtmd
    places them at p0 + i in every M-RoPE section, as transformers and we do), and so, with `<image_id>` off (mtmd
    never writes it), the same prompt and the same greedy answer."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
    from minicpmv_edge.export.onnx_vision import open_vision_checkpoint
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip
    from minicpmv_edge.runtime.preprocess import preprocess_image

    mmproj = write_mmproj_gguf(open_vision_checkpoint(tiny_checkpoint("4.6")), tmp_path / "mmproj-F32.gguf", "F32")
    img = _image(448, 448, seed=3)
    pre = preprocess_image(img, slicing="llava_uhd_v46")
    assert pre.grid is None and pre.slices[0].tgt_size == (32, 32)
    ours = model46.vision.encode(pre.slices[0])
    with LlamaCppClip(mmproj, model46.files["llm"]) as clip:
        theirs = clip.encode(img)
        m = clip._mtmd
        chunks = m.mtmd_input_chunks_init()
        pixels = np.ascontiguousarray(np.asarray(img), dtype=np.uint8)
        bitmap = m.mtmd_bitmap_init(448, 448, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        try:
            marker = m.mtmd_default_marker()
            inp = m.mtmd_input_text(marker, len(marker), False, True)
            assert m.mtmd_tokenize(clip._ctx, chunks, ctypes.byref(inp), (ctypes.c_void_p * 1)(bitmap), 1) == 0
            image = [c for c in (m.mtmd_input_chunks_get(chunks, i) for i in range(m.mtmd_input_chunks_size(chunks)))
                     if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            n_pos = [m.mtmd_input_chunk_get_n_pos(c) for c in image]
            rows = m.mtmd_input_chunk_get_tokens_image(image[0])
            positions = [tuple(getattr(m.mtmd_image_tokens_get_decoder_pos(rows, 100, i), k) for k in "txy")
                         for i in (0, 1, 63)]
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)
    assert len(theirs) == 1 and theirs[0].shape == ours.shape
    cos = (ours * theirs[0]).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs[0], axis=1)
    assert n_pos == [64] and positions == [(100, 100, 100), (101, 101, 101), (163, 163, 163)]

    png = tmp_path / "probe-448.png"
    img.save(png)
    fmt = model46.prompt_format
    model46.prompt_format = type(fmt)(**{**fmt.__dict__, "use_image_id": False})
    try:
        r = model46.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                                      {"type": "text", "text": QUESTION}]}],
                         greedy=True, max_tokens=N_NEW)
    finally:
        model46.prompt_format = fmt
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = llama_cpp.Llama(str(model46.files["llm"]), chat_handler=handler, n_ctx=2048, verbose=False, seed=0,
                          type_k=0, type_v=0, flash_attn=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png.as_uri()}}, {"type": "text", "text": QUESTION}]}],
        temperature=0.0, max_tokens=N_NEW)
    text = out["choices"][0]["message"]["content"]
    # llama-cpp-python drops bytes that are not valid UTF-8 where we write U+FFFD: compare bytes the same way
    ours_text = b"".join(model46.decoder.token_bytes(t) for t in r.token_ids).decode("utf-8", "ignore")
    print(f"\n[4.6] llama.cpp mtmd (F32 mmproj) vs our fp32 ONNX, unsliced 448x448: min cosine {cos.min():.7f} "
          f"(tolerance 0.9999); image rows 0, 1, 63 at p0=100: {positions}"
          f"\n  ours: {ours_text!r} ({len(r.token_ids)} tokens)"
          f"\n  mtmd: {text!r} ({out['usage']['completion_tokens']} tokens)")
    assert cos.min() >= 0.9999
    assert len(text) > 20 and ours_text.startswith(text)


# ---- the tools on a 4.6 bundle: server, bench --------------------------------------------------------------------

def test_server_answers_a_4_6_request_like_the_session(model46):
    """One loopback request per downsample mode: the same greedy tokens as the session, 4x gives 4x the image
    positions (the
    transformers comparison of 4x is above), and an unknown mode is a clear 400 naming the field while the server
    keeps answering."""
    import base64
    import io

    import httpx

    from loopback import serve_app
    from minicpmv_edge.runtime.server import ServerOptions, create_app

    img = _image(1000, 700, seed=0)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    app = create_app(model46, ServerOptions(name="tiny46", max_image_bytes=8 * 2 ** 20))
    with serve_app(app) as base:
        answers = {}
        for mode in ("16x", "4x"):
            r = httpx.post(base + "/v1/chat/completions", timeout=300, json={
                "model": "tiny46", "messages": messages, "max_tokens": 8, "temperature": 0,
                "downsample_mode": mode})
            assert r.status_code == 200, r.text
            answers[mode] = r.json()
        bad = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "tiny46", "messages": messages, "max_tokens": 8, "downsample_mode": "64x"})
        health = httpx.get(base + "/health", timeout=10)
    direct = model46.chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                        {"type": "text", "text": QUESTION}]}],
                          greedy=True, max_tokens=8)
    usage = {m: a["usage"]["prompt_tokens"] for m, a in answers.items()}
    print(f"\n[4.6 server] prompt tokens {usage}; 16x answer {answers['16x']['choices'][0]['message']['content']!r}; "
          f"bad mode -> {bad.status_code} {bad.json()['error']['message']!r}")
    assert answers["16x"]["choices"][0]["message"]["content"] == direct.text
    assert usage["16x"] == direct.timings.prompt_tokens
    assert usage["4x"] > 2 * usage["16x"]     # about 4x the image rows (4x slices are aligned to 28 px, not 56)
    assert bad.status_code == 400 and "downsample_mode" in bad.json()["error"]["message"]
    assert health.status_code == 200


def test_bench_runs_on_a_4_6_bundle(tiny_bundle, tmp_path, capsys):
    import json

    from minicpmv_edge.cli import main as cli
    out = tmp_path / "bench.json"
    assert cli(["bench", str(tiny_bundle("4.6")), "--reps", "1", "--decode", "8", "--llm", "Q4_K_M",
                "--json", str(out)]) == 0
    print(capsys.readouterr().out)
    report = json.loads(out.read_text())
    first = report["ours"]["reuse"]["ttft"]
    assert report["vision"].startswith("vision-merger-16x-") and report["resampler"] == "ResamplerInGraph"
    assert first["vision_slices"] >= 1 and first["prefilled_tokens"] == first["prompt_tokens"] > 64
    assert report["llama_cpp"]["ttft"]["median"] > 0


def test_sweep_runs_on_4_6(tiny_checkpoint, tmp_path):
    """The sweep over a 4.6 checkpoint (two cells, to stay short): merger graph of the default mode, no resampler
    file; F16 + fp16 vision close to the F16 + fp32 baseline, more slices allowed -> more slices made, and
    llama.cpp's clip on the minicpmv4_6 mmproj close to our fp32 graph."""
    import json

    from minicpmv_edge.workflows.sweep import run_sweep
    out = tmp_path / "sweep"
    rows = run_sweep(tiny_checkpoint("4.6"), out, llm_types=["F16"], vision_types=["fp16"], slices=[1, 4],
                     mmproj_types=["F16"], progress=False)
    by = {r["slices"]: r for r in rows}
    clip = json.loads((out / "sweep.json").read_text())["llama_cpp"]
    print("\n[4.6 sweep] " + "; ".join(f"F16 + fp16, max {s} slices: kld {r['kld_mean']:.2e} top1 {r['top1']:.3f} "
                                       f"vision cos {r['embedding_cosine']:.7f}, {r['sliced_image_slices']} slices"
                                       for s, r in by.items())
          + f"; llama.cpp clip F16 vs our fp32 cos {clip[0]['embedding_cosine']:.7f}")
    assert sorted(by) == [1, 4]
    assert by[1]["kld_mean"] < 1e-4 and 0.9999 < by[4]["embedding_cosine"] <= 1.0
    assert by[1]["sliced_image_slices"] == 1 < by[4]["sliced_image_slices"]
    assert not list((out / "files").glob("resampler-*")) and list((out / "files").glob("vision-merger-16x-*"))
    assert [c["mmproj"] for c in clip] == ["F16"] and clip[0]["embedding_cosine"] > 0.999


def test_prepare_image_on_4_6_counts_and_answers_like_a_cold_run(model46):
    """An image prepared ahead on 4.6 takes the per-slice `<|image_pad|>` counts of the default 16x mode (not the
    resampler versions' query_num) and answers the question with a cold run's prompt and greedy tokens (the
    recurrent state's snapshot decodes the image's last row on its own; measured: 32 of 32 equal)."""
    image = _image(1000, 700, 3)
    question = "What is in the picture?"
    model46.forget()
    cold = model46.chat([{"role": "user", "content": [{"type": "image", "image": image}, question]}],
                        greedy=True, max_tokens=N_NEW)
    model46.forget()
    prepared = model46.prepare_image(image)
    assert prepared.image_tokens == model46.image_tokens(image)
    assert prepared.slice_tokens is not None and len(prepared.slice_tokens) == prepared.slices > 1
    warm = model46.chat([{"role": "user", "content": [prepared, question]}], greedy=True, max_tokens=N_NEW)
    same = sum(a == b for a, b in zip(cold.token_ids, warm.token_ids))
    print(f"\n4.6 prepare_image: {prepared.slices} slices, {prepared.image_tokens} image positions, prompt "
          f"{warm.timings.prompt_tokens} (cold {cold.timings.prompt_tokens}), {warm.timings.prefilled_tokens} "
          f"prefilled after preparing, vision slices {warm.timings.slices}; tokens equal {same}/{len(cold.token_ids)}")
    assert warm.timings.prompt_tokens == cold.timings.prompt_tokens
    assert warm.timings.slices == 0 and warm.timings.prefilled_tokens < cold.timings.prompt_tokens // 4
    assert warm.token_ids == cold.token_ids
