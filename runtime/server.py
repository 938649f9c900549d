"""OpenAI-compatible local HTTP server for one loaded model (FastAPI + uvicorn).

    minicpmv-edge serve BUNDLE --port 8080
    POST /v1/chat/completions   text + image_url parts (data: URLs; files / remote URLs only when enabled), SSE;
                                structured output, logprobs, n, tools (runtime/openai_api.py); also /chat/completions
    GET  /v1/models             <name> and <name>-thinking (thinking on); also /models
    POST /v1/describe           {"image", "preset_prompt" | "custom_prompt", "seed"} (WaveSpeed-style)
    GET  /health

One model, one worker thread: requests wait in a bounded queue (503 + Retry-After when it is full), a client
that disconnects mid-stream frees the worker at the next token, and every error is a JSON body in OpenAI's
error shape with a 4xx status, never a crash of the process.
"""


import asyncio
import contextlib
import hmac
import ipaddress
import json
import queue
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from minicpmv_edge.errors import MiniCPMVEdgeError

from .decoder import ContextOverflowError
from .images import ImageInputError, decode_data_url
from .openai_api import ChoiceStream, FieldError, OpenAIOptions, choice_message, grammar_for, parse_openai_fields
from .openai_api import usage as _usage_of
from .session import ChatResult, MiniCPMV, StreamEvent

PRESET_PROMPTS = {
    "describe": "Describe this image in detail.",
    "caption": "Write a one-sentence caption for this image.",
    "ocr": "Read all the text in this image and write it out exactly.",
    "tags": "List the main objects in this image as comma-separated tags.",
    "question": "What is the most interesting thing in this image?",
}


@dataclass
class ServerOptions:
    name: str = "minicpm-v"
    max_queue: int = 8                     # waiting requests beyond the one running
    max_body_bytes: int = 32 * 2 ** 20
    max_image_bytes: int = 20 * 2 ** 20
    max_images: int = 16
    max_tokens_limit: int | None = None    # None: up to what the context has left after the prompt
    allow_local_files: bool = False
    allow_remote_urls: bool = False
    remote_allow_hosts: tuple[str, ...] = ()
    remote_timeout_s: float = 10.0
    retry_after_s: int = 2
    strict_model_name: bool = False        # False: any `model` is served by the one loaded model
    api_key: str | None = None             # set: every route but /health needs "Authorization: Bearer <key>"
    cors_origins: tuple[str, ...] = ()     # browser origins allowed to call (CORS is off when empty)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------
# Request validation (plain functions: every path gives an ApiError naming the field)

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


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    thinking: bool
    stream: bool
    max_tokens: int | None                # None: to the end of the answer or of the context
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str] = field(default_factory=list)


