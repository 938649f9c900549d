"""Tool calls, in the two forms the versions' chat templates teach (`facts.tool_call_format`):

    "json" (Qwen2/Qwen3, MiniCPM-V 2.6-4.5)      "xml" (Qwen3.5, MiniCPM-V 4.6)
    <tool_call>                                  <tool_call>
    {"name": "get_weather", "arguments":         <function=get_weather>
     {"city": "Paris"}}                          <parameter=city>
    </tool_call>                                 Paris
                                                 </parameter>
                                                 </function>
                                                 </tool_call>

written after (or instead of) the answer; the chat template shows the model the tools and, on the next turn,
the results. This module turns that text into OpenAI `tool_calls` (whole or as it streams) and, when the caller
forces a call (`tool_choice` "required" or a named function) or asks for a `response_format` with tools, writes
the grammar that makes the model produce one (or, in the latter case, an answer in that format).

XML parameter values are text. As llama.cpp's and vLLM's Qwen3-Coder/Qwen3.5 parsers do, the tool's JSON schema
types them: a parameter declared `"type": "string"`, or not in the schema, keeps its text; any other is
JSON-decoded when it parses as JSON (numbers, true/false, null, objects, arrays), with "True"/"False" (how the
template writes Python booleans) read as booleans, and keeps its text otherwise.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

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
                 or_answer: Mapping[str, Any] | None = None, fmt: str = "json") -> str:
    """A lark grammar (llguidance) for an answer that is one tool call, or several when `parallel`; with
    `or_answer` (a JSON schema: `response_format` with tool_choice "auto"), either that or an answer following
    the schema. `fmt`: the call form the model writes ("json" or "xml", facts.tool_call_format), laid out as the
    chat template writes calls. The markers are the vocabulary's single tokens where it has them (as the model
    was trained), text otherwise."""
    open_ = f"<[{open_token}]>" if open_token is not None else _literal(OPEN)
    close = f"<[{close_token}]>" if close_token is not None else _literal(CLOSE)
    rules = ["start: calls" if or_answer is None else "start: calls | answer",
             'calls: call ("\\n" call)*' if parallel else "calls: call"]
    if fmt == "xml":
        rules += [f'call: {open_} "\\n" body {close}', *_xml_body_rules(tools, only)]
    else:
        body = json.dumps({**call_schema(tools, only), "x-guidance": JSON_OPTIONS})   # compact, as the template
        rules += [f'call: {open_} "\\n" body "\\n" {close}', f"body: %json {body}"]
    if or_answer is not None:
        rules.append(f"answer: %json {json.dumps({**or_answer, 'x-guidance': JSON_OPTIONS})}")
    return "\n".join(rules) + "\n"


# --- the XML form (4.6) ---------------------------------------------------------------------------------------

# A parameter's value ends with this line (the template writes "\n</parameter>\n" after it).
_PARAM_END = "\n</parameter>\n"
# A text value: anything without the markers that end a parameter or a call (the parser cuts at the first).
_TEXT = "XML_TEXT: /(.|\\n)*/ & ~/(.|\\n)*(<\\/parameter>|<\\/tool_call>)(.|\\n)*/"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _properties(tool: Mapping[str, Any]) -> tuple[Mapping[str, Any], set[str]]:
    """A tool's parameters: {name: schema} in the schema's order, and the required names."""
    params = tool["function"].get("parameters") or {}
    props = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
    required = params.get("required") if isinstance(params.get("required"), list) else []
    return props, set(required)


def _choices(schema: Mapping[str, Any]) -> Any:
    """The values an enum or const schema allows (None for neither)."""
    return schema.get("enum", [schema["const"]] if "const" in schema else None)


def _is_text(schema: Any) -> bool:
    """A parameter whose value is written as plain text (not JSON): declared a string, or an enum/const of
    strings."""
    if not isinstance(schema, Mapping):
        return False
    choices = _choices(schema)
    if isinstance(choices, list) and choices:
        return all(isinstance(c, str) for c in choices)
    return schema.get("type") == "string"


def _text_terminal(schema: Mapping[str, Any]) -> str:
    """The lark terminal of a text value followed by the parameter's closing line (one terminal, so the lexer
    knows where the value ends)."""
    end = _literal(_PARAM_END)
    choices = _choices(schema)
    if choices:
        return "(" + " | ".join(_literal(c) for c in dict.fromkeys(choices)) + ") " + end
    value = "XML_TEXT"
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if isinstance(lo, int) or isinstance(hi, int):
        value += f" & /(.|\\n){{{lo if isinstance(lo, int) else 0},{hi if isinstance(hi, int) else ''}}}/"
    if isinstance(schema.get("pattern"), str):
        import llguidance      # a base dependency (runtime/structured.py)
        value += f" & /{llguidance.regex_to_lark(schema['pattern'], 'dw')}/"
    return f"({value}) {end}"


def _xml_body_rules(tools: Sequence[Mapping[str, Any]], only: str | None) -> list[str]:
    """`body`: one of the tools as <function=NAME>, its parameters in the schema's order (the required ones
    always), then </function>. Text parameters are free text within the schema's length/pattern/enum; every
    other value is JSON following its schema."""
    rules, bodies, terminals = [], [], [_TEXT]
    for i, tool in enumerate(t for t in tools if only is None or t["function"]["name"] == only):
        props, required = _properties(tool)
        parts = []
        for k, (key, schema) in enumerate(props.items()):
            head = _literal(f"<parameter={key}>\n")
            if _is_text(schema):
                terminals.append(f"V{i}_{k}: {_text_terminal(schema)}")
                rules.append(f"p{i}_{k}: {head} V{i}_{k}")
            else:
                value = json.dumps({**(schema if isinstance(schema, Mapping) else {}), "x-guidance": JSON_OPTIONS})
                rules.append(f"p{i}_{k}: {head} %json {value} {_literal(_PARAM_END)}")
            parts.append(f"p{i}_{k}" if key in required else f"p{i}_{k}?")
        name = tool["function"]["name"]
        head, tail = _literal(f"<function={name}>\n"), _literal("</function>\n")
        rules.append(f"f{i}: {head} {' '.join(parts)} {tail}")
        bodies.append(f"f{i}")
    return ["body: " + " | ".join(bodies), *rules, *terminals]


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _xml_value(text: str, schema: Any) -> Any:
    if schema is None or _is_text(schema):
        return text
    if isinstance(schema, Mapping) and schema.get("type") == "boolean" and text.strip() in ("True", "False"):
        return text.strip() == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_xml_call(body: str, tools: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
    """One <tool_call> body in the XML form -> an OpenAI tool call (arguments typed by `tools`' schemas, see the
    module doc), or None if it is not <function=NAME> followed by <parameter=KEY> blocks only."""
    m = _FUNCTION.fullmatch(body.strip())
    if m is None:
        return None
    name, inner = m.group(1), m.group(2)
    props: Mapping[str, Any] = {}
    for tool in tools or ():
        if tool["function"]["name"] == name:
            props = _properties(tool)[0]
    args, pos = {}, 0
    for p in _PARAMETER.finditer(inner):
        if inner[pos:p.start()].strip():
            return None
        value = p.group(2)
        value = value[1:] if value.startswith("\n") else value      # the template's line breaks around it
        value = value[:-1] if value.endswith("\n") else value
        args[p.group(1)] = _xml_value(value, props.get(p.group(1)))
        pos = p.end()
    if inner[pos:].strip():
        return None
    return {"id": _new_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def call_parser(fmt: str, tools: Sequence[Mapping[str, Any]] | None = None) -> Callable[[str], dict | None]:
    """The parser of one <tool_call> body in form `fmt` ("json" or "xml"); `tools` type XML values."""
    if fmt == "xml":
        return lambda body: parse_xml_call(body, tools)
    return parse_call


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
    is not a call, is given back as content (the client sees what the model wrote). `parse` reads one block's
    body (`call_parser`: the JSON form by default)."""
    parse: Callable[[str], dict[str, Any] | None] = parse_call
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
                call = self.parse(body.strip())
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


def split_answer(text: str, parse: Callable[[str], dict[str, Any] | None] = parse_call
                 ) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer -> (content, tool calls); content is None when the answer was only calls."""
    splitter = ToolCallSplitter(parse)
    content, _ = splitter.feed(text)
    content += splitter.close()
    if splitter.calls and not content.strip():
        return None, splitter.calls
    return (content.strip() if splitter.calls else content), splitter.calls
