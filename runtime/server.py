"""OpenAI-compatible local HTTP server for one loaded model (FastAPI + uvicorn).

    minicpmv-edge serve BUNDLE --port 8080
    POST /v1/chat/completions   text, image and video parts (data: URLs; files / remote URLs only when enabled), SSE
    GET  /v1/models             <name> and, on models with a thinking mode, <name>-thinking
    POST /v1/describe           {"image", "preset_prompt" | "custom_prompt", "seed"} (WaveSpeed-style)
    POST /v1/images             {"image", "max_slices"}: encode + prefill an image before the question; returns
                                a handle for chat parts {"type": "image_handle", "image_handle": "img_..."}
    GET  /health
    GET  /                      a small page to try the model in a browser (runtime/page.html)

One model, one worker thread: requests wait in a bounded queue (503 + Retry-After when it is full); a client
that disconnects, queued or running, streaming or not, frees the worker at the next slice or token. Every
error is a JSON body in OpenAI's error shape naming the field, never a crash of the process.

Request handling is three steps, each in one place: `parse_json` (size, depth, numbers, Unicode),
`parse_chat_request` (one small parser per field: add a field there), `resolve_messages` (every image and
video source through the one policy in `sources.py`, so the runtime only ever receives bytes).
"""


import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import MAX_SLICE_NUMS

from .decoder import ContextOverflowError
from .openai_api import ChoiceStream, FieldError, OpenAIOptions, choice_message, grammar_for, parse_openai_fields
from .openai_api import usage as _usage_of
from .session import ChatResult, GenerationCancelled, MiniCPMV, PreparedImage, StreamEvent, VideoInput
from .sources import SourceError, SourcePolicy, read_source, short

log = logging.getLogger("minicpmv_edge.server")

PRESET_PROMPTS = {
    "describe": "Describe this image in detail.",
    "caption": "Write a one-sentence caption for this image.",
    "ocr": "Read all the text in this image and write it out exactly.",
    "tags": "List the main objects in this image as comma-separated tags.",
    "question": "What is the most interesting thing in this image?",
}
ROLES = ("system", "developer", "user", "assistant", "tool")
_NOTHING = object()           # no event from the worker yet
MAX_JSON_DEPTH = 32           # the deepest legitimate request (messages > content > part > video > frames) is ~6
MAX_INT_DIGITS = 20           # 64-bit integers; a 5 000-digit "number" is refused while parsing


@dataclass
class ServerOptions:
    name: str = "minicpm-v"
    max_queue: int = 8                     # waiting requests beyond the one running
    max_body_bytes: int = 32 * 2 ** 20
    max_image_bytes: int = 20 * 2 ** 20   # per image or video frame, whatever its source
    max_video_bytes: int = 64 * 2 ** 20   # per video file
    max_images: int = 16                   # image parts per request, every shape counted
    max_videos: int = 2
    max_frames: int = 240                  # entries of video `frames` lists per request
    max_tokens_limit: int | None = None    # None: up to what the context has left after the prompt
    allow_local_files: bool = False
    local_roots: tuple[str, ...] = ()      # with allow_local_files: only files inside these folders
    allow_remote_urls: bool = False
    remote_allow_hosts: tuple[str, ...] = ()
    remote_timeout_s: float = 10.0
    remote_trusted_networks: tuple[str, ...] = ()   # test-only: networks treated as public (e.g. 127.0.0.1/32)
    retry_after_s: int = 2
    body_timeout_s: float = 30.0           # the whole body must arrive within this
    header_timeout_s: float = 10.0         # a connection must send its request headers within this
    docs: bool = False                     # /docs, /redoc and /openapi.json
    strict_model_name: bool = False        # False: any `model` is served by the one loaded model
    api_key: str | None = None             # set: every route but /health and / needs "Authorization: Bearer <key>"
    cors_origins: tuple[str, ...] = ()     # browser origins allowed to call (CORS is off when empty)
    max_image_handles: int = 8             # prepared images kept (POST /v1/images); the least recently used goes

    def source_policy(self) -> SourcePolicy:
        return SourcePolicy(max_image_bytes=self.max_image_bytes, max_video_bytes=self.max_video_bytes,
                            allow_local_files=self.allow_local_files, local_roots=self.local_roots,
                            allow_remote_urls=self.allow_remote_urls, remote_allow_hosts=self.remote_allow_hosts,
                            remote_timeout_s=self.remote_timeout_s,
                            remote_trusted_networks=self.remote_trusted_networks)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------
