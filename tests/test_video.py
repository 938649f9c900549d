"""Video frame sampling vs an independent transcription of OpenBMB's `encode_video` recipe, on small videos
generated here with PyAV (moving shapes, known frame counts and rates, VFR, audio, a corrupt packet)."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")   # the `video` extra; setup.sh installs it

from minicpmv_edge.runtime.video import (VideoInputError, load_video, plan_frames, probe, read_frames,  # noqa: E402
                                         video_from_images)


def make_video(path: Path, n: int, fps: int = 30, size=(96, 64), *, vfr: bool = False, audio: bool = False,
               codec: str = "libx264", container_fmt: str | None = None) -> Path:
    """A square moving right one step per frame; frame i has green = i % 256 (so a frame tells its index)."""
    c = av.open(str(path), "w", format=container_fmt)
    s = c.add_stream(codec, rate=fps)
    s.width, s.height = size
    s.pix_fmt = "yuv420p"
    if vfr:
        s.codec_context.time_base = Fraction(1, 1000)
    a = c.add_stream("aac", rate=16000) if audio else None
    t_ms = 0
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        x = (i * 2) % (size[0] - 8)
        img[10:18, x:x + 8, 0] = 255
        img[..., 1] = (i * 7) % 256
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        if vfr:   # alternate 20 ms and 50 ms gaps
            frame.pts, frame.time_base = t_ms, Fraction(1, 1000)
            t_ms += 20 if i % 2 else 50
        for p in s.encode(frame):
            c.mux(p)
        if a is not None and i % 3 == 0:
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate = 16000
            for p in a.encode(af):
                c.mux(p)
    for p in s.encode():
        c.mux(p)
    if a is not None:
        for p in a.encode():
            c.mux(p)
    c.close()
    return path


# ---- independent transcription of the official recipe (OpenBMB README, "Chat with Video") ---------------

def official_encode_video(path: Path, choose_fps: float = 3, force_packing: int | None = None,
                          max_num_frames: int = 180, max_num_packing: int = 3):
    """Decord's VideoReader replaced by decoding every frame with PyAV (len(vr) = frames decoded,
    get_avg_fps = the stream's average rate); the arithmetic is the recipe's, line for line."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        fps = float(st.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
    video_duration = len(frames) / fps
    if choose_fps * int(video_duration) <= max_num_frames:
        packing_nums = 1
        choose_frames = round(min(choose_fps, round(fps)) * min(max_num_frames, video_duration))
    else:
        packing_nums = math.ceil(video_duration * choose_fps / max_num_frames)
        if packing_nums <= max_num_packing:
            choose_frames = round(video_duration * choose_fps)
        else:
            choose_frames = round(max_num_frames * max_num_packing)
            packing_nums = max_num_packing
    gap = len(frames) / choose_frames
    frame_idx = np.array([int(i * gap + gap / 2) for i in range(choose_frames)])
    if force_packing:
        packing_nums = min(force_packing, max_num_packing)
    frame_idx_ts = frame_idx / fps
    scale = np.arange(0, video_duration, 0.1)
    # nearest neighbour on the sorted scale (the recipe uses a KD-tree; same answer in 1-D, ties to the lower)
    pos = np.clip(np.searchsorted(scale, frame_idx_ts), 1, len(scale) - 1)
    lower, upper = scale[pos - 1], scale[pos]
    nearest = np.where(frame_idx_ts - lower <= upper - frame_idx_ts, lower, upper)
    frame_ts_id = (nearest / 0.1).astype(np.int32)
    groups = [list(frame_ts_id[i:i + packing_nums]) for i in range(0, len(frame_ts_id), packing_nums)]
    return [frames[i] for i in frame_idx], list(frame_idx), groups


@pytest.mark.parametrize("n, fps, choose_fps, force", [(90, 30, 3, None), (45, 15, 3, 3), (300, 25, 5, None),
                                                     (61, 30, 3, 2), (7, 10, 3, None), (2000, 30, 3, None)])
def test_sampling_matches_the_official_recipe(tmp_path, n, fps, choose_fps, force):
    path = make_video(tmp_path / "v.mp4", n, fps, size=(32, 32))
    want_frames, want_idx, want_groups = official_encode_video(path, choose_fps, force)
    video = load_video(path, choose_fps=choose_fps, force_packing=force)
    print(f"\n{n} frames @ {fps} fps, choose_fps {choose_fps}: {len(want_idx)} frames, groups {want_groups[:3]}…")
    assert video.plan.indices == want_idx
    assert video.plan.groups == [list(map(int, g)) for g in want_groups]
    for got, want in zip(video.frames, want_frames):
        assert np.array_equal(np.asarray(got), want)


