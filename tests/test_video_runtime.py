"""Video through the runtime: 4.5's temporal resampler end to end against the torch reference, the
frames-as-images fallback for 2.6, and the token saving that packing buys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import minicpmv_edge
from minicpmv_edge.export.reference import MiniCPMVReference
from minicpmv_edge.runtime.prompt import image_text
from minicpmv_edge.runtime.video import load_video

av = pytest.importorskip("av")

QUESTION = "What happens in this video?"


def _clip(path, n=9, fps=3, size=(160, 120)):
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
    for i in range(n):
        img = np.full((size[1], size[0], 3), 40, np.uint8)
        x = 10 + i * 12
        img[40:80, x:x + 30] = (220, 60 + 15 * i, 40)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def test_nine_frames_packed_by_three_match_the_reference(tiny_bundle, tiny_checkpoint, tmp_path):
    path = _clip(tmp_path / "clip.mp4")
    model = minicpmv_edge.load(tiny_bundle("4.5"), llm="F32", exact=True)
    try:
        got = model.chat([{"role": "user", "content": [{"type": "video", "video": str(path), "fps": 3, "packing": 3},
                                                       {"type": "text", "text": QUESTION}]}],
                         greedy=True, max_tokens=32)
    finally:
        model.close()
    video = load_video(path, choose_fps=3, force_packing=3)
    assert len(video.frames) == 9 and video.plan.groups == [[0, 3, 7], [10, 13, 17], [20, 23, 27]]
    assert got.timings.video_frames == 9 and got.timings.video_blocks == 3

    # the reference: the same decoded frames through the torch temporal resampler, and the prompt the HF
    # processor builds for packed frames (one un-numbered placeholder per group, "\n" between, then the question)
    ref = MiniCPMVReference.from_checkpoint(tiny_checkpoint("4.5"))
    feats = ref.encode_frames(video.frames, video.plan.groups)
    fmt = model.prompt_format
    content = "\n".join(image_text(None, 0, fmt, use_image_id=False) for _ in range(3)) + "\n" + QUESTION
    text = ref.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False,
                                             chat_template=ref.ckpt.chat_template)
    want = ref.greedy_from_ids(ref.tokenizer(text)["input_ids"], [feats], 32)
    print(f"\n9 frames, packing 3 -> {got.timings.video_blocks} blocks of 64 tokens; "
          f"{len(want)} greedy tokens identical: {got.token_ids == want}")
    assert got.token_ids == want


def test_packing_saves_tokens_and_prefill(tiny_bundle, tmp_path):
    """The bench line of the video issue, measured on the tiny model: a 6-frame clip packed into one block
    (64 visual tokens) vs the same frames as 6 images (384)."""
    path = _clip(tmp_path / "six.mp4", n=6, fps=3)
    model = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    try:
        model.chat([{"role": "user", "content": "warm up"}], greedy=True, max_tokens=2)
        rows = {}
        for packing in (6, 1):
            model.decoder.reset()
            r = model.chat([{"role": "user", "content": [{"type": "video", "video": str(path), "packing": packing},
                                                         {"type": "text", "text": QUESTION}]}],
                           greedy=True, max_tokens=4)
            rows[packing] = r.timings
    finally:
        model.close()
    packed, single = rows[6], rows[1]
    print(f"\n6 frames packed: {packed.video_blocks * 64} visual tokens, prefill {packed.prefill * 1000:.1f} ms; "
          f"as 6 images: {single.video_blocks * 64} visual tokens, prefill {single.prefill * 1000:.1f} ms")
    assert packed.video_blocks == 1 and single.video_blocks == 6
    assert single.prompt_tokens - packed.prompt_tokens >= 5 * 64


def test_versions_without_temporal_resampler_take_frames_as_images(tiny_bundle, tmp_path):
    path = _clip(tmp_path / "clip.mp4", n=6)
    model = minicpmv_edge.load(tiny_bundle("2.6"), llm="Q4_K_M")
    try:
        r = model.chat([{"role": "user", "content": [{"type": "video", "video": str(path), "packing": 3},
                                                     {"type": "text", "text": QUESTION}]}], greedy=True, max_tokens=4)
    finally:
        model.close()
    assert r.timings.video_frames == 6 and r.timings.video_blocks == 6     # no packing without the 3D resampler


def test_temporal_resampler_kernels_vs_torch(tiny_checkpoint, tiny_bundle):
    """Groups of 1, 3 and 6 frames through the bundle's resampler (native kernels) vs the torch reference."""
    from minicpmv_edge.runtime.bundle import Bundle, FileKind
    from minicpmv_edge.runtime.resampler import load_resampler
    ref = MiniCPMVReference.from_checkpoint(tiny_checkpoint("4.5"))
    b = Bundle.open(tiny_bundle("4.5"))
    res = load_resampler([f.path for f in b.files if f.kind == FileKind.RESAMPLER_WEIGHTS][0], backend="auto")
    rng = np.random.default_rng(0)
    for ids in ([-1], [3, 5, 8], [0, 2, 4, 6, 8, 10]):
        grids = [(16, 20)] * len(ids)
        feats = [rng.standard_normal((h * w, ref.ckpt.vision.hidden_size)).astype(np.float32) for h, w in grids]
        got = res.run_group(feats, grids, ids)
        with torch.no_grad():
            want = ref.resampler.forward_temporal([torch.from_numpy(f) for f in feats], grids, [ids])[0].numpy()
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"\ngroup of {len(ids)}: max relative error {rel:.2e} (tolerance 1e-4)")
        assert rel <= 1e-4
    res.close()


def test_cli_run_with_a_video(tiny_bundle, tmp_path):
    import json
    import subprocess
    import sys
    path = _clip(tmp_path / "clip.mp4", n=9)
    proc = subprocess.run([sys.executable, "-m", "minicpmv_edge", "run", str(tiny_bundle("4.5")), "--video", str(path),
                           "--fps", "3", "--packing", "3", "-p", QUESTION, "--max-tokens", "4", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)["timings"]
    assert t["video_frames"] == 9 and t["video_blocks"] == 3 and t["video_decode"] > 0
    bad = tmp_path / "not-a-video.mp4"
    bad.write_bytes(b"nope" * 100)
    proc = subprocess.run([sys.executable, "-m", "minicpmv_edge", "run", str(tiny_bundle("4.5")), "--video", str(bad),
                           "-p", QUESTION], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "not a video" in proc.stderr and "Traceback" not in proc.stderr
