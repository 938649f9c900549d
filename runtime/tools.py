"""Tool calls in the Qwen3 / MiniCPM-V 4.5 convention: the model writes

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

after (or instead of) its answer; the chat template shows it the tools and, on the next turn, the results.
This module turns that text into OpenAI `tool_calls` (whole or as it streams) and, when the caller forces a
call (`tool_choice` "required" or a named function) or asks for a `response_format` with tools, writes the
grammar that makes the model produce one (or, in the latter case, an answer in that format).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .structured import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_schema(tools: Sequence[Mapping[str, Any]], only: str | None = None) -> dict[str, Any]:
    """JSON schema of one call's body: {"name": <a tool's name>, "arguments": <that tool's parameters>}."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(tools: Sequence[Mapping[str, Any]], only: str | None, parallel: bool,
                 open_token: int | None, close_token: int | None,
                 or_answer: Mapping[str, Any] | None = None) -> str:
    """A lark grammar (llguidance) for an answer that is one tool call, or several when `parallel`; with
    `or_answer` (a JSON schema: `response_format` with tool_choice "auto"), either that or an answer following
    the schema. The markers are the vocabulary's single tokens where it has them (as the model was trained),
    text otherwise."""
    open_ = f"<[{open_token}]>" if open_token is not None else json.dumps(OPEN)
    close = f"<[{close_token}]>" if close_token is not None else json.dumps(CLOSE)
    body = json.dumps({**call_schema(tools, only), "x-guidance": JSON_OPTIONS})   # compact, as the template writes
    rules = ["start: calls" if or_answer is None else "start: calls | answer",
             'calls: call ("\\n" call)*' if parallel else "calls: call",
             f'call: {open_} "\\n" body "\\n" {close}', f"body: %json {body}"]
    if or_answer is not None:
        rules.append(f"answer: %json {json.dumps({**or_answer, 'x-guidance': JSON_OPTIONS})}")
    return "\n".join(rules) + "\n"


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str) -> dict[str, Any] | None:
    """One <tool_call> body -> an OpenAI tool call, or None if it is not {"name": str, "arguments": ...}."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", {})
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": _new_id(), "type": "function", "function": {"name": data["name"], "arguments": args}}


@dataclass
class ToolCallSplitter:
    """Splits streamed answer text into plain content and tool calls. Text that may be the start of a
    <tool_call> marker is held back until it is known not to be; a block that never closes, or whose body
    is not a call, is given back as content (the client sees what the model wrote)."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    _buf: str = ""
    _inside: bool = False

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """New text -> (content that is safe to send now, calls completed by it)."""
        self._buf += text
        content, done = [], []
        while True:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                body, self._buf, self._inside = self._buf[:end], self._buf[end + len(CLOSE):], False
                call = parse_call(body.strip())
                if call is None:
                    content.append(OPEN + body + CLOSE)
                else:
                    done.append(call)
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                content.append(self._buf[:start])
                self._buf, self._inside = self._buf[start + len(OPEN):], True
                continue
            keep = next((k for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                         if OPEN.startswith(self._buf[-k:])), 0)
            content.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            break
        self.calls += done
        return "".join(content), done

    def close(self) -> str:
        """The end of the answer: whatever is still held back, as content."""
        rest = (OPEN + self._buf) if self._inside else self._buf
        self._buf, self._inside = "", False
        return rest


def split_answer(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer -> (content, tool calls); content is None when the answer was only calls."""
    splitter = ToolCallSplitter()
    content, _ = splitter.feed(text)
    content += splitter.close()
    if splitter.calls and not content.strip():
        return None, splitter.calls
    return (content.strip() if splitter.calls else content), splitter.calls