# Step 1: the body as JSON (bounded: no NaN/Infinity, no huge integers, no deep nesting, valid Unicode)

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits")
    return int(digits)


def parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_int=_bounded_int)
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({str(exc)[:100]})") from None
    stack = [(body, 0, "body")]
    while stack:     # iterative: depth and lone surrogates ("\ud800") checked once, for every field
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where}: the string is not valid Unicode (lone surrogate)",
                               param=where) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, depth + 1, where))
                stack.append((item, depth + 1, f"{where}.{short(key, 30)[1:-1]}" if where != "body"
                              else short(key, 30)[1:-1]))
        elif isinstance(value, list):
            stack += [(item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value)]
    return body


# ------------------------------------------------------------------------------------------------
# Step 2: fields. One parser per field; a new field is one more line in parse_chat_request.

def _field(body: dict, name: str, types: tuple, default: Any = None, *, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
    return value


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = _field(body, name, (int, float), None)
    if value is not None and not ((lo < value if lo_open else lo <= value) and value <= hi):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {short(value, 20)}",
                       param=name)
    return None if value is None else float(value)


def _int(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    value = _field(body, name, (int,), default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {short(value, 24)}", param=name)
    return value


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]      # checked shape; sources still as the client sent them
    thinking: bool
    stream: bool
    max_tokens: int | None                # None: to the end of the answer or of the context
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str] = field(default_factory=list)


def _model(body: dict, opts: ServerOptions, thinking_available: bool) -> str:
    model = _field(body, "model", (str,), opts.name)
    served = [opts.name] + ([f"{opts.name}-thinking"] if thinking_available else [])
    if opts.strict_model_name and model not in served:
        raise ApiError(404, f"model {short(model, 40)} does not exist; this server has "
                       + " and ".join(f"'{n}'" for n in served), code="model_not_found", param="model")
    return model


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and len(s) <= 256 for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings (256 characters each)", param="stop")
    return [s for s in stop if s]


# The content part shapes we accept, and where each keeps its source.
IMAGE_PARTS = {"image_url": "image_url", "input_image": "image_url", "image": "image"}
VIDEO_PARTS = {"video": "video", "video_url": "video_url"}
HANDLE_PART = "image_handle"          # {"type": "image_handle", "image_handle": "img_..."} from POST /v1/images


def _messages(body: dict, opts: ServerOptions) -> list[dict[str, Any]]:
    messages = _field(body, "messages", (list,), required=True)
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    n_images = n_videos = n_frames = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a string 'role'", param=where)
        if msg["role"] not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {short(msg['role'], 20)}",
                           param=f"{where}.role")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        for k, part in enumerate(content):
            at = f"{where}.content[{k}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ApiError(400, f"{at} must be an object with a 'type'", param=at)
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{at}.text must be a string", param=f"{at}.text")
            elif kind in IMAGE_PARTS or kind in VIDEO_PARTS or kind == HANDLE_PART:
                if msg["role"] != "user":
                    raise ApiError(400, f"{at}: images and videos are only accepted in user messages", param=at)
                if kind == HANDLE_PART and not isinstance(part.get(HANDLE_PART), str):
                    raise ApiError(400, f"{at}.{HANDLE_PART} must be a string (an id from POST /v1/images)",
                                   param=f"{at}.{HANDLE_PART}")
                if kind in IMAGE_PARTS or kind == HANDLE_PART:
                    n_images += 1
                    if n_images > opts.max_images:
                        raise ApiError(400, f"at most {opts.max_images} images per request", param=at)
                else:
                    n_videos += 1
                    if n_videos > opts.max_videos:
                        raise ApiError(400, f"at most {opts.max_videos} videos per request", param=at)
                    frames = part.get(VIDEO_PARTS[kind])
                    n_frames += len(frames.get("frames") or []) if isinstance(frames, dict) and \
                        isinstance(frames.get("frames"), list) else 0
                    if n_frames > opts.max_frames:
                        raise ApiError(400, f"at most {opts.max_frames} video frames per request", param=at)
            else:
                raise ApiError(400, f"{at}.type {short(kind, 30)} is not supported (text, image_url, input_image, "
                               "image, image_handle, video, video_url)", param=f"{at}.type")
    return messages