def test_long_video_packs_frames(tmp_path):
    """A 200 s clip at 3 fps is 600 frames: more than 180 positions, so frames are packed 3 per group."""
    plan = plan_frames(6000, 30.0, choose_fps=3)
    assert len(plan.indices) == 540 and plan.packing == 3 and len(plan.groups) == 180
    assert plan_frames(6000, 30.0, choose_fps=3, force_packing=2).packing == 2
    assert plan_frames(6000, 30.0, choose_fps=3, max_packing=6).packing == 4


def test_sparse_frames_are_seeked_to_exactly(tmp_path):
    """Picks 2+ s apart use keyframe seeks; the frames must still be exactly the ones asked for."""
    path = make_video(tmp_path / "long.mp4", 900, 30, size=(32, 32))
    idx = [5, 200, 450, 899]
    seeked = read_frames(path, idx, 30.0)
    with av.open(str(path)) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for i, frame in zip(idx, seeked):
        assert np.array_equal(np.asarray(frame), every[i]), i


def test_variable_frame_rate_and_audio(tmp_path):
    vfr = make_video(tmp_path / "vfr.mp4", 60, 30, vfr=True)
    _, want_idx, want_groups = official_encode_video(vfr)
    got = load_video(vfr)
    assert got.plan.indices == want_idx and got.plan.groups == [list(map(int, g)) for g in want_groups]
    with_audio = make_video(tmp_path / "audio.mp4", 45, 15, audio=True)
    with av.open(str(with_audio)) as c:
        assert c.streams.audio, "the test video should carry an audio track"
    _, want_idx, _ = official_encode_video(with_audio)
    assert load_video(with_audio).plan.indices == want_idx


def test_corrupt_packet_still_gives_frames(tmp_path):
    path = make_video(tmp_path / "c.mp4", 90, 30)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 400] = bytes(400)   # zero a run of bytes inside the media data
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    video = load_video(bad)
    assert len(video.frames) == len(video.plan.indices) and video.frames[0].size == (96, 64)


def test_frames_from_an_app(tmp_path):
    from PIL import Image
    imgs = [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(20)]
    ts = [i * 0.25 for i in range(20)]   # 4 fps camera for 5 s
    video = video_from_images(imgs, ts, choose_fps=2, force_packing=2)
    assert len(video.frames) == 10 and video.plan.packing == 2
    assert video.plan.temporal_ids == [int(round(ts[i] / 0.1)) for i in video.plan.indices]
    with pytest.raises(VideoInputError, match="increase"):
        video_from_images(imgs, ts[::-1])


# ---- bad input ------------------------------------------------------------------------------------

def test_not_a_video(tmp_path):
    p = tmp_path / "x.mp4"
    p.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(VideoInputError, match="not a video"):
        load_video(p)
    with pytest.raises(VideoInputError, match="file not found"):
        load_video(tmp_path / "missing.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path):
    p = tmp_path / "a.m4a"
    c = av.open(str(p), "w")
    a = c.add_stream("aac", rate=16000)
    for _ in range(5):
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate = 16000
        for pk in a.encode(af):
            c.mux(pk)
    for pk in a.encode():
        c.mux(pk)
    c.close()
    with pytest.raises(VideoInputError, match="no video stream"):
        load_video(p)


def test_zero_frames(tmp_path):
    """A file with a video stream that holds no frames (only its audio track has packets)."""
    p = tmp_path / "empty.mkv"          # matroska keeps an empty stream (mp4 drops it)
    c = av.open(str(p), "w")
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    a = c.add_stream("aac", rate=16000)
    for _ in range(3):
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate = 16000
        for pk in a.encode(af):
            c.mux(pk)
    for pk in a.encode():
        c.mux(pk)
    c.close()
    assert p.is_file()
    with pytest.raises(VideoInputError, match="no frames|not a video|could be decoded"):
        load_video(p)


def test_ten_hour_duration_header_is_refused(tmp_path):
    """Two frames ten hours apart: the header says 10 h, and we refuse before decoding anything."""
    p = tmp_path / "10h.mp4"
    c = av.open(str(p), "w")
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    s.codec_context.time_base = Fraction(1, 1000)
    for pts in (0, 10 * 3600 * 1000):
        f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        f.pts, f.time_base = pts, Fraction(1, 1000)
        for pk in s.encode(f):
            c.mux(pk)
    for pk in s.encode():
        c.mux(pk)
    c.close()
    with pytest.raises(VideoInputError, match="over the 4 h limit"):
        probe(p)
