"""The OpenAI chat-completions fields beyond the basics, and the response shapes they ask for.

server.py parses the basics (model, messages, stream, max_tokens, temperature, top_p, seed, stop); this module
parses everything else a client may send, and refuses with a 400 naming the field what it does not support,
so nothing is silently dropped:

    n, logprobs, top_logprobs, response_format (json_object / json_schema, grammar-enforced),
    tools, tool_choice, parallel_tool_calls, stream_options.include_usage, presence_penalty,
    frequency_penalty, logit_bias, user, and the common extensions top_k, repetition_penalty, max_slices,
    chat_template_kwargs.enable_thinking, and downsample_mode (MiniCPM-V 4.6: "16x" or "4x").

It also shapes what goes back: `logprobs.content`, `tool_calls` (whole, or as streamed deltas) and the final
usage chunk of a stream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from minicpmv_edge.errors import MiniCPMVEdgeError

from .decoder import TokenLogprob
from .session import ChatResult, StreamEvent
from .tools import ToolCallSplitter, call_grammar, call_parser, split_answer

BASIC_FIELDS = {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "seed", "stop"}
EXTRA_FIELDS = {"n", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k",
                "repetition_penalty", "max_slices", "chat_template_kwargs", "downsample_mode"}
MAX_N = 8                      # choices per request (each is a full generation, one after the other)
MAX_TOP_LOGPROBS = 20          # as OpenAI
MAX_TOOLS = 128                # as OpenAI
MAX_LOGIT_BIAS = 300
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names


class FieldError(MiniCPMVEdgeError):
    """A request field with a value we cannot honour; the server answers `status` naming `param`."""

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise FieldError(name, f"'{name}' must be a number between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FieldError(name, f"'{name}' must be an integer between {lo} and {hi}, got {value!r}")
    return value


def _boolean(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(name, f"'{name}' must be true or false, got {value!r}")
    return value


@dataclass
class ResponseFormat:
    type: str                                   # "json_object" or "json_schema"
    schema: dict[str, Any] | None = None


@dataclass
class OpenAIOptions:
    """The parsed extra fields of one chat request."""
    n: int = 1
    logprobs: int | None = None                 # None: off; k: chosen token + k alternatives
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"                   # "auto", "none", "required" or "function"
    tool_name: str | None = None                # the forced function with tool_choice "function"
    parallel_tool_calls: bool = True
    include_usage: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_slices: int | None = None
    downsample_mode: str | None = None          # 4.6: "16x" (default) or "4x"; the session checks the value
    enable_thinking: bool | None = None         # None: the model name decides (`<name>-thinking`)
    seeds: list[int | None] = field(default_factory=lambda: [None])
    tool_call_format: str = "json"              # how the model writes calls (facts.tool_call_format)

    @property
    def tools_in_prompt(self) -> list[dict[str, Any]] | None:
        return self.tools if self.tools and self.tool_choice != "none" else None

    def parse_call(self, body: str) -> dict[str, Any] | None:
        """One <tool_call> body of this model's answer -> an OpenAI tool call, or None."""
        return call_parser(self.tool_call_format, self.tools)(body)


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise FieldError("response_format", "'response_format' must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise FieldError("response_format.json_schema", "'response_format.json_schema' must be an object "
                             "with 'name' and 'schema'")
        if not isinstance(spec.get("schema"), dict):
            raise FieldError("response_format.json_schema.schema",
                             "'response_format.json_schema.schema' must be a JSON schema object")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise FieldError("response_format.json_schema.strict", "'strict' must be true or false")
        return ResponseFormat("json_schema", spec["schema"])
    raise FieldError("response_format.type", f"response_format type {kind!r} is not supported "
                     "(use 'text', 'json_object' or 'json_schema')")


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise FieldError("tools", f"'tools' must be a list of 1 to {MAX_TOOLS} function tools")
    names = set()
    out = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise FieldError(where, f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise FieldError(f"{where}.function.name", f"'{where}.function.name' must be 1-64 letters, digits, "
                             "'_' or '-'")
        if name in names:
            raise FieldError(f"{where}.function.name", f"two tools are named {name!r}")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise FieldError(f"{where}.function.parameters", f"'{where}.function.parameters' must be a JSON "
                             "schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise FieldError(f"{where}.function.description", "a tool's description must be a string")
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                      if fn.get(k) is not None}})
    return out


