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
from minicpmv_edge.facts import ModelFacts

from .decoder import ContextOverflowError, Decoder, Embeddings, Sampler, SamplingParams, TokenLogprob
from .images import LoadedImage, load_image
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessedImage, preprocess_image
from .prompt import IMAGE_TAG, PromptFormat, expand_tags, image_spans, image_text, render, video_text
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
    slices: int = 0
    image_cache_hits: int = 0
    video_decode: float = 0.0
    video_frames: int = 0
    video_blocks: int = 0            # 64-token blocks the video became

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1
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
    logprobs: list[TokenLogprob] | None = None   # per answer token, when asked for (chat(logprobs=k))


@dataclass
class StreamEvent:
    delta: str                       # new text since the previous event ("" on the final event)
    token_id: int | None
    result: ChatResult | None = None  # set on the final event only
    reasoning: bool = False          # the delta belongs to the thinking part
    logprobs: list[TokenLogprob] | None = None   # the tokens this delta came from, when asked for


@dataclass
class _Encoded:
    grid: tuple[int, int] | None
    blocks: list[np.ndarray]         # one [Q, D] array per slice (overview first) or per video block
    key: str
    is_video: bool = False


@dataclass(frozen=True)
class VideoInput:
    """A video in a message: a file path, or frames an app captured with their timestamps (seconds)."""
    source: Any                      # path, or {"frames": [...], "timestamps": [...]}
    fps: float = 3.0                 # frames sampled per second
    packing: int | None = None       # frames per 64-token block (default: the recipe's choice)


@dataclass
class _Request:
    messages: list[dict[str, Any]]   # content flattened to text with IMAGE_TAGs
    images: list[Any] = field(default_factory=list)