def parse_chat_request(body: Any, opts: ServerOptions, *, thinking_available: bool = True) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _model(body, opts, thinking_available)
    messages = _messages(body, opts)
    limit = opts.max_tokens_limit or 2 ** 31 - 1      # unset: the session checks against the context left
    max_tokens = _int(body, "max_tokens", 1, limit, None)
    max_completion_tokens = _int(body, "max_completion_tokens", 1, limit, None)  # the newer name
    return ChatRequest(
        model=model, messages=messages, thinking=model.endswith("-thinking"),
        stream=bool(_field(body, "stream", (bool,), False)),
        max_tokens=max_tokens or max_completion_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1, lo_open=True),
        seed=_int(body, "seed", 0, 2 ** 63 - 1, None),
        stop=_stop(body))


# ------------------------------------------------------------------------------------------------
# Step 3: sources -> bytes, through the one policy

def _source_value(part: dict, key: str) -> Any:
    value = part.get(key)
    return value.get("url") if isinstance(value, dict) and "frames" not in value else value


async def _video(part: dict, at: str, key: str, policy: SourcePolicy) -> VideoInput:
    fps, packing = part.get("fps", 3.0), part.get("packing")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 30:
        raise ApiError(400, f"{at}.fps must be a number in (0, 30], got {short(fps, 20)}", param=f"{at}.fps")
    if packing is not None and (isinstance(packing, bool) or not isinstance(packing, int) or not 1 <= packing <= 6):
        raise ApiError(400, f"{at}.packing must be an integer from 1 to 6, got {short(packing, 20)}",
                       param=f"{at}.packing")
    value = _source_value(part, key)
    if isinstance(value, dict):              # frames an app captured: {"frames": [...], "timestamps": [...]}
        frames, stamps = value.get("frames"), value.get("timestamps")
        if not isinstance(frames, list) or not frames:
            raise ApiError(400, f"{at}.{key}.frames must be a non-empty list of images", param=f"{at}.{key}.frames")
        if not isinstance(stamps, list) or len(stamps) != len(frames) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e6 for t in stamps) or \
                any(b <= a for a, b in zip(stamps, stamps[1:])):
            raise ApiError(400, f"{at}.{key}.timestamps must be one increasing number (seconds, >= 0) per frame",
                           param=f"{at}.{key}.timestamps")
        data = [await read_source(f, f"{at}.{key}.frames[{j}]", "image", policy) for j, f in enumerate(frames)]
        source: Any = {"frames": data, "timestamps": [float(t) for t in stamps]}
    else:
        source = await read_source(value, f"{at}.{key}", "video", policy)
    return VideoInput(source, float(fps), packing)


class ImageHandles:
    """Prepared images by handle id, the `limit` most recently used (each holds its slices' embeddings: a few MB)."""

    def __init__(self, limit: int):
        self.limit = max(int(limit), 0)
        self._items: OrderedDict[str, PreparedImage] = OrderedDict()

    def add(self, prepared: PreparedImage) -> str:
        handle = f"img_{uuid.uuid4().hex[:24]}"
        self._items[handle] = prepared
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return handle

    def get(self, handle: str, at: str) -> PreparedImage:
        prepared = self._items.get(handle)
        if prepared is None:
            raise ApiError(400, f"{at}: unknown image handle {short(handle, 40)} (never created, or one of more than "
                           f"{self.limit} and dropped; POST /v1/images makes one)", param=at, code="unknown_image_handle")
        self._items.move_to_end(handle)
        return prepared


