"""The user-facing runtime: ask a model about images, stream the answer, keep the conversation warm.

    model = minicpmv_edge.load("bundle/")
    answer = model.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "photo.jpg"}}, {"type": "text", "text": "What is this?"}]}])
    print(answer.text, answer.timings)

Pipeline per request: load + slice + normalise each image (cached by content), ViT per slice (ONNX Runtime),
resampler per slice (native kernels, numpy fallback), chat template + image placeholders, then llama.cpp
with the slice embeddings injected at the placeholder positions. The KV cache survives between calls, so
a follow-up question that repeats the conversation so far prefills only the new tokens.
"""
from __future__ import annotations

import codecs
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import GROUNDING_TOKENS, MAX_SLICE_NUMS, ModelFacts

from .decoder import ContextOverflowError, Decoder, Embeddings, Sampler, SamplingParams, TokenLogprob
from .grounding import GroundedObject, GroundingStream, ImageGeometry, parse as parse_grounding
from .images import ImageHeader, ImageInputError, LoadedImage, load_image, read_image_header, slice_shapes
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessedImage, preprocess_image
from .prompt import (IMAGE_TAG, PromptFormat, caller_tool_calls, caller_tools, image_spans, image_text, render,
                     tokenize_prompt, untrusted, video_text)
from .vision import VisionBackend

class Resampler(Protocol):
    """runtime/resampler.py's native or numpy resampler."""

    def run(self, features: np.ndarray, h: int, w: int) -> np.ndarray:
        """[h*w, C] patch features of one slice -> [Q, D] embeddings."""

    def run_group(self, frames: Sequence[np.ndarray], grids: Sequence[tuple[int, int]],
                  temporal_ids: Sequence[int]) -> np.ndarray:
        """Frames of one video group (temporal ids in 0.1 s ticks) -> one [Q, D] block."""


@dataclass(frozen=True)
class PreprocessConfig:
    slice_size: int = 448
    patch_size: int = 14
    max_slice_nums: int = 9
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    slicing: str = "llava_uhd"
    num_patches_per_side: int = 70
    position_rule: str = "bucketize"   # facts.vision_position_ids ("nearest" for 4.6)


@dataclass
class Timings:
    """Seconds per stage of one answer (first_token is measured from the call, i.e. TTFT)."""
    preprocess: float = 0.0
    vision: float = 0.0
    resampler: float = 0.0
    prefill: float = 0.0
    first_token: float = 0.0
    decode: float = 0.0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0        # positions actually computed (the rest came from the KV cache)
    completion_tokens: int = 0
    decode_steps: int = 0            # one-token llama.cpp decodes after the first token (the one that drew the stop
    slices: int = 0                  # token included): what decode_tok_s counts, as llama.cpp's own figure does
    image_cache_hits: int = 0
    video_decode: float = 0.0
    video_frames: int = 0
    video_blocks: int = 0            # 64-token blocks the video became

    @property
    def decode_tok_s(self) -> float:
        n = self.decode_steps or self.completion_tokens - 1
        return n / self.decode if n > 0 and self.decode > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["decode_tok_s"] = self.decode_tok_s
        return d


@dataclass
class ChatResult:
    text: str                        # the answer (after </think> when thinking)
    reasoning: str | None            # the thinking part, when thinking was on
    token_ids: list[int]
    finish_reason: str               # "stop" or "length"
    timings: Timings
    image_geometry: list[ImageGeometry] = field(default_factory=list)   # size + EXIF orientation per image sent
    logprobs: list[TokenLogprob] | None = None   # per answer token, when asked for (chat(logprobs=k))

    @property
    def boxes(self) -> list[GroundedObject]:
        """The <box>/<point>/<quad> spans of `text`, with pixels on the last image sent (runtime/grounding.py)."""
        return parse_grounding(self.text, self.image_geometry)


@dataclass
class StreamEvent:
    delta: str                       # new text since the previous event ("" on the final event)
    token_id: int | None
    result: ChatResult | None = None  # set on the final event only
    reasoning: bool = False          # the delta belongs to the thinking part
    boxes: list[GroundedObject] = field(default_factory=list)   # grounding spans this delta completed
    logprobs: list[TokenLogprob] | None = None   # the tokens this delta came from, when asked for