def _part_image(part: Mapping[str, Any]) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, Mapping) else url
    return part.get("image")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> _Request:
    """OpenAI-shaped messages (content a string or a list of text / image_url / image parts, or PIL images)
    -> text messages with one IMAGE_TAG per image (items joined by "\\n", as `model.chat` does) + the images."""
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
        for k, item in enumerate(items):
            if item is None:
                continue
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, Mapping) and item.get("type") == "text":
                if not isinstance(item.get("text"), str):
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}].text: expected a string")
                parts.append(item["text"])
            elif isinstance(item, Mapping) and item.get("type") == "video":
                if role != "user":
                    raise MiniCPMVEdgeError(f"messages[{n}]: videos are only accepted in user messages")
                if item.get("video") is None:
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}]: video part without a video")
                try:
                    out.images.append(VideoInput(item["video"], float(item.get("fps", 3.0)),
                                                 item.get("packing")))
                except (TypeError, ValueError):
                    raise MiniCPMVEdgeError(f"messages[{n}].content[{k}].fps: expected a number") from None
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
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.facts, self.decoder, self.vision, self.resampler = facts, decoder, vision, resampler
        self.prompt_format, self.preprocess_config = prompt_format, preprocess
        self.max_pixels = max_pixels
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._cache_size = image_cache_size
        self.stop_ids = [self._single_id(t) for t in facts.stop_tokens]
        tok = facts.special_tokens
        self._open_ids = {self._single_id(tok["image_start"]), self._single_id(tok["slice_start"])}
        self._close_ids = {self._single_id(tok["image_end"]), self._single_id(tok["slice_end"])}
        # (<think>, </think>) ids, so reasoning is split by token and not by text the detokenizer may hide
        self._think_ids = ((self._single_id(tok["think_start"]), self._single_id(tok["think_end"]))
                           if facts.thinking else ())
        self._grammar_engine = None

    def _single_id(self, token: str) -> int:
        ids = self.decoder.tokenize(token, parse_special=True)
        if len(ids) != 1:
            raise MiniCPMVEdgeError(f"special token {token!r} is not a single token in this model's vocabulary")
        return ids[0]

    # ----- images
    def _encode_image(self, source: Any, max_slices: int, t: Timings) -> _Encoded:
        cfg = self.preprocess_config
        t0 = time.perf_counter()
        loaded: LoadedImage = load_image(source, max_pixels=self.max_pixels)
        key = f"{loaded.digest}:{max_slices}:{cfg.slice_size}:{cfg.slicing}"
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            t.image_cache_hits += 1
            t.preprocess += time.perf_counter() - t0
            return hit
        pre: PreprocessedImage = preprocess_image(
            loaded.image, max_slice_nums=max_slices, slice_size=cfg.slice_size, patch_size=cfg.patch_size,
            mean=cfg.mean, std=cfg.std, slicing=cfg.slicing, max_pixels=self.max_pixels)
        t.preprocess += time.perf_counter() - t0
        blocks = []
        for s in pre.slices:
            t1 = time.perf_counter()
            feats = self.vision.encode(s)
            t2 = time.perf_counter()
            blocks.append(np.asarray(self.resampler.run(feats, *s.tgt_size), dtype=np.float32))
            t.vision += t2 - t1
            t.resampler += time.perf_counter() - t2
            t.slices += 1
        enc = _Encoded(pre.grid, blocks, key)
        self._cache[key] = enc
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return enc

    def _encode_video(self, video: VideoInput, t: Timings) -> _Encoded:
        """Frames sampled by the official recipe, each encoded as one unsliced slice; with the temporal
        resampler (4.5) each group of `packing` frames becomes one 64-token block, otherwise (2.6, 4.0)
        every frame is its own block, as the official 2.6 recipe feeds video."""
        from .video import load_video, video_from_images
        cfg = self.preprocess_config
        temporal = self.facts.video == "temporal_resampler"
        max_packing = self.facts.max_temporal_packing if temporal else 1
        packing = video.packing if temporal else 1
        t0 = time.perf_counter()
        if isinstance(video.source, Mapping):
            frames = [load_image(f, max_pixels=self.max_pixels).image for f in video.source.get("frames", [])]
            v = video_from_images(frames, video.source.get("timestamps", []), choose_fps=video.fps,
                                  force_packing=packing, max_packing=max_packing)
        else:
            v = load_video(video.source, choose_fps=video.fps, force_packing=packing, max_packing=max_packing)
        t.video_decode += time.perf_counter() - t0
        feats, grids = [], []
        for frame in v.frames:
            t1 = time.perf_counter()
            pre = preprocess_image(frame, max_slice_nums=1, slice_size=cfg.slice_size, patch_size=cfg.patch_size,
                                   mean=cfg.mean, std=cfg.std, slicing=cfg.slicing, max_pixels=self.max_pixels)
            t2 = time.perf_counter()
            feats.append(self.vision.encode(pre.slices[0]))
            grids.append(tuple(pre.slices[0].tgt_size))
            t.preprocess += t2 - t1
            t.vision += time.perf_counter() - t2
            t.slices += 1
        t3 = time.perf_counter()
        if temporal:
            blocks = [self.resampler.run_group(feats[i:i + v.plan.packing], grids[i:i + v.plan.packing], group)
                      for i, group in zip(range(0, len(feats), v.plan.packing), v.plan.groups)]
        else:
            blocks = [self.resampler.run(f, *g) for f, g in zip(feats, grids)]
        t.resampler += time.perf_counter() - t3
        t.video_frames += len(v.frames)
        t.video_blocks += len(blocks)
        key = f"video:{id(video)}:{time.time_ns()}"   # videos are not cached
        return _Encoded(None, [np.asarray(b, dtype=np.float32) for b in blocks], key, is_video=True)

    # ----- prompt
    def _segments(self, req: _Request, encoded: list[_Encoded], thinking: bool,
                  tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list, int]:
        fmt = self.prompt_format
        text = render(fmt, req.messages, enable_thinking=thinking if fmt.thinking else None, tools=tools)
        placeholders, n_images = [], 0
        for e in encoded:
            if e.is_video:
                placeholders.append(video_text(len(e.blocks), fmt))
            else:
                placeholders.append(image_text(e.grid, n_images, fmt))
                n_images += 1
        text = expand_tags(text, placeholders)
        ids = self.decoder.tokenize(text, add_special=self.facts.bos_token is not None, parse_special=True)
        blocks = [(e.key, i, b) for e in encoded for i, b in enumerate(e.blocks)]
        spans = image_spans(ids, self._open_ids, self._close_ids)
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
        return [s for s in segments if isinstance(s, Embeddings) or len(s)], len(ids)

    # ----- chat
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, thinking: bool = False,
             seed: int | None = None, max_tokens: int = 512, max_slices: int | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, greedy: bool = False,
             should_stop: Callable[[], bool] | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             grammar: str | None = None, logprobs: int | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0,
             logit_bias: Mapping[int, float] | None = None) -> ChatResult | Iterator[StreamEvent]:
        """Answer the conversation. `greedy=True` ignores the sampling defaults (argmax); otherwise unset
        parameters take the model's recommended values from the facts table. `should_stop` is polled after
        every token (a client went away, a stop string appeared): generation then ends early, normally.
        `max_tokens=None` runs to the end of the answer or of the context.

        `tools` (OpenAI function specs) go to the chat template; `grammar` (from `grammar_engine()`, see
        runtime/structured.py) constrains the answer, after the reasoning when thinking; `logprobs=k` puts each
        answer token's log-probability and its k most likely alternatives on the events and the result."""
        sampling = self._sampling(temperature, top_p, top_k, repetition_penalty, seed, greedy)
        sampling = replace(sampling, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                           logit_bias=logit_bias, top_logprobs=logprobs)
        events = self._run(messages, thinking=thinking, seed=seed, max_tokens=max_tokens, max_slices=max_slices,
                           sampling=sampling, should_stop=should_stop, tools=tools, grammar=grammar)
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

    def _sampling(self, temperature, top_p, top_k, repetition_penalty, seed, greedy) -> SamplingParams:
        d = self.facts.sampling
        if greedy:
            return SamplingParams(temperature=0.0, seed=seed)
        return SamplingParams(temperature=d.temperature if temperature is None else temperature,
                              top_p=d.top_p if top_p is None else top_p,
                              top_k=d.top_k if top_k is None else top_k,
                              repetition_penalty=d.repetition_penalty if repetition_penalty is None
                              else repetition_penalty, seed=seed)

    def prepare(self, messages: Sequence[Mapping[str, Any]], *, thinking: bool = False, max_slices: int | None = None,
                timings: Timings | None = None, tools: Sequence[Mapping[str, Any]] | None = None) -> list:
        """Everything before the LLM: images and videos encoded (cached), the prompt rendered and tokenized,
        split into token runs and embedding blocks ready for `decoder.prefill` / `decoder.generate`."""
        if thinking and not self.facts.thinking:
            raise MiniCPMVEdgeError(f"MiniCPM-V {self.facts.version} has no thinking mode")
        slices = self.preprocess_config.max_slice_nums if max_slices is None else int(max_slices)
        if not 1 <= slices <= 36:
            raise MiniCPMVEdgeError(f"max_slices must be between 1 and 36, got {slices}")
        t = timings if timings is not None else Timings()
        req = normalize_messages(messages)
        encoded = [self._encode_video(src, t) if isinstance(src, VideoInput) else self._encode_image(src, slices, t)
                   for src in req.images]
        segments, t.prompt_tokens = self._segments(req, encoded, thinking, tools)
        return segments

    def _run(self, messages, *, thinking, seed, max_tokens, max_slices, sampling,
             should_stop=None, tools=None, grammar=None) -> Iterator[StreamEvent]:
        if max_tokens is not None and max_tokens < 1:
            raise MiniCPMVEdgeError(f"max_tokens must be at least 1, got {max_tokens}")
        t = Timings()
        t_start = time.perf_counter()
        segments = self.prepare(messages, thinking=thinking, max_slices=max_slices, timings=t, tools=tools)
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
        sampler = Sampler(sampling, constraint=constraint, end_id=self.stop_ids[0])
        utf8 = _Utf8Stream()
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
            delta = utf8.push(self.decoder.token_bytes(tok))
            if delta:
                parts[in_reasoning].append(delta)
                yield StreamEvent(delta, tok, reasoning=in_reasoning, logprobs=pending or None)
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
        tail = utf8.flush()
        if tail or pending:
            parts[in_reasoning].append(tail)
            yield StreamEvent(tail, None, reasoning=in_reasoning, logprobs=pending or None)
        t.decode = t_end - t_first
        t.completion_tokens = len(tokens)
        finish = "length" if len(tokens) >= max_tokens else "stop"
        reasoning = "".join(parts[True]).strip() if thinking else None
        text = "".join(parts[False])
        if thinking:
            text = text.lstrip("\n")
        yield StreamEvent("", None, ChatResult(text, reasoning, tokens, finish, t,
                                               answer_logprobs if want_logprobs else None))

    def forget(self) -> None:
        """Drop the encoded-image cache and the KV cache: the next call starts cold (benchmarks use this)."""
        self._cache.clear()
        self.decoder.reset()

    def close(self) -> None:
        self.decoder.close()