def _tool_choice(value: Any, tools: list | None) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str) and value in ("auto", "none", "required"):
        if value != "none" and not tools:
            raise FieldError("tool_choice", f"tool_choice {value!r} needs 'tools'")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not in 'tools'")
        return "function", name
    raise FieldError("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def _logit_bias(value: Any, n_vocab: int) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise FieldError("logit_bias", f"'logit_bias' must map up to {MAX_LOGIT_BIAS} token ids to biases")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < n_vocab):
            raise FieldError("logit_bias", f"logit_bias key {key!r} is not a token id of this model "
                             f"(0..{n_vocab - 1})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise FieldError("logit_bias", f"logit_bias[{key}] must be a number between -100 and 100")
        out[int(key)] = float(bias)
    return out


def _check_messages(messages: Sequence[Any]) -> None:
    """Tool turns as OpenAI requires them: an assistant's `tool_calls` are well formed, and every `tool`
    message answers a call of the assistant turn before it."""
    open_ids: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue        # server.py names this error
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls") is not None:
            calls = msg["tool_calls"]
            if not isinstance(calls, list):
                raise FieldError(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls must be a list")
            open_ids = set()
            for k, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                        and isinstance(fn.get("arguments"), (str, dict)) and isinstance(call.get("id"), str)):
                    raise FieldError(f"messages[{i}].tool_calls[{k}]", f"messages[{i}].tool_calls[{k}] must be "
                                     "{\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
                open_ids.add(call["id"])
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in open_ids:
                raise FieldError(f"messages[{i}].tool_call_id", f"messages[{i}] (role 'tool') must answer a call "
                                 "of the assistant turn before it with its 'tool_call_id'")
        elif role is not None:
            open_ids = set()


def parse_openai_fields(body: Mapping[str, Any], *, stream: bool, seed: int | None, n_vocab: int,
                        has_thinking: bool, tool_call_format: str = "json") -> OpenAIOptions:
    """The extra fields of a chat request (see the module doc); raises FieldError naming the first bad one.
    `tool_call_format`: the model's (facts.tool_call_format), for the calls' grammar and parser."""
    unknown = sorted(set(body) - BASIC_FIELDS - EXTRA_FIELDS)
    if unknown:
        raise FieldError(unknown[0], f"'{unknown[0]}' is not supported by this server")
    o = OpenAIOptions(tool_call_format=tool_call_format)
    o.n = _integer(body, "n", 1, MAX_N, 1)
    # choice i draws with seed + i, so a seeded request gives n different answers and the same n again
    o.seeds = [None if seed is None else seed + i for i in range(o.n)]
    if _boolean(body, "logprobs", False):
        o.logprobs = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    elif body.get("top_logprobs") is not None:
        raise FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    o.response_format = _response_format(body.get("response_format"))
    o.tools = _tools(body.get("tools"))
    o.tool_choice, o.tool_name = _tool_choice(body.get("tool_choice"), o.tools)
    o.parallel_tool_calls = _boolean(body, "parallel_tool_calls", True)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise FieldError("stream_options", "'stream_options' is only allowed with 'stream': true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise FieldError("stream_options", "'stream_options' supports only {\"include_usage\": bool}")
        o.include_usage = _boolean(options, "include_usage", False)
    o.presence_penalty = _number(body, "presence_penalty", -2, 2, 0.0)
    o.frequency_penalty = _number(body, "frequency_penalty", -2, 2, 0.0)
    o.logit_bias = _logit_bias(body.get("logit_bias"), n_vocab)
    top_k = _integer(body, "top_k", -1, n_vocab, None)
    o.top_k = None if top_k is None else max(top_k, 0)      # -1 (vLLM's "off") and 0 both mean off
    o.repetition_penalty = _number(body, "repetition_penalty", 0.01, 10, None)
    o.max_slices = _integer(body, "max_slices", 1, 36, None)
    mode = body.get("downsample_mode")
    if mode is not None and not (isinstance(mode, str) and 0 < len(mode) <= 8):
        raise FieldError("downsample_mode", "'downsample_mode' must be a short string (MiniCPM-V 4.6: \"16x\" or "
                         "\"4x\")")
    o.downsample_mode = mode
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise FieldError("user", "'user' must be a string")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
            extra = sorted(set(kwargs) - {"enable_thinking"}) if isinstance(kwargs, dict) else []
            raise FieldError(f"chat_template_kwargs.{extra[0]}" if extra else "chat_template_kwargs",
                             "'chat_template_kwargs' supports only 'enable_thinking'")
        if not isinstance(kwargs.get("enable_thinking", False), bool):
            raise FieldError("chat_template_kwargs.enable_thinking",
                             "'chat_template_kwargs.enable_thinking' must be true or false")
        o.enable_thinking = kwargs.get("enable_thinking")
        if o.enable_thinking and not has_thinking:
            raise FieldError("chat_template_kwargs.enable_thinking", "this model has no thinking mode")
    _check_messages(body.get("messages") or [])
    return o


def grammar_for(o: OpenAIOptions, model: Any) -> str | None:
    """The compiled grammar that enforces the response format and/or the tool call, or None:

    * tool_choice "required" or a named function: the answer is a call (a response_format then waits for the
      turn after the tool results, as with OpenAI);
    * response_format with tools and tool_choice "auto": a call, or an answer in the format (as OpenAI allows);
    * response_format alone: the answer is in the format.

    Runs on the worker thread: the first call builds the model's grammar engine."""
    forced = o.tools_in_prompt is not None and o.tool_choice in ("required", "function")
    if o.response_format is None and not forced:
        return None
    engine = model.grammar_engine()
    if o.tools_in_prompt is None:
        if o.response_format.type == "json_object":
            return engine.json_object()
        return engine.json_schema(o.response_format.schema)
    answer = None                   # response_format with tools under "auto": the answer the call may give way to
    if not forced:
        answer = {"type": "object"} if o.response_format.type == "json_object" else o.response_format.schema
    single = [model.decoder.tokenize(m, parse_special=True) for m in ("<tool_call>", "</tool_call>")]
    open_id, close_id = (ids[0] if len(ids) == 1 else None for ids in single)
    text = call_grammar(o.tools, o.tool_name, o.parallel_tool_calls and o.tool_choice != "function", open_id,
                        close_id, or_answer=answer, fmt=o.tool_call_format)
    return engine.lark(text, "tools" if forced else "response_format")


# ------------------------------------------------------------------------------------------------
# Response shapes

TokenBytes = Callable[[int], bytes]


def logprobs_content(entries: Sequence[TokenLogprob], token_bytes: TokenBytes) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content`: per token its text, bytes, logprob and the top alternatives."""
    def one(tok: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tok)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}
    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def usage(results: Sequence[ChatResult]) -> dict[str, int]:
    prompt = results[0].timings.prompt_tokens if results else 0
    completion = sum(r.timings.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_message(result: ChatResult, o: OpenAIOptions, token_bytes: TokenBytes) -> dict[str, Any]:
    """One `choices[i]` of a chat.completion (without its index)."""
    content, calls = (split_answer(result.text, o.parse_call) if o.tools_in_prompt else (result.text, []))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    choice: dict[str, Any] = {"message": message, "finish_reason": "tool_calls" if calls else result.finish_reason}
    if o.logprobs is not None:
        choice["logprobs"] = {"content": logprobs_content(result.logprobs or [], token_bytes)}
    return choice


class ChoiceStream:
    """One choice of a streamed answer: events in, `choices[i]` chunk bodies out (content, reasoning,
    tool-call deltas, logprobs, finish)."""

    def __init__(self, index: int, o: OpenAIOptions, token_bytes: TokenBytes):
        self.index, self.o, self.token_bytes = index, o, token_bytes
        self.splitter = ToolCallSplitter(o.parse_call) if o.tools_in_prompt else None
        self.result: ChatResult | None = None

    def _choice(self, delta: dict[str, Any], finish: str | None = None,
                logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self.index, "delta": delta, "finish_reason": finish}
        if self.o.logprobs is not None and logprobs:
            choice["logprobs"] = {"content": logprobs_content(logprobs, self.token_bytes)}
        return choice

    def _tool_deltas(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        first = len(self.splitter.calls) - len(calls)
        return {"tool_calls": [{"index": first + k, **call} for k, call in enumerate(calls)]}

    def start(self) -> dict[str, Any]:
        return self._choice({"role": "assistant", "content": ""})

    def feed(self, ev: StreamEvent) -> list[dict[str, Any]]:
        if ev.result is not None:
            self.result = ev.result
            out = []
            if self.splitter is not None:
                rest = self.splitter.close()
                if rest:
                    out.append(self._choice({"content": rest}))
            finish = "tool_calls" if self.splitter is not None and self.splitter.calls else ev.result.finish_reason
            return out + [self._choice({}, finish)]
        if not ev.delta and not ev.logprobs:
            return []
        if ev.reasoning:
            return [self._choice({"reasoning_content": ev.delta})]
        if self.splitter is None:
            return [self._choice({"content": ev.delta}, logprobs=ev.logprobs)]
        content, calls = self.splitter.feed(ev.delta)
        out = []
        if content or ev.logprobs:
            out.append(self._choice({"content": content}, logprobs=ev.logprobs))
        if calls:
            out.append(self._choice(self._tool_deltas(calls)))
        return out