@dataclass
class _Encoded:
    grid: tuple[int, int] | None
    blocks: list[np.ndarray]         # one [Q, D] array per slice (overview first) or per video block
    key: str
    is_video: bool = False
    geometry: ImageGeometry | None = None   # stored size + EXIF orientation, to put boxes back on the image


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image encoded before the question (`MiniCPMV.prepare_image`). Put it in a user message where an image
    goes (first in the message, as apps do): its slices are not encoded again, and the prompt up to the end of
    the image is already in the KV cache unless another conversation ran since (then it is prefilled again, still
    without the ViT). It keeps the slicing it was prepared with (`max_slices` of a later call does not apply)."""
    grid: tuple[int, int] | None     # the slice grid, as the placeholder spells it
    encoded: _Encoded
    max_slices: int
    image_tokens: int                # prompt positions its placeholder takes (the first image of a prompt)
    prefilled_tokens: int            # prompt positions `prepare_image` computed (1: the KV cache had them)
    timings: Timings
    slice_tokens: list[int] | None = None   # placeholder tokens per slice where they vary (4.6), as planned

    @property
    def slices(self) -> int:
        return len(self.encoded.blocks)


@dataclass(frozen=True)
class VideoInput:
    """A video in a message: a file path, or frames an app captured with their timestamps (seconds)."""
    source: Any                      # path, or {"frames": [...], "timestamps": [...]}
    fps: float = 3.0                 # frames sampled per second
    packing: int | None = None       # frames per 64-token block (default: the recipe's choice)


class GenerationCancelled(MiniCPMVEdgeError):
    """`should_stop` said stop before the answer began (the client left while images were encoded)."""


# Caller text longer than this many characters per context position cannot fit: refused before tokenizing.
MAX_CHARS_PER_POSITION = 16
MAX_VIDEO_FPS = 30.0          # frames sampled per second at most (the 4.5 recipe uses 3-10)
# Longest side of one slice, in patches (the native resampler's grid limit): a 1x200000 strip is refused from its
# header instead of running the ViT on 14 000 patches first.
MAX_SLICE_SIDE_PATCHES = 1024


@dataclass
class _Planned:
    """One image or video after the cheap checks (headers only): what the prompt needs, nothing decoded."""
    source: Any                      # ImageHeader, or VideoInput
    placeholder: str                 # its prompt text (image ids already numbered)
    blocks: int                      # 64-token blocks it becomes
    tags: int                        # image tags it counts as in the HF processor's numbering
    frames: Any = None               # videos: the FramePlan
    frame_grids: list = field(default_factory=list)   # videos as images: each frame's slice grid


@dataclass
class _Request:
    messages: list[dict[str, Any]]   # content flattened to text with IMAGE_TAGs
    images: list[Any] = field(default_factory=list)


def _part_image(part: Mapping[str, Any]) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, Mapping) else url
    return part.get("image")


def normalize_messages(messages: Sequence[Mapping[str, Any]], tool_call_format: str = "json") -> _Request:
    """OpenAI-shaped messages (content a string or a list of text / image_url / image parts, or PIL images)
    -> text messages with one IMAGE_TAG per image (items joined by "\\n", as `model.chat` does) + the images.
    `tool_call_format` (facts): with "xml", an assistant turn's call arguments reach the template as objects."""
    if not messages:
        raise MiniCPMVEdgeError("messages: empty")
    out = _Request([])
    for n, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise MiniCPMVEdgeError(f"messages[{n}]: expected an object with 'role' and 'content'")
        role, content = msg["role"], msg.get("content")
        if role == "developer":      # OpenAI's newer name for the system turn
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise MiniCPMVEdgeError(f"messages[{n}].role: {role!r} is not system, developer, user, assistant or tool")
        items = [content] if isinstance(content, str) or content is None else content
        if not isinstance(items, (list, tuple)):
            raise MiniCPMVEdgeError(f"messages[{n}].content: expected a string or a list of parts")
        parts: list[str] = []
        mark = (lambda text: text) if role == "assistant" else untrusted   # caller text: no control tokens
        for k, item in enumerate(items):
            if item is None:
                continue
            if isinstance(item, str):
                parts.append(mark(item))
            elif isinstance(item, Mapping) and item.get("type") == "text":
                if not isinstance(item.get("text"), str):
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}].text: expected a string")
                parts.append(mark(item["text"]))
            elif isinstance(item, Mapping) and item.get("type") == "video":
                if role != "user":
                    raise MiniCPMVEdgeError(f"messages[{n}]: videos are only accepted in user messages")
                if item.get("video") is None:
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}]: video part without a video")
                fps, packing = item.get("fps", 3.0), item.get("packing")
                if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_VIDEO_FPS:
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}].fps: expected a number in "
                                            f"(0, {MAX_VIDEO_FPS:g}]")
                if packing is not None and (isinstance(packing, bool) or not isinstance(packing, int)):
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}].packing: expected an integer")
                out.images.append(VideoInput(item["video"], float(fps), packing))
                parts.append(IMAGE_TAG)
            elif isinstance(item, VideoInput):
                out.images.append(item)
                parts.append(IMAGE_TAG)
            elif isinstance(item, Mapping) and item.get("type") in ("image_url", "image"):
                if role != "user":
                    raise MiniCPMVEdgeError(f"messages[{n}]: images are only accepted in user messages")
                src = _part_image(item)
                if src is None:
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}]: image part without an image")
                out.images.append(src)
                parts.append(IMAGE_TAG)
            elif not isinstance(item, Mapping):   # a PIL image, bytes or a path object
                out.images.append(item)
                parts.append(IMAGE_TAG)
            else:
                raise MiniCPMVEdgeError(f"messages[{n}].content[{k}].type: {item.get('type')!r} is not supported")
        text_msg = {"role": role, "content": "\n".join(parts)}
        for key in ("tool_calls", "tool_call_id", "name", "reasoning_content"):   # read by tool-aware templates
            if msg.get(key) is not None:
                text_msg[key] = msg[key]
        if "tool_calls" in text_msg:                 # the caller's too: no control tokens from them either
            try:
                text_msg["tool_calls"] = caller_tool_calls(text_msg["tool_calls"],
                                                           arguments_as_items=tool_call_format == "xml")
            except ValueError as exc:
                raise MiniCPMVEdgeError(f"messages[{n}].tool_calls: {exc}") from None
        out.messages.append(text_msg)
    return out