async def resolve_messages(messages: list[dict[str, Any]], policy: SourcePolicy,
                           handles: ImageHandles | None = None) -> list[dict[str, Any]]:
    """Checked request messages -> runtime messages whose images and videos are bytes (or prepared images)."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, list):
            parts: list[Any] = []
            for k, part in enumerate(content):
                at, kind = f"messages[{i}].content[{k}]", part["type"]
                try:
                    if kind in IMAGE_PARTS:
                        key = IMAGE_PARTS[kind]
                        parts.append({"type": "image", "image": await read_source(
                            _source_value(part, key), f"{at}.{key}", "image", policy)})
                    elif kind in VIDEO_PARTS:
                        parts.append(await _video(part, at, VIDEO_PARTS[kind], policy))
                    elif kind == HANDLE_PART:
                        where = f"{at}.{HANDLE_PART}"
                        if handles is None:
                            raise ApiError(400, f"{where}: image handles are not available here", param=where)
                        parts.append({"type": "image", "image": handles.get(part[HANDLE_PART], where)})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                except SourceError as exc:
                    raise ApiError(exc.status, exc.message, param=at) from None
            content = parts
        resolved = {"role": msg["role"], "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):    # read by tool-aware chat templates
            if msg.get(key) is not None:
                resolved[key] = msg[key]
        out.append(resolved)
    return out


# ------------------------------------------------------------------------------------------------
# The worker: one model, one thread, a bounded queue

class _Job:
    def __init__(self, run: Callable[[threading.Event], Iterator[StreamEvent]], loop: asyncio.AbstractEventLoop):
        self.run, self.loop = run, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    def __init__(self, model: MiniCPMV, max_queue: int):
        self.model = model
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue + 1)
        self.busy = False
        self.served = 0
        self.thread = threading.Thread(target=self._loop, name="minicpmv-worker", daemon=True)
        self.thread.start()

    def submit(self, job: _Job, retry_after: int) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "the server is busy; try again shortly", type_="server_busy",
                           headers={"Retry-After": str(retry_after)}) from None

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():       # the client left while queued
                continue
            self.busy = True
            try:
                for ev in job.run(job.cancel):   # the session stops at the next token once cancel is set
                    job.emit(ev)
            except Exception as exc:      # reported to the client, never kills the worker
                if not isinstance(exc, MiniCPMVEdgeError):     # a bug, not a bad input: keep its traceback
                    log.error("worker: request failed", exc_info=exc)
                job.emit(exc)
            finally:
                self.busy = False
                self.served += 1
                job.emit(None)

    def stop(self) -> None:
        self.jobs.put(None)


def _apply_stop(events: Iterator[StreamEvent], stops: list[str], cancel: threading.Event) -> Iterator[StreamEvent]:
    """Cut the answer at the first stop string: text before it is sent, generation is asked to stop, and
    a tail that could still become a stop string is held back until it cannot. Logprobs ride along with the
    text they belong to; those of a cut tail are dropped with it."""
    if not stops:
        yield from events
        return
    hold = max(map(len, stops)) - 1
    text, sent, cut = "", 0, None
    held: list = []          # logprobs of text not yet sent
    kept: list = []          # logprobs of text sent

    def send(delta: str, token_id: int | None) -> StreamEvent:
        nonlocal held
        kept.extend(held)
        ev, held = StreamEvent(delta, token_id, logprobs=held or None), []
        return ev
    for ev in events:
        if ev.result is not None:
            res = ev.result
            if cut is not None:
                res = dataclasses.replace(res, text=text[:cut], finish_reason="stop",
                                          logprobs=kept if res.logprobs is not None else None)
            elif sent < len(text) or held:
                yield send(text[sent:], None)
            yield StreamEvent("", None, res)
            return
        if ev.reasoning:
            if cut is None:
                yield ev
            continue
        if cut is not None:
            continue
        text += ev.delta
        held.extend(ev.logprobs or [])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            cut = min(hits)
            if cut > sent:
                yield send(text[sent:cut], ev.token_id)
            cancel.set()
            continue
        safe = len(text) - hold
        if safe > sent:
            yield send(text[sent:safe], ev.token_id)
            sent = safe


class _BearerKey:
    """ASGI middleware: every route but /health and the page at / needs "Authorization: Bearer <key>" (constant-
    time compare). Plain ASGI, not BaseHTTPMiddleware, so handlers still see a client disconnect."""

    OPEN_PATHS = ("/health", "/")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                from fastapi.responses import JSONResponse
                err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               type_="authentication_error", code="invalid_api_key")
                await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model: MiniCPMV, opts: ServerOptions | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    opts = opts or ServerOptions()
    policy = opts.source_policy()
    worker = Worker(model, opts.max_queue)
    handles = ImageHandles(opts.max_image_handles)
    thinking_available = bool(model.facts.thinking)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.stop()
    docs = {} if opts.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="minicpmv-edge", version="1", lifespan=lifespan, **docs)
    app.state.worker = worker
    if opts.api_key:
        app.add_middleware(_BearerKey, key=opts.api_key)
    if opts.cors_origins:      # added last, so it is outermost: preflights never reach the key check
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(opts.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)[:200]).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc):
        return JSONResponse(ApiError(400, f"invalid request: {str(exc.errors()[:1])[:200]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc):          # a bug: logged with its traceback, answered in the same shape
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").body(), 500)

    async def _json_body(request: Request) -> Any:
        """The body, refused as soon as it passes the size limit or the time limit (no middleware: a plain
        ASGI receive keeps disconnects visible to the handlers)."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
            raise ApiError(413, f"request body over {opts.max_body_bytes:,} bytes")

        async def read() -> bytes:
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > opts.max_body_bytes:
                    raise ApiError(413, f"request body over {opts.max_body_bytes:,} bytes")
            return bytes(raw)
        try:
            raw = await asyncio.wait_for(read(), opts.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {opts.body_timeout_s:g} s") from None
        return parse_json(raw)

    # ---- the browser page (#20): static, no secrets in it; its API calls carry the key like any client's
    page_html = Path(__file__).with_name("page.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        from fastapi.responses import HTMLResponse
        return HTMLResponse(page_html, headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
    # ---- end of the browser page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": opts.name, "busy": worker.busy, "queued": worker.jobs.qsize(),
                "served": worker.served}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        now = int(time.time())
        names = [opts.name] + ([f"{opts.name}-thinking"] if thinking_available else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "local"}
                                           for n in names]}

    def _runner(messages, req: ChatRequest, api: OpenAIOptions | None = None
                ) -> Callable[[threading.Event], Iterator[tuple[int, StreamEvent]]]:
        """The job: each of the `n` choices in turn, as (choice index, event). Every choice after the first
        reuses the prompt's KV cache (the decoder keeps the longest common prefix) and recomputes one position."""
        api = api or OpenAIOptions(seeds=[req.seed])

        def run(cancel: threading.Event) -> Iterator[tuple[int, StreamEvent]]:
            grammar = grammar_for(api, model)
            for index, seed in enumerate(api.seeds):
                stop_here = threading.Event()     # a stop string ends this choice, a disconnect ends all
                events = model.chat(messages, stream=True, thinking=req.thinking, seed=seed,
                                    max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=api.top_k, repetition_penalty=api.repetition_penalty,
                                    max_slices=api.max_slices, downsample_mode=api.downsample_mode,
                                    tools=api.tools_in_prompt, grammar=grammar,
                                    logprobs=api.logprobs, presence_penalty=api.presence_penalty,
                                    frequency_penalty=api.frequency_penalty, logit_bias=api.logit_bias,
                                    should_stop=lambda: cancel.is_set() or stop_here.is_set())
                for ev in _apply_stop(events, req.stop, stop_here):
                    yield index, ev
                if cancel.is_set():
                    return
        return run

    async def _events(job: _Job, request: Request):
        """Yield the worker's events; when the client goes away (queued or running), cancel the job."""
        done, checked = False, time.monotonic()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=0.2)
                except asyncio.TimeoutError:
                    item = _NOTHING
                if time.monotonic() - checked >= 0.2:     # also while tokens flow (a non-streamed answer)
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if item is _NOTHING:
                    continue
                if item is None:
                    done = True
                    return
                if isinstance(item, Exception):
                    done = True
                    raise _error_from(item)
                yield item
        finally:
            if not done:
                job.cancel.set()     # disconnect, or the response was cancelled: the worker stops at once

    def _error_from(exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, FieldError):
            return ApiError(exc.status, str(exc)[:300], param=exc.param)
        if isinstance(exc, ContextOverflowError):
            return ApiError(400, str(exc)[:300], code="context_length_exceeded")
        if isinstance(exc, GenerationCancelled):
            return ApiError(499, "client closed the request")
        if isinstance(exc, MiniCPMVEdgeError):
            return ApiError(400, str(exc)[:300])
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error")

    async def _submit(messages, req: ChatRequest, request: Request, api: OpenAIOptions | None = None):
        """Queue the job and wait for its first event, so errors before the answer (a bad image, an overflow,
        a bad schema) get their own status, streaming or not."""
        return await _queue(_runner(messages, req, api), request)

    async def _queue(run, request: Request):
        job = _Job(run, asyncio.get_running_loop())
        worker.submit(job, opts.retry_after_s)
        events = _events(job, request)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise ApiError(499, "client closed the request") from None
        return job, first, events

    async def _results(first: tuple[int, StreamEvent], events) -> list[ChatResult]:
        """A non-streaming job's final results, one per choice."""
        results: dict[int, ChatResult] = {}
        if first[1].result is not None:
            results[first[0]] = first[1].result
        async for index, ev in events:
            if ev.result is not None:
                results[index] = ev.result
        if not results:
            raise ApiError(499, "client closed the request")
        return [results[i] for i in sorted(results)]

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        req = parse_chat_request(body, opts, thinking_available=thinking_available)
        try:
            api = parse_openai_fields(body, stream=req.stream, seed=req.seed, n_vocab=model.decoder.n_vocab,
                                      has_thinking=thinking_available,
                                      tool_call_format=model.facts.tool_call_format)
        except FieldError as exc:
            raise _error_from(exc) from None
        if api.enable_thinking is not None:      # chat_template_kwargs wins over the model-name alias
            req.thinking = api.enable_thinking
        if req.thinking and not thinking_available:
            raise ApiError(400, "this model has no thinking mode", param="model")
        messages = await resolve_messages(req.messages, policy, handles)
        _job, first, events = await _submit(messages, req, request, api)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        token_bytes = model.decoder.token_bytes

        if not req.stream:
            results = await _results(first, events)
            return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": i, **choice_message(r, api, token_bytes)} for i, r in enumerate(results)],
                    "usage": _usage_of(results), "timings": results[0].timings.as_dict(),
                    "boxes": _boxes(results[0])}

        def chunk(choices: list, extra: dict | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": choices}
            body.update(extra or {})
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse():
            streams = [ChoiceStream(i, api, token_bytes) for i in range(api.n)]
            try:
                for s in streams:
                    yield chunk([s.start()])
                item = first
                while item is not None:
                    index, ev = item
                    for choice in streams[index].feed(ev):
                        extra = None
                        if ev.result is not None and choice["finish_reason"] is not None:
                            extra = {"usage": _usage(ev.result), "timings": ev.result.timings.as_dict(),
                                     "boxes": _boxes(ev.result)}
                        yield chunk([choice], extra)
                    item = await anext(events, None)
                if api.include_usage:
                    yield chunk([], {"usage": _usage_of([s.result for s in streams if s.result is not None])})
            except ApiError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            finally:
                await events.aclose()        # a disconnect cancels this generator: the job is cancelled too
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images")
    async def images(request: Request):
        """Encode an image and prefill the prompt up to it now; answer with a handle for later chat messages."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        _field(body, "image", (str, dict), required=True)       # a source string, or {"url": ...}
        max_slices = _int(body, "max_slices", 1, MAX_SLICE_NUMS, None)
        try:
            data = await read_source(_source_value(body, "image"), "image", "image", policy)
        except SourceError as exc:
            raise ApiError(exc.status, exc.message, param="image") from None

        def run(_cancel: threading.Event):
            estimate = model.image_tokens(data, max_slices=max_slices)    # from the header, before encoding
            yield estimate, model.prepare_image(data, max_slices=max_slices)
        _job, (estimate, prepared), events = await _queue(run, request)
        await events.aclose()
        handle = handles.add(prepared)
        return {"id": handle, "object": "image", "estimated_image_tokens": estimate,
                "image_tokens": prepared.image_tokens, "slices": prepared.slices,
                "prefilled_tokens": prepared.prefilled_tokens, "timings": prepared.timings.as_dict()}

    @app.post("/v1/describe")
    async def describe(request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        image = _field(body, "image", (str,), required=True)
        preset = _field(body, "preset_prompt", (str,), None)
        custom = _field(body, "custom_prompt", (str,), None)
        if custom:
            prompt = custom
        elif preset in PRESET_PROMPTS or preset is None:
            prompt = PRESET_PROMPTS[preset or "describe"]
        else:
            raise ApiError(400, f"unknown preset_prompt {short(preset, 40)} (choose from {', '.join(PRESET_PROMPTS)})",
                           param="preset_prompt")
        seed = _field(body, "seed", (int,), -1)
        if seed == -1:
            seed = random.randrange(2 ** 31)
        payload = {"model": opts.name, "seed": seed, "max_tokens": body.get("max_tokens", 256),
                   "messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": prompt}]}]}
        req = parse_chat_request(payload, opts, thinking_available=thinking_available)
        try:
            messages = await resolve_messages(req.messages, policy)
        except ApiError as exc:   # name the field the client sent
            raise ApiError(exc.status, exc.message.replace("messages[0].content[0].image", "image"),
                           param="image") from None
        _job, first, events = await _submit(messages, req, request)
        result = (await _results(first, events))[0]
        return {"text": result.text, "prompt": prompt, "seed": seed, "finish_reason": result.finish_reason,
                "usage": _usage(result), "timings": result.timings.as_dict()}

    return app


def make_server(app, host: str, port: int, opts: ServerOptions, log_level: str = "warning"):
    """A uvicorn server with the limits a public-facing process needs: request headers within
    `header_timeout_s` (slow-loris), at most 16 KiB of headers, idle keep-alive connections closed after 5 s."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _HeaderDeadline(H11Protocol):
        """Closes a connection that has not sent a whole request head `header_timeout_s` after it opened or
        after its previous response (uvicorn has no such timer: a slow-loris client would hold a connection)."""

        def _arm(self):
            self._waiting_since_cycle = self.cycle          # a new request replaces self.cycle
            self._header_timer = self.loop.call_later(opts.header_timeout_s, self._headers_late)

        def _disarm(self):
            timer, self._header_timer = getattr(self, "_header_timer", None), None
            if timer is not None:
                timer.cancel()

        def _headers_late(self):
            if self.cycle is self._waiting_since_cycle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def handle_events(self):
            super().handle_events()
            if getattr(self, "_header_timer", None) is not None and self.cycle is not self._waiting_since_cycle:
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._disarm()
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_HeaderDeadline,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
    return uvicorn.Server(config)


def _boxes(result: ChatResult) -> list[dict[str, Any]]:
    """The answer's grounding boxes/points/quads (0-1000 coords, pixels on the last image): our extra field."""
    return [b.as_dict() for b in result.boxes]


def _usage(result: ChatResult) -> dict[str, int]:
    t = result.timings
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens}
