"""Video frames for MiniCPM-V: the official 4.5 sampling recipe, decoded with PyAV (the `video` extra).

The recipe (OpenBMB's `encode_video`): sample `choose_fps` frames per second uniformly (at most
MAX_NUM_FRAMES packed positions; beyond that, pack up to MAX_NUM_PACKING consecutive frames into one
64-token block), give each frame a temporal id in 0.1 s ticks, and group the ids `packing` at a time. Models
without the temporal resampler (2.6, 4.0) get every sampled frame as its own image instead.

Decoding seeks to the keyframe before each wanted frame when frames are sparse (a long video sampled at
3 fps) and decodes straight through when they are dense; frame indices count decoded frames, as the
recipe's frame reader does, so variable-frame-rate files sample the same frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from minicpmv_edge.errors import MiniCPMVEdgeError

MAX_NUM_FRAMES = 180     # packed positions at most
MAX_NUM_PACKING = 3      # the README's default; the model accepts up to 6 (facts.max_temporal_packing)
TIME_SCALE = 0.1         # seconds per temporal id
MAX_DURATION_S = 4 * 3600.0   # refuse longer files: a lying header should not make us decode for hours


class VideoInputError(MiniCPMVEdgeError):
    pass


@dataclass(frozen=True)
class FramePlan:
    """Which frames to take and how to group them (no pixels yet)."""
    n_frames: int                 # frames in the file (the reader's length)
    fps: float                    # average frame rate
    indices: list[int]            # sampled frame indices, increasing
    temporal_ids: list[int]       # one per sampled frame, in TIME_SCALE ticks
    packing: int                  # frames per group

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    @property
    def groups(self) -> list[list[int]]:
        return [self.temporal_ids[i:i + self.packing] for i in range(0, len(self.temporal_ids), self.packing)]


@dataclass
class Video:
    frames: list[Image.Image]
    plan: FramePlan
    timings: dict[str, float] = field(default_factory=dict)


def uniform_sample(length: int, count: int) -> list[int]:
    gap = length / count
    return [int(i * gap + gap / 2) for i in range(count)]


def plan_frames(n_frames: int, fps: float, *, choose_fps: float = 3.0, force_packing: int | None = None,
                max_packing: int = MAX_NUM_PACKING, max_num_frames: int = MAX_NUM_FRAMES) -> FramePlan:
    """The official recipe's arithmetic, given the reader's frame count and average frame rate."""
    if n_frames <= 0 or not fps or fps <= 0 or not math.isfinite(fps):
        raise VideoInputError(f"video has {n_frames} frames at {fps} fps: nothing to sample")
    duration = n_frames / fps
    if choose_fps * int(duration) <= max_num_frames:
        packing = 1
        count = round(min(choose_fps, round(fps)) * min(max_num_frames, duration))
    else:
        packing = math.ceil(duration * choose_fps / max_num_frames)
        if packing <= max_packing:
            count = round(duration * choose_fps)
        else:
            count = round(max_num_frames * max_packing)
            packing = max_packing
    count = max(1, min(count, n_frames)) if count > 0 else 1
    indices = uniform_sample(n_frames, count)
    if force_packing:
        packing = min(int(force_packing), max_packing)
    # nearest 0.1 s tick of each frame's timestamp, as an integer id (the recipe's map_to_nearest_scale)
    scale = np.arange(0, duration, TIME_SCALE)
    ts = np.asarray(indices, dtype=np.float64) / fps
    nearest = scale[np.abs(ts[:, None] - scale[None, :]).argmin(axis=1)] if scale.size else np.zeros_like(ts)
    ids = (nearest / TIME_SCALE).astype(np.int32)
    return FramePlan(n_frames, float(fps), indices, [int(i) for i in ids], max(1, packing))


def _open(path: Path):
    try:
        import av
    except ImportError:
        raise MiniCPMVEdgeError("video input needs PyAV: pip install 'minicpmv-edge[video]'") from None
    if not path.is_file():
        raise VideoInputError(f"{path}: file not found")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise VideoInputError(f"{path}: not a video FFmpeg can read ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoInputError(f"{path}: has no video stream")
    return av, container


def probe(path: str | Path) -> tuple[int, float]:
    """(frame count, average fps) of the first video stream, from the container's header."""
    path = Path(path)
    av, container = _open(path)
    with container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / 1e6 if container.duration else 0.0)
        n = int(stream.frames or round(duration * fps))
        if duration > MAX_DURATION_S or (fps and n / fps > MAX_DURATION_S):
            raise VideoInputError(f"{path}: says it lasts {max(duration, n / fps if fps else 0) / 3600:.1f} h, "
                                  f"over the {MAX_DURATION_S / 3600:.0f} h limit")
        if n <= 0 or fps <= 0:
            raise VideoInputError(f"{path}: the video stream reports no frames")
        return n, fps


