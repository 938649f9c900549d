"""Video frames for MiniCPM-V: the official 4.5 sampling recipe, decoded with PyAV (the `video` extra).

The recipe (OpenBMB's `encode_video`): sample `choose_fps` frames per second uniformly (at most
MAX_NUM_FRAMES packed positions; beyond that, pack up to MAX_NUM_PACKING consecutive frames into one
64-token block), give each frame a temporal id in 0.1 s ticks, and group the ids `packing` at a time. Models
without the temporal resampler (2.6, 4.0) get every sampled frame as its own image instead.

Decoding seeks to the keyframe before each wanted frame when frames are sparse (a long video sampled at
3 fps) and decodes straight through when they are dense; frame indices count decoded frames, as the
recipe's frame reader does, so variable-frame-rate files sample the same frames. A video is a path or its
bytes (what the server passes: it never hands the runtime a path); `iter_frames` yields the sampled frames
one at a time, so a caller can encode each and let it go instead of holding every decoded frame.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
from PIL import Image

from minicpmv_edge.errors import MiniCPMVEdgeError

MAX_NUM_FRAMES = 180     # packed positions at most
MAX_NUM_PACKING = 3      # the README's default; the model accepts up to 6 (facts.max_temporal_packing)
TIME_SCALE = 0.1         # seconds per temporal id
MAX_DURATION_S = 4 * 3600.0   # refuse longer files: a lying header should not make us decode for hours


class VideoInputError(MiniCPMVEdgeError):
    pass


VideoSource = Union[str, Path, bytes]    # a file, or the file's bytes


def _name(source: VideoSource) -> str:
    return "video bytes" if isinstance(source, (bytes, bytearray)) else str(source)


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


def _open(source: VideoSource):
    try:
        import av
    except ImportError:
        raise MiniCPMVEdgeError("video input needs PyAV: pip install 'minicpmv-edge[video]'") from None
    path = _name(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise VideoInputError("video bytes: empty (0 bytes)")
        target = io.BytesIO(source)
    elif not Path(source).is_file():
        raise VideoInputError(f"{path}: file not found")
    else:
        target = str(source)
    try:
        container = av.open(target)
    except (av.error.FFmpegError, ValueError) as exc:
        raise VideoInputError(f"{path}: not a video FFmpeg can read ({str(exc)[:80]})") from None
    if not container.streams.video:
        container.close()
        raise VideoInputError(f"{path}: has no video stream")
    return av, container


def probe(source: VideoSource) -> tuple[int, float]:
    """(frame count, average fps) of the first video stream, from the container's header."""
    path = _name(source)
    av, container = _open(source)
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


def frame_size(source: VideoSource) -> tuple[int, int]:
    """(width, height) of the first video stream, from the header (no frame decoded)."""
    _, container = _open(source)
    with container:
        ctx = container.streams.video[0].codec_context
        return int(ctx.width), int(ctx.height)


def iter_frames(source: VideoSource, indices: Sequence[int], fps: float) -> Iterator[Image.Image]:
    """Yield the RGB frames at `indices` (increasing, counted in decode order), one at a time.

    Dense picks (less than ~2 s apart) and variable-frame-rate files are decoded straight through, counting
    frames; sparse picks from a constant-rate file seek to the keyframe before each frame, then decode
    forward to the exact timestamp (a seek lands on a keyframe, not on the frame asked for). Frames the
    header promised but the file does not hold (a truncated or corrupt tail) repeat the last decoded one."""
    path = _name(source)
    av, container = _open(source)
    wanted = [int(i) for i in indices]
    if any(b <= a for a, b in zip(wanted, wanted[1:])):
        raise VideoInputError(f"{path}: frame indices must increase")
    done, last = 0, None
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
                    found = None
                    for frame in container.decode(stream):
                        if frame.pts is None or frame.pts >= target - 0.5 / fps / tb:
                            found = frame.to_image().convert("RGB")
                            break
                    if found is None:
                        break
                    last, done = found, done + 1
                    yield found
            else:
                index = -1
                for frame in container.decode(stream):
                    index += 1
                    if index == wanted[done]:
                        last, done = frame.to_image().convert("RGB"), done + 1
                        yield last
                        if done == len(wanted):
                            break
        except av.error.InvalidDataError:
            pass   # a corrupt packet: keep what decoded, fill below
        except av.error.FFmpegError as exc:
            raise VideoInputError(f"{path}: decoding failed ({str(exc)[:80]})") from None
    if last is None:
        raise VideoInputError(f"{path}: no frame could be decoded")
    for _ in range(done, len(wanted)):
        yield last


def read_frames(source: VideoSource, indices: Sequence[int], fps: float) -> list[Image.Image]:
    """All frames at `indices` at once (see `iter_frames`, which holds one at a time)."""
    return list(iter_frames(source, indices, fps))


def plan_video(source: VideoSource, *, choose_fps: float = 3.0, force_packing: int | None = None,
               max_packing: int = MAX_NUM_PACKING) -> FramePlan:
    """The frames the recipe takes from a video file, from its header only (nothing decoded)."""
    n, fps = probe(source)
    return plan_frames(n, fps, choose_fps=choose_fps, force_packing=force_packing, max_packing=max_packing)


def load_video(path: VideoSource, *, choose_fps: float = 3.0, force_packing: int | None = None,
               max_packing: int = MAX_NUM_PACKING) -> Video:
    import time
    t0 = time.perf_counter()
    plan = plan_video(path, choose_fps=choose_fps, force_packing=force_packing, max_packing=max_packing)
    frames = read_frames(path, plan.indices, plan.fps)
    return Video(frames, plan, {"video_decode": time.perf_counter() - t0})


def plan_timestamps(timestamps: Sequence[float], *, choose_fps: float = 3.0, force_packing: int | None = None,
                    max_packing: int = MAX_NUM_PACKING) -> FramePlan:
    """The recipe's plan for frames an app captured at `timestamps` (seconds, increasing); temporal ids from the
    timestamps themselves."""
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.ndim != 1 or not ts.size:
        raise VideoInputError("frame timestamps: expected a non-empty list of numbers")
    if not np.all(np.isfinite(ts)) or np.any(np.diff(ts) <= 0) or ts[0] < 0:
        raise VideoInputError("frame timestamps must be finite, non-negative and increase")
    span = ts[-1] - ts[0]
    fps = (len(ts) - 1) / span if span > 0 else 1.0
    plan = plan_frames(len(ts), fps, choose_fps=choose_fps, force_packing=force_packing, max_packing=max_packing)
    ids = [int(round((ts[i] - ts[0]) / TIME_SCALE)) for i in plan.indices]
    return FramePlan(plan.n_frames, plan.fps, plan.indices, ids, plan.packing)


def video_from_images(images: Sequence[Image.Image], timestamps: Sequence[float], *, choose_fps: float = 3.0,
                      force_packing: int | None = None, max_packing: int = MAX_NUM_PACKING) -> Video:
    """Frames an app already has (camera capture) with their timestamps in seconds, sampled like a file."""
    if len(images) != len(timestamps) or not images:
        raise VideoInputError(f"{len(images)} frames with {len(timestamps)} timestamps")
    plan = plan_timestamps(timestamps, choose_fps=choose_fps, force_packing=force_packing, max_packing=max_packing)
    return Video([images[i].convert("RGB") for i in plan.indices], plan)