def parse_chat_request(body: Any, opts: ServerOptions) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", (str,), opts.name)
    if opts.strict_model_name and model not in (opts.name, f"{opts.name}-thinking"):
        raise ApiError(404, f"model '{model}' does not exist; this server has '{opts.name}' and "
                       f"'{opts.name}-thinking'", code="model_not_found", param="model")
    messages = _field(body, "messages", (list,), required=True)
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    n_images = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = msg.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ApiError(400, f"messages[{i}].content[{k}] must be an object with a 'type'",
                                   param=f"messages[{i}].content[{k}]")
                if part["type"] == "image_url":
                    n_images += 1
                    if n_images > opts.max_images:
                        raise ApiError(400, f"at most {opts.max_images} images per request", param="messages")
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           param=f"messages[{i}].content")
    max_tokens = _field(body, "max_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", (int,), None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", param="max_tokens")
    if max_tokens is not None and opts.max_tokens_limit is not None and max_tokens > opts.max_tokens_limit:
        raise ApiError(400, f"'max_tokens' must be at most {opts.max_tokens_limit}", param="max_tokens")
    temperature = _field(body, "temperature", (int, float), None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise ApiError(400, "'temperature' must be between 0 and 2", param="temperature")
    top_p = _field(body, "top_p", (int, float), None)
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, "'top_p' must be in (0, 1]", param="top_p")
    seed = _field(body, "seed", (int,), None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return ChatRequest(model, messages, model.endswith("-thinking"), bool(_field(body, "stream", (bool,), False)),
                       max_tokens, None if temperature is None else float(temperature),
                       None if top_p is None else float(top_p), seed, [s for s in stop if s])


def _is_public_address(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast \
                or ip.is_unspecified:
            return False
    return True


def resolve_image(url: Any, opts: ServerOptions) -> Any:
    """An image_url value -> something `load_image` takes (bytes or a path), under the server's rules."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a non-empty string")
    if url.startswith("data:"):
        try:
            return decode_data_url(url, opts.max_image_bytes)
        except ImageInputError as exc:
            raise ApiError(400 if "limit" not in str(exc) else 413, str(exc)) from None
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not opts.allow_remote_urls:
            raise ApiError(400, "remote image URLs are disabled on this server (start it with --allow-remote-urls); "
                           "send the image as a data: URL")
        host = urlparse(url).hostname or ""
        if host not in opts.remote_allow_hosts:
            raise ApiError(403, f"host '{host}' is not in the remote URL allow-list")
        if not _is_public_address(host):
            raise ApiError(403, f"host '{host}' resolves to a private or local address")
        return _fetch(url, opts)
    if scheme in ("", "file"):
        if not opts.allow_local_files:
            raise ApiError(400, "local file paths are disabled on this server (start it with --allow-local-files)")
        return url[7:] if scheme == "file" else url
    raise ApiError(400, f"unsupported image URL scheme '{scheme}'")


def _fetch(url: str, opts: ServerOptions) -> bytes:
    import urllib.request
    req = urllib.request.Request(url, headers={"User-Agent": "minicpmv-edge"})
    try:
        with urllib.request.urlopen(req, timeout=opts.remote_timeout_s) as resp:   # noqa: S310 (allow-listed)
            data = resp.read(opts.max_image_bytes + 1)
    except OSError as exc:
        raise ApiError(400, f"could not fetch {url}: {exc}") from None
    if len(data) > opts.max_image_bytes:
        raise ApiError(413, f"remote image is over {opts.max_image_bytes:,} bytes")
    return data


def _openai_messages(req_messages: list[dict[str, Any]], opts: ServerOptions) -> list[dict[str, Any]]:
    out = []
    for msg in req_messages:
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    parts.append({"type": "image", "image": resolve_image(part.get("image_url"), opts)})
                else:
                    parts.append(part)
            content = parts
        out.append({"role": msg["role"], "content": content})
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
                res = ChatResult(text[:cut], res.reasoning, res.token_ids, "stop", res.timings,
                                 kept if res.logprobs is not None else None)
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


def create_app(model: MiniCPMV, opts: ServerOptions | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    opts = opts or ServerOptions()
    worker = Worker(model, opts.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.stop()
    app = FastAPI(title="minicpmv-edge", version="1", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc):
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
            return JSONResponse(ApiError(413, f"request body over {opts.max_body_bytes:,} bytes").body(), 413)
        return await call_next(request)

    if opts.api_key:
        key = opts.api_key.encode()

        @app.middleware("http")
        async def _require_key(request: Request, call_next):
            if request.url.path != "/health" and request.method != "OPTIONS":
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                    err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                   type_="authentication_error", code="invalid_api_key")
                    return JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    if opts.cors_origins:      # added last, so it is outermost: preflights never reach the key check
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(opts.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    async def _json_body(request: Request) -> Any:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > opts.max_body_bytes:
                raise ApiError(413, f"request body over {opts.max_body_bytes:,} bytes")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": opts.name, "busy": worker.busy, "queued": worker.jobs.qsize(),
                "served": worker.served}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        now = int(time.time())
        names = [opts.name] + ([f"{opts.name}-thinking"] if model.facts.thinking else [])
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
                                    max_slices=api.max_slices, tools=api.tools_in_prompt, grammar=grammar,
                                    logprobs=api.logprobs, presence_penalty=api.presence_penalty,
                                    frequency_penalty=api.frequency_penalty, logit_bias=api.logit_bias,
                                    should_stop=lambda: cancel.is_set() or stop_here.is_set())
                for ev in _apply_stop(events, req.stop, stop_here):
                    yield index, ev
                if cancel.is_set():
                    return
        return run

    async def _events(job: _Job, request: Request):
        """Yield the worker's events; on disconnect, cancel the job."""
        while True:
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    return
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def _error_from(exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, FieldError):
            return ApiError(exc.status, str(exc), param=exc.param)
        if isinstance(exc, ContextOverflowError):
            return ApiError(400, str(exc), code="context_length_exceeded")
        if isinstance(exc, MiniCPMVEdgeError):
            return ApiError(400, str(exc))
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error")

    async def _results(job: _Job, request: Request) -> list[ChatResult]:
        """Wait for a non-streaming job's final results, one per choice."""
        results: dict[int, ChatResult] = {}
        try:
            async for index, ev in _events(job, request):
                if ev.result is not None:
                    results[index] = ev.result
        except Exception as exc:
            raise _error_from(exc) from None
        if not results:
            raise ApiError(499, "client closed the request")
        return [results[i] for i in sorted(results)]

    async def _result(job: _Job, request: Request) -> ChatResult:
        return (await _results(job, request))[0]

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        req = parse_chat_request(body, opts)
        try:
            api = parse_openai_fields(body, stream=req.stream, seed=req.seed, n_vocab=model.decoder.n_vocab,
                                      has_thinking=model.facts.thinking)
        except FieldError as exc:
            raise _error_from(exc) from None
        if api.enable_thinking is not None:      # chat_template_kwargs wins over the model-name alias
            req.thinking = api.enable_thinking
        if req.thinking and not model.facts.thinking:
            raise ApiError(400, "this model has no thinking mode", param="model")
        messages = _openai_messages(req.messages, opts)
        job = _Job(_runner(messages, req, api), asyncio.get_running_loop())
        worker.submit(job, opts.retry_after_s)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        token_bytes = model.decoder.token_bytes

        if not req.stream:
            results = await _results(job, request)
            return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": i, **choice_message(r, api, token_bytes)} for i, r in enumerate(results)],
                    "usage": _usage_of(results), "timings": results[0].timings.as_dict()}

        # Wait for the first event before answering 200, so that what fails before the first token (a prompt
        # over the context, a bad schema, a busy model) is a real HTTP error status, not an in-band one.
        events = _events(job, request).__aiter__()
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise ApiError(499, "client closed the request") from None
        except Exception as exc:
            raise _error_from(exc) from None

        async def sse():
            def chunk(choices: list, extra: dict | None = None) -> str:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": choices}
                body.update(extra or {})
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
            streams = [ChoiceStream(i, api, token_bytes) for i in range(api.n)]
            for s in streams:
                yield chunk([s.start()])
            try:
                item = first
                while True:
                    index, ev = item
                    for choice in streams[index].feed(ev):
                        extra = None
                        if ev.result is not None and choice["finish_reason"] is not None:
                            extra = {"usage": _usage(ev.result), "timings": ev.result.timings.as_dict()}
                        yield chunk([choice], extra)
                    try:
                        item = await events.__anext__()
                    except StopAsyncIteration:
                        break
                if api.include_usage:
                    yield chunk([], {"usage": _usage_of([s.result for s in streams if s.result is not None])})
            except Exception as exc:
                yield f"data: {json.dumps(_error_from(exc).body())}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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
            raise ApiError(400, f"unknown preset_prompt '{preset}' (choose from {', '.join(PRESET_PROMPTS)})",
                           param="preset_prompt")
        seed = _field(body, "seed", (int,), -1)
        if seed == -1:
            seed = random.randrange(2 ** 31)
        max_tokens = _field(body, "max_tokens", (int,), 256)
        payload = {"model": opts.name, "seed": seed, "max_tokens": max_tokens,
                   "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                             {"type": "text", "text": prompt}]}]}
        req = parse_chat_request(payload, opts)
        job = _Job(_runner(_openai_messages(req.messages, opts), req), asyncio.get_running_loop())
        worker.submit(job, opts.retry_after_s)
        result = await _result(job, request)
        return {"text": result.text, "prompt": prompt, "seed": seed, "finish_reason": result.finish_reason,
                "usage": _usage(result), "timings": result.timings.as_dict()}

    return app


def _usage(result: ChatResult) -> dict[str, int]:
    t = result.timings
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "total_tokens": t.prompt_tokens + t.completion_tokens}