def _is_constant_rate(stream) -> bool:
    avg, base = stream.average_rate, stream.base_rate or stream.guessed_rate
    return bool(avg and base and abs(float(avg) - float(base)) < 1e-3 * float(base))


def read_frames(path: str | Path, indices: Sequence[int], fps: float) -> list[Image.Image]:
    """Decode the frames at `indices` (increasing, counted in decode order).

    Dense picks (less than ~2 s apart) and variable-frame-rate files are decoded straight through, counting
    frames; sparse picks from a constant-rate file seek to the keyframe before each frame, then decode
    forward to the exact timestamp (a seek lands on a keyframe, not on the frame asked for)."""
    path = Path(path)
    av, container = _open(path)
    wanted = sorted(set(int(i) for i in indices))
    out: dict[int, Image.Image] = {}
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        sparse = len(wanted) > 1 and (wanted[-1] - wanted[0]) / (len(wanted) - 1) > 2 * fps
        try:
            if sparse and _is_constant_rate(stream) and stream.time_base:
                tb = float(stream.time_base)
                start = stream.start_time or 0
                for idx in wanted:
                    target = start + int(round(idx / fps / tb))
                    container.seek(target, stream=stream, backward=True, any_frame=False)
                    for frame in container.decode(stream):
                        if frame.pts is None or frame.pts >= target - 0.5 / fps / tb:
                            out[idx] = frame.to_image()
                            break
            else:
                index = -1
                for frame in container.decode(stream):
                    index += 1
                    if index in wanted and index not in out:
                        out[index] = frame.to_image()
                        if len(out) == len(wanted):
                            break
        except av.error.InvalidDataError:
            pass   # a corrupt packet: keep what decoded, fill below
        except av.error.FFmpegError as exc:
            raise VideoInputError(f"{path}: decoding failed ({exc})") from None
    if not out:
        raise VideoInputError(f"{path}: no frame could be decoded")
    # the header promised frames the file does not hold (truncated or corrupt tail): reuse the nearest earlier one
    for i in wanted:
        if i not in out:
            out[i] = out[max((k for k in out if k < i), default=min(out))]
    return [out[int(i)].convert("RGB") for i in indices]


def load_video(path: str | Path, *, choose_fps: float = 3.0, force_packing: int | None = None,
               max_packing: int = MAX_NUM_PACKING) -> Video:
    import time
    t0 = time.perf_counter()
    n, fps = probe(path)
    plan = plan_frames(n, fps, choose_fps=choose_fps, force_packing=force_packing, max_packing=max_packing)
    frames = read_frames(path, plan.indices, fps)
    return Video(frames, plan, {"video_decode": time.perf_counter() - t0})


def video_from_images(images: Sequence[Image.Image], timestamps: Sequence[float], *, choose_fps: float = 3.0,
                      force_packing: int | None = None, max_packing: int = MAX_NUM_PACKING) -> Video:
    """Frames an app already has (camera capture) with their timestamps in seconds, sampled like a file."""
    if len(images) != len(timestamps) or not images:
        raise VideoInputError(f"{len(images)} frames with {len(timestamps)} timestamps")
    ts = np.asarray(timestamps, dtype=np.float64)
    if np.any(np.diff(ts) <= 0):
        raise VideoInputError("frame timestamps must increase")
    span = ts[-1] - ts[0]
    fps = (len(ts) - 1) / span if span > 0 else 1.0
    plan = plan_frames(len(images), fps, choose_fps=choose_fps, force_packing=force_packing, max_packing=max_packing)
    ids = [int(round((ts[i] - ts[0]) / TIME_SCALE)) for i in plan.indices]
    plan = FramePlan(plan.n_frames, plan.fps, plan.indices, ids, plan.packing)
    return Video([images[i].convert("RGB") for i in plan.indices], plan)