class _Utf8Stream:
    """Token bytes -> text deltas that never split a UTF-8 character (invalid bytes become U+FFFD)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class MiniCPMV:
    """One loaded model. Calls are serialised by the caller (the server queues requests)."""

    def __init__(self, *, facts: ModelFacts, decoder: Decoder, vision: VisionBackend, resampler: Resampler,
                 prompt_format: PromptFormat, preprocess: PreprocessConfig, image_cache_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, low_memory: bool = False,
                 generation_config: Mapping[str, float] | None = None,
                 vision_modes: Mapping[str, Callable[[], VisionBackend]] | None = None):
        """`low_memory`: the vision backend's session is freed after each call's images (reloaded when needed).
        `vision_modes` (4.6, whose vision graphs merge patches): downsample mode -> a function that loads that
        mode's graph, called on the mode's first request; `vision` runs the version's default mode."""
        self.facts, self.decoder, self.vision, self.resampler = facts, decoder, vision, resampler
        self.low_memory = low_memory
        self.generation_config = dict(generation_config or {})   # the checkpoint's sampling values (bundle)
        self._vision_loaders = dict(vision_modes or {})
        self._vision_by_mode: dict[str, VisionBackend] = {}
        if facts.default_downsample_mode is not None:
            self._vision_by_mode[facts.default_downsample_mode] = vision
        self.prompt_format, self.preprocess_config = prompt_format, preprocess
        self.max_pixels = max_pixels
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._cache_size = image_cache_size
        self._special_ids: dict[str, int] = {}
        self.stop_ids = [self._single_id(t) for t in facts.stop_tokens]
        tok = facts.special_tokens
        self._open_ids = {self._single_id(tok["image_start"]), self._single_id(tok["slice_start"])}
        self._close_ids = {self._single_id(tok["image_end"]), self._single_id(tok["slice_end"])}
        # (<think>, </think>) ids, so reasoning is split by token and not by text the detokenizer may hide
        self._think_ids = ((self._single_id(tok["think_start"]), self._single_id(tok["think_end"]))
                           if facts.thinking else ())
        # <box>, <ref>, ... are special tokens, which llama.cpp leaves out of the text unless asked: ask for these
        self._grounding_ids = {ids[0] for ids in (self.decoder.tokenize(t, parse_special=True)
                                                  for t in facts.extra_special_tokens if t in GROUNDING_TOKENS)
                               if len(ids) == 1}
        self._grammar_engine = None

    def _special_id(self, token: str) -> int:
        if token not in self._special_ids:
            self._special_ids[token] = self._single_id(token)
        return self._special_ids[token]

    def _single_id(self, token: str) -> int:
        ids = self.decoder.tokenize(token, parse_special=True)
        if len(ids) != 1:
            raise MiniCPMVEdgeError(f"special token {token!r} is not a single token in this model's vocabulary")
        return ids[0]

    # ----- downsample modes (4.6: how many patches become one LLM position; None for resampler versions)
    def _downsample_mode(self, mode: str | None) -> str | None:
        """The request's mode, checked: None picks the version's default (None for versions with a resampler)."""
        if mode is None:
            return self.facts.default_downsample_mode
        try:
            self.facts.downsample_side(mode)
        except ValueError as exc:
            raise MiniCPMVEdgeError(f"downsample_mode: {exc}") from None
        return mode

    def _vision_for(self, mode: str | None) -> VisionBackend:
        if mode is None:
            return self.vision
        if mode not in self._vision_by_mode:
            if mode not in self._vision_loaders:
                raise MiniCPMVEdgeError(f"downsample_mode {mode!r}: this bundle has no vision graph for it (has: "
                                        f"{', '.join(sorted({*self._vision_by_mode, *self._vision_loaders}))})")
            self._vision_by_mode[mode] = self._vision_loaders[mode]()
        return self._vision_by_mode[mode]

    def _slice_tokens(self, shapes: Sequence[tuple[int, int]], mode: str | None) -> list[int] | None:
        """LLM positions of each slice when the vision graph merges patches (`mode`), else None (query_num each)."""
        if mode is None:
            return None
        side = self.facts.downsample_side(mode)
        return [h * w // (side * side) for h, w in shapes]

    # ----- cheap checks: headers and arithmetic only, before any pixel is decoded or the ViT runs
    def _check_slices(self, name: str, size: tuple[int, int], max_slices: int, mode: str | None = None):
        """(grid, [(h, w) per slice]) of an image of `size`; refuses slices the ViT and resampler cannot take."""
        cfg = self.preprocess_config
        grid, shapes = slice_shapes(size, max_slices, cfg.slice_size, cfg.patch_size, cfg.slicing,
                                    downsample_mode=mode or "16x")
        longest = max(max(h, w) for h, w in shapes)
        if longest > MAX_SLICE_SIDE_PATCHES:
            raise ImageInputError(f"{name}: {size[0]}x{size[1]} is too elongated: a slice would be {longest} patches "
                                  f"long (the limit is {MAX_SLICE_SIDE_PATCHES})")
        return grid, shapes

    def _plan_image(self, source: Any, max_slices: int, index: int, mode: str | None = None) -> _Planned:
        if isinstance(source, PreparedImage):
            text = image_text(source.grid, index, self.prompt_format, slice_tokens=source.slice_tokens)
            return _Planned(source, text, source.slices, 1)
        head = read_image_header(source, max_pixels=self.max_pixels, name=f"image {index + 1}")
        grid, shapes = self._check_slices(head.source, head.size, max_slices, mode)
        text = image_text(grid, index, self.prompt_format, slice_tokens=self._slice_tokens(shapes, mode))
        return _Planned(head, text, len(shapes), 1)

    def _plan_video(self, video: VideoInput, index: int) -> _Planned:
        """The frames the recipe samples (from the container header or the given timestamps), the blocks they
        become and, for models that see frames as images, each sampled frame's slice grid."""
        from .video import frame_size, plan_timestamps, plan_video
        facts, fmt = self.facts, self.prompt_format
        temporal = facts.video == "temporal_resampler"
        if temporal and video.packing is not None and not 1 <= video.packing <= facts.max_temporal_packing:
            raise MiniCPMVEdgeError(f"video packing must be between 1 and {facts.max_temporal_packing} on "
                                    f"MiniCPM-V {facts.version}, got {video.packing}")   # (no packing without it)
        # the recipe packs up to MAX_NUM_PACKING frames on its own; asking for more raises that bound
        max_packing = max(facts.video_default_packing, video.packing or 0)
        packing = video.packing if temporal else 1
        if isinstance(video.source, Mapping):
            frames = video.source.get("frames")
            if not isinstance(frames, (list, tuple)) or not frames:
                raise MiniCPMVEdgeError("video frames: expected a non-empty list of images")
            ts = video.source.get("timestamps")
            if not isinstance(ts, (list, tuple)) or len(ts) != len(frames):
                raise MiniCPMVEdgeError(f"video: {len(frames)} frames need as many timestamps")
            plan = plan_timestamps(ts, choose_fps=video.fps, force_packing=packing, max_packing=max_packing)
            heads = [read_image_header(frames[i], max_pixels=self.max_pixels, name=f"video frame {i}")
                     for i in plan.indices]
            sizes = [h.size for h in heads]
            video = VideoInput({"frames": heads}, video.fps, video.packing)
        else:
            plan = plan_video(video.source, choose_fps=video.fps, force_packing=packing, max_packing=max_packing)
            w, h = frame_size(video.source)
            if w < 1 or h < 1 or w * h > self.max_pixels:
                raise MiniCPMVEdgeError(f"video: frames of {w}x{h} are outside 1..{self.max_pixels:,} pixels")
            sizes = [(w, h)] * len(plan.indices)
        n_frames = len(plan.indices)
        if temporal:
            for i, size in enumerate(sizes):
                self._check_slices(f"video frame {i}", size, 1)
            blocks = len(plan.groups)
            return _Planned(video, video_text(blocks, fmt), blocks, n_frames, plan)
        mode = self.facts.default_downsample_mode
        grids, blocks, frames = [], 0, []
        for i, size in enumerate(sizes):
            grid, shapes = self._check_slices(f"video frame {i}", size, facts.video_max_slice_nums, mode)
            grids.append(grid)
            blocks += len(shapes)
            frames.append(image_text(grid, 0, fmt, use_image_id=False, slice_tokens=self._slice_tokens(shapes, mode),
                                     pad_role="video_pad" if "video_pad" in fmt.special_tokens else "image_pad"))
        if "video_pad" in fmt.special_tokens:
            # 4.6 (transformers MiniCPMV4_6Processor.replace_video_token): frames with <|video_pad|>, not separated,
            # one <image_id> for the whole video (numbered among the videos), not counted among the image tags
            text = "".join(frames)
            if fmt.use_image_id:
                text = f"{fmt.special_tokens['image_id_start']}{index}{fmt.special_tokens['image_id_end']}" + text
            return _Planned(video, text, blocks, 0, plan, grids)
        return _Planned(video, "\n".join(frames), blocks, n_frames, plan, grids)

    def _plan(self, req: _Request, max_slices: int, mode: str | None = None) -> list[_Planned]:
        plans, tags, videos = [], 0, 0
        for src in req.images:
            # <image_id> numbers count every image tag before it, video frames included, as the HF processor does
            # (4.6's processor numbers videos apart from images: its video plans count 0 image tags)
            if isinstance(src, VideoInput):
                p = self._plan_video(src, videos if "video_pad" in self.prompt_format.special_tokens else tags)
                videos += 1
            else:
                p = self._plan_image(src, max_slices, tags, mode)
            plans.append(p)
            tags += p.tags
        return plans

    # ----- the expensive part: decode, slice, ViT, resampler
    def _encode_image(self, head: ImageHeader | PreparedImage, max_slices: int, t: Timings, should_stop,
                      mode: str | None = None) -> _Encoded:
        if isinstance(head, PreparedImage):
            t.image_cache_hits += 1
            return head.encoded
        cfg = self.preprocess_config
        t0 = time.perf_counter()
        loaded: LoadedImage = load_image(head, max_pixels=self.max_pixels)
        key = f"{loaded.digest}:{max_slices}:{cfg.slice_size}:{cfg.slicing}" + (f":{mode}" if mode else "")
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            t.image_cache_hits += 1
            t.preprocess += time.perf_counter() - t0
            return hit
        pre: PreprocessedImage = preprocess_image(
            loaded.image, max_slice_nums=max_slices, slice_size=cfg.slice_size, patch_size=cfg.patch_size,
            mean=cfg.mean, std=cfg.std, slicing=cfg.slicing, max_pixels=self.max_pixels,
            downsample_mode=mode or "16x")
        t.preprocess += time.perf_counter() - t0
        vision = self._vision_for(mode)
        blocks = [self._encode_slice(s, t, should_stop, vision) for s in pre.slices]
        enc = _Encoded(pre.grid, blocks, key, geometry=ImageGeometry.of(loaded.image))
        self._cache[key] = enc
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return enc

    def _encode_slice(self, s, t: Timings, should_stop, vision: VisionBackend | None = None) -> np.ndarray:
        if should_stop is not None and should_stop():
            raise GenerationCancelled("stopped while encoding images")
        t1 = time.perf_counter()
        feats = (vision or self.vision).encode(s)
        t2 = time.perf_counter()
        block = np.asarray(self.resampler.run(feats, *s.tgt_size), dtype=np.float32)
        t.vision += t2 - t1
        t.resampler += time.perf_counter() - t2
        t.slices += 1
        return block

    def _frames(self, planned: _Planned):
        """The sampled frames, decoded one at a time (never all held at once)."""
        from .video import iter_frames
        source = planned.source.source
        if isinstance(source, Mapping):
            return (load_image(h, max_pixels=self.max_pixels).image.convert("RGB") for h in source["frames"])
        return iter_frames(source, planned.frames.indices, planned.frames.fps)

    def _encode_video(self, planned: _Planned, t: Timings, should_stop) -> _Encoded:
        """Frames sampled by the official recipe, decoded and encoded one at a time. With the temporal resampler
        (4.5) each group of `packing` frames becomes one 64-token block (only that group's features are held);
        otherwise (2.6, 4.0) every frame is an image sliced with the version's video max_slice_nums."""
        cfg = self.preprocess_config
        plan = planned.frames
        temporal = self.facts.video == "temporal_resampler"
        max_slices = 1 if temporal else self.facts.video_max_slice_nums
        blocks: list[np.ndarray] = []
        feats, grids = [], []
        groups = iter(plan.groups)
        t0 = time.perf_counter()
        for frame in self._frames(planned):
            t.video_decode += time.perf_counter() - t0
            if should_stop is not None and should_stop():
                raise GenerationCancelled("stopped while encoding a video")
            t1 = time.perf_counter()
            pre = preprocess_image(frame, max_slice_nums=max_slices, slice_size=cfg.slice_size,
                                   patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std, slicing=cfg.slicing,
                                   max_pixels=self.max_pixels)
            del frame
            t.preprocess += time.perf_counter() - t1
            t.video_frames += 1
            if not temporal:
                blocks += [self._encode_slice(s, t, should_stop) for s in pre.slices]
            else:
                t2 = time.perf_counter()
                feats.append(self.vision.encode(pre.slices[0]))
                grids.append(tuple(pre.slices[0].tgt_size))
                t.vision += time.perf_counter() - t2
                t.slices += 1
                if len(feats) == plan.packing or t.video_frames == len(plan.indices):
                    t3 = time.perf_counter()
                    group = next(groups)
                    blocks.append(np.asarray(self.resampler.run_group(feats, grids, group), dtype=np.float32))
                    t.resampler += time.perf_counter() - t3
                    feats, grids = [], []
            t0 = time.perf_counter()
        t.video_blocks += len(blocks)
        key = f"video:{id(planned)}:{time.time_ns()}"   # videos are not cached
        return _Encoded(None, blocks, key, is_video=True)

    # ----- prompt
    def _prompt_ids(self, req: _Request, plans: list[_Planned], thinking: bool,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], list]:
        """Token ids of the whole prompt (image slots filled with pads) and the [start, end) slot of every block;
        known before any vision work, so a prompt that cannot fit is refused first."""
        fmt = self.prompt_format
        text = render(fmt, req.messages, enable_thinking=thinking if fmt.thinking else None,
                      tools=caller_tools(tools))
        specials = [*fmt.special_tokens.values(), *(t for t in (fmt.bos_token, fmt.eos_token) if t)]
        prefix = self.decoder.tokenize("", add_special=True, parse_special=False) if self.facts.bos_token else []
        ids, control = tokenize_prompt(text, [p.placeholder for p in plans], specials,
                                       lambda s: self.decoder.tokenize(s, parse_special=False), self._special_id)
        ids = prefix + ids
        control = {i + len(prefix) for i in control}
        spans = image_spans(ids, self._open_ids, self._close_ids, control)
        if len(spans) != sum(p.blocks for p in plans):
            raise MiniCPMVEdgeError(f"the prompt has {len(spans)} image slots for {sum(p.blocks for p in plans)} "
                                    "slice embeddings")
        return ids, spans

    def _segments(self, ids: list[int], spans: list, encoded: list[_Encoded]) -> list:
        blocks = [(e.key, i, b) for e in encoded for i, b in enumerate(e.blocks)]
        if len(spans) != len(blocks):
            raise MiniCPMVEdgeError(f"the prompt has {len(spans)} image slots for {len(blocks)} slice embeddings")
        segments: list = []
        prev = 0
        for (start, end), (key, i, block) in zip(spans, blocks):
            if end - start != block.shape[0]:
                raise MiniCPMVEdgeError(f"an image slot holds {end - start} tokens, the resampler made "
                                        f"{block.shape[0]} rows")
            segments.append(ids[prev:start])
            segments.append(Embeddings(block, f"{key}#{i}"))
            prev = end
        segments.append(ids[prev:])
        return [s for s in segments if isinstance(s, Embeddings) or len(s)]

    # ----- chat
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, thinking: bool = False,
             seed: int | None = None, max_tokens: int = 512, max_slices: int | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, greedy: bool = False,
             should_stop: Callable[[], bool] | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             grammar: str | None = None, logprobs: int | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, logit_bias: Mapping[int, float] | None = None,
             downsample_mode: str | None = None) -> ChatResult | Iterator[StreamEvent]:
        """Answer the conversation. `greedy=True` ignores the sampling defaults (argmax); otherwise unset
        parameters take the mode's defaults (`sampling_defaults`). `should_stop` is polled after
        every token (a client went away, a stop string appeared): generation then ends early, normally.
        `max_tokens=None` runs to the end of the answer or of the context.

        `tools` (OpenAI function specs) go to the chat template; `grammar` (from `grammar_engine()`, see
        runtime/structured.py) constrains the answer, after the reasoning when thinking; `logprobs=k` puts each
        answer token's log-probability and its k most likely alternatives on the events and the result.
        `downsample_mode` (4.6): "16x" (the default, as transformers) or "4x" (4x the image positions)."""
        sampling = self._sampling(temperature, top_p, top_k, repetition_penalty, seed, greedy, thinking)
        sampling = replace(sampling, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                           logit_bias=logit_bias, top_logprobs=logprobs)
        events = self._run(messages, thinking=thinking, seed=seed, max_tokens=max_tokens, max_slices=max_slices,
                           sampling=sampling, should_stop=should_stop, tools=tools, grammar=grammar,
                           downsample_mode=downsample_mode)
        if stream:
            return events
        for ev in events:
            if ev.result is not None:
                return ev.result
        raise MiniCPMVEdgeError("generation ended without a result")   # unreachable

    def grammar_engine(self):
        """This model's structured-output engine (runtime/structured.py), built on first use: it walks the
        whole vocabulary once (about a second per 100k tokens)."""
        if self._grammar_engine is None:
            from .structured import GrammarEngine
            self._grammar_engine = GrammarEngine(self.decoder.vocab, self.decoder.n_vocab, self.stop_ids[0])
        return self._grammar_engine

    def sampling_defaults(self, thinking: bool = False):
        """The sampling a request of this mode gets for what it leaves unset: the version's recipe (facts), with
        the values it reads from generation_config.json taken from the checkpoint's own file (the bundle's)."""
        return self.facts.sampling_defaults(thinking, self.generation_config)

    def _sampling(self, temperature, top_p, top_k, repetition_penalty, seed, greedy, thinking) -> SamplingParams:
        d = self.sampling_defaults(thinking)
        if greedy:
            return SamplingParams(temperature=0.0, seed=seed)
        return SamplingParams(temperature=d.temperature if temperature is None else temperature,
                              top_p=d.top_p if top_p is None else top_p,
                              top_k=d.top_k if top_k is None else top_k,
                              repetition_penalty=d.repetition_penalty if repetition_penalty is None
                              else repetition_penalty, seed=seed)

    def prepare(self, messages: Sequence[Mapping[str, Any]], *, thinking: bool = False, max_slices: int | None = None,
                timings: Timings | None = None, should_stop: Callable[[], bool] | None = None,
                tools: Sequence[Mapping[str, Any]] | None = None, downsample_mode: str | None = None) -> list:
        """Everything before the LLM: the cheap checks (headers, slice grids, frame counts, the whole prompt's
        length vs the context), then images and videos encoded (cached), split into token runs and embedding
        blocks ready for `decoder.prefill` / `decoder.generate`. `should_stop` is polled between slices."""
        return self._prepare(messages, thinking=thinking, max_slices=max_slices, timings=timings,
                             should_stop=should_stop, tools=tools, downsample_mode=downsample_mode)[0]

    def _prepare(self, messages, *, thinking, max_slices, timings, should_stop, tools=None, downsample_mode=None
                 ) -> tuple[list, list[ImageGeometry]]:
        """`prepare`, plus the geometry of each image in order (videos left out) for the grounding boxes."""
        if thinking and not self.facts.thinking:
            raise MiniCPMVEdgeError(f"MiniCPM-V {self.facts.version} has no thinking mode")
        slices = self._slices(max_slices)
        t = timings if timings is not None else Timings()
        req = normalize_messages(messages, self.facts.tool_call_format)
        n_ctx = self.decoder.n_ctx
        chars = sum(len(m["content"]) for m in req.messages)
        if chars > n_ctx * MAX_CHARS_PER_POSITION:
            raise ContextOverflowError(f"the messages hold {chars:,} characters; a {n_ctx}-token context holds at "
                                       f"most {n_ctx * MAX_CHARS_PER_POSITION:,}")
        mode = self._downsample_mode(downsample_mode)
        plans = self._plan(req, slices, mode)
        ids, spans = self._prompt_ids(req, plans, thinking, tools)
        if len(ids) >= n_ctx:
            raise ContextOverflowError(f"the prompt needs {len(ids)} positions ({len(spans)} image blocks of "
                                       f"{self.prompt_format.query_num}) but the context holds {n_ctx} (raise n_ctx, "
                                       "use fewer slices, images or frames, or shorten the text)")
        try:
            encoded = [self._encode_video(p, t, should_stop) if isinstance(p.source, VideoInput)
                       else self._encode_image(p.source, slices, t, should_stop, mode) for p in plans]
        finally:
            self._release_vision()
        t.prompt_tokens = len(ids)
        return self._segments(ids, spans, encoded), [e.geometry for e in encoded if e.geometry is not None]

    def _release_vision(self) -> None:
        if self.low_memory and hasattr(self.vision, "release"):
            self.vision.release()

    def _slices(self, max_slices: int | None) -> int:
        slices = self.preprocess_config.max_slice_nums if max_slices is None else int(max_slices)
        if not 1 <= slices <= MAX_SLICE_NUMS:
            raise MiniCPMVEdgeError(f"max_slices must be between 1 and {MAX_SLICE_NUMS}, got {slices}")
        return slices

    # ----- prepare ahead: the image before the question
    def image_tokens(self, image: Any, *, max_slices: int | None = None) -> int:
        """Prompt positions `image` will take (as the first image of a prompt), from its header alone: nothing is
        decoded or encoded. The same count `prepare_image` reports after encoding."""
        mode = self._downsample_mode(None)
        return self._placeholder_positions(self._plan_image(image, self._slices(max_slices), 0, mode).placeholder)

    def _placeholder_positions(self, placeholder: str) -> int:
        fmt = self.prompt_format
        specials = [*fmt.special_tokens.values(), *(t for t in (fmt.bos_token, fmt.eos_token) if t)]
        ids, _ = tokenize_prompt(IMAGE_TAG, [placeholder], specials,
                                 lambda s: self.decoder.tokenize(s, parse_special=False), self._special_id)
        return len(ids)

    def prepare_image(self, image: Any, *, max_slices: int | None = None, thinking: bool = False,
                      system: str | None = None) -> PreparedImage:
        """Encode `image` and prefill the prompt up to the end of it while the user is still typing: a later
        `chat` whose user message starts with the returned PreparedImage (after the same `system` message, if
        any) then prefills only the question. Greedy answers are the tokens of a cold run (checked on 2.6-4.5,
        and on 4.6 where 32 of 32 greedy tokens matched: a recurrent model decodes the image's last row on its own
        here, for its state snapshot, so its logits may differ from a cold run's in the last bits)."""
        slices = self._slices(max_slices)
        t = Timings()
        t0 = time.perf_counter()
        mode = self._downsample_mode(None)      # the version's default (4.6: "16x"; None with a resampler)
        planned = self._plan_image(image, slices, 0, mode)
        try:
            encoded = self._encode_image(planned.source, slices, t, None, mode)
        finally:
            self._release_vision()
        if isinstance(image, PreparedImage):
            grid, slice_tokens = image.grid, image.slice_tokens
        else:
            grid, shapes = self._check_slices(planned.source.source, planned.source.size, slices, mode)
            slice_tokens = self._slice_tokens(shapes, mode)
        n_tokens = self._placeholder_positions(planned.placeholder)
        # the prompt of a question about this image; its segments through the image's last block do not depend
        # on the question and are decoded in the same batches a cold run decodes them in. The text after the
        # image (`</image>`, newline) stays with the question: decoded here in a batch of its own, its rows take
        # other kernels than in the cold run's batch (x86 repacked gemm: 16-row passes, then row by row), and on
        # edge-4b the greedy answer then left the cold run's at its 5th token (2026-12-01)
        draft = PreparedImage(grid, encoded, slices, n_tokens, 0, t, slice_tokens)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": [draft, "?"]}]
        segments = self.prepare(messages, thinking=thinking, max_slices=slices)
        last_block = max(i for i, seg in enumerate(segments) if isinstance(seg, Embeddings))
        t1 = time.perf_counter()
        self.decoder.prefill(segments[:last_block + 1])
        t.prefill = time.perf_counter() - t1
        t.prefilled_tokens = self.decoder.last_prefill_positions
        t.prompt_tokens = self.decoder.n_past
        t.first_token = time.perf_counter() - t0      # here: the whole preparation
        return replace(draft, prefilled_tokens=t.prefilled_tokens)

    def _run(self, messages, *, thinking, seed, max_tokens, max_slices, sampling,
             should_stop=None, tools=None, grammar=None, downsample_mode=None) -> Iterator[StreamEvent]:
        if max_tokens is not None and max_tokens < 1:
            raise MiniCPMVEdgeError(f"max_tokens must be at least 1, got {max_tokens}")
        t = Timings()
        t_start = time.perf_counter()
        segments, images = self._prepare(messages, thinking=thinking, max_slices=max_slices, timings=t,
                                         should_stop=should_stop, tools=tools, downsample_mode=downsample_mode)
        left = self.decoder.n_ctx - t.prompt_tokens
        if left <= 0:
            pass                   # the prompt alone overflows: prefill says so, naming the prompt's length
        elif max_tokens is None:
            max_tokens = left
        elif max_tokens > left:
            raise ContextOverflowError(f"max_tokens is {max_tokens} but the context has {max(left, 0)} positions "
                                       f"left after the {t.prompt_tokens}-token prompt ({self.decoder.n_ctx} in all)")
        max_tokens = max_tokens or 1
        constraint = None
        if grammar is not None:
            from .structured import Constraint
            # with thinking on, the grammar governs the answer: it starts after </think>
            constraint = Constraint(self.grammar_engine(), grammar,
                                    start_after=self._think_ids[-1] if thinking else None)
        sampler = Sampler(sampling, constraint=constraint, end_id=self.stop_ids[0] if self.stop_ids else -1)
        utf8 = _Utf8Stream()
        grounding = GroundingStream(images)
        tokens: list[int] = []
        parts: dict[bool, list[str]] = {True: [], False: []}   # reasoning? -> text pieces
        in_reasoning = thinking       # with thinking on, the template opens <think>; </think> ends it
        want_logprobs = sampling.top_logprobs is not None
        answer_logprobs: list[TokenLogprob] = []
        pending: list[TokenLogprob] = []   # logprobs of tokens not yet on an event (a split UTF-8 character)
        gen = self.decoder.generate(segments, max_tokens=max_tokens, sampler=sampler, stop_ids=self.stop_ids)
        t_first = None
        for tok in gen:
            if t_first is None:
                t_first = time.perf_counter()
                t.first_token = t_first - t_start
            tokens.append(tok)
            if thinking and tok in self._think_ids:
                tail = utf8.flush()
                if tail:
                    parts[in_reasoning].append(tail)
                    yield StreamEvent(tail, None, reasoning=in_reasoning)
                in_reasoning = tok != self._think_ids[-1]   # after </think> comes the answer
                continue
            if want_logprobs and not in_reasoning and sampler.last_logprob is not None:
                pending.append(sampler.last_logprob)
                answer_logprobs.append(sampler.last_logprob)
            delta = utf8.push(self.decoder.token_bytes(tok, special=tok in self._grounding_ids))
            if delta:
                parts[in_reasoning].append(delta)
                yield StreamEvent(delta, tok, reasoning=in_reasoning,
                                  boxes=[] if in_reasoning else grounding.feed(delta), logprobs=pending or None)
                pending = []
            if should_stop is not None and should_stop():
                gen.close()
                break
        t_end = time.perf_counter()
        if t_first is None:   # stopped before the first token
            t_first = t_end
            t.first_token = t_end - t_start
        t.prefill = self.decoder.last_prefill_s
        t.prefilled_tokens = self.decoder.last_prefill_positions
        t.decode_steps = self.decoder.last_decode_steps
        tail = utf8.flush()
        if tail or pending:
            parts[in_reasoning].append(tail)
            yield StreamEvent(tail, None, reasoning=in_reasoning,
                              boxes=[] if in_reasoning else grounding.feed(tail), logprobs=pending or None)
        t.decode = t_end - t_first
        t.completion_tokens = len(tokens)
        finish = "length" if len(tokens) >= max_tokens else "stop"
        reasoning = "".join(parts[True]).strip() if thinking else None
        text = "".join(parts[False])
        if thinking:
            text = text.lstrip("\n")
        yield StreamEvent("", None, ChatResult(text, reasoning, tokens, finish, t, images,
                                               answer_logprobs if want_logprobs else None))

    def forget(self) -> None:
        """Drop the encoded-image cache and the KV cache: the next call starts cold (benchmarks use this)."""
        self._cache.clear()
        self.decoder.reset()

    def close(self) -> None:
        self.decoder.close()
