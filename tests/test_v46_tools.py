"""Tool calls on MiniCPM-V 4.6 (issue 15): the XML call form of Qwen3.5,

    <tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>

* our chat template (export/templates/qwen35.jinja) renders what the hub's own template renders
  (tests/reference/minicpmv46_chat_template.json, its source cited there), by transformers' renderer, on the
  same conversations: tools, calls, tool results, reasoning, system turns, images, whitespace, errors;
* the runtime's prompt (caller text marked untrusted, OpenAI string arguments) tokenizes exactly like the hub
  template's text rendered by transformers, on the tiny 4.6 bundle;
* the XML parser, streamed and whole, and the grammar that forces calls;
* the server on the tiny 4.6 bundle: tool_choice "required" (several seeds, arguments valid against the
  schema), streamed deltas equal to the whole answer, a named function, response_format with tools, and the
  round trip of the calls and their results.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "reference" / "minicpmv46_chat_template.json"

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"type": "string", "enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ALARM = {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                          "days": {"type": "array", "items": {"type": "string", "enum": ["mon", "tue"]},
                                                   "maxItems": 2},
                                          "loud": {"type": "boolean"},
                                          "note": {"type": "string", "maxLength": 20}},
         "required": ["hour", "loud"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": ALARM}}]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]

# assistant calls as transformers users give them (arguments an object: the hub template walks them key by key)
CALLS = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}},
         {"type": "function", "function": {"name": "set_alarm", "arguments": {
             "hour": 7, "loud": True, "days": ["mon", "tue"], "note": "two\nlines", "extra": {"a": [1, None]}}}}]
RESULTS = [{"role": "tool", "content": "18 C"}, {"role": "tool", "content": " <b>&\n"}]

# name -> (messages, apply_chat_template keywords)
CONVERSATIONS = {
    "plain": (ASK, dict(add_generation_prompt=True)),
    "thinking": (ASK, dict(add_generation_prompt=True, enable_thinking=True)),
    "not_thinking": (ASK, dict(add_generation_prompt=True, enable_thinking=False)),
    "system": ([{"role": "system", "content": " Be brief. "}, *ASK], dict(add_generation_prompt=True)),
    "tools": (ASK, dict(tools=TOOLS, add_generation_prompt=True)),
    "tools_system": ([{"role": "system", "content": "Be brief."}, *ASK], dict(tools=TOOLS, add_generation_prompt=True)),
    "tools_empty_system": ([{"role": "system", "content": "  "}, *ASK], dict(tools=TOOLS, add_generation_prompt=True)),
    "calls": ([*ASK, {"role": "assistant", "content": "", "tool_calls": CALLS}, *RESULTS],
              dict(tools=TOOLS, add_generation_prompt=True)),
    "calls_after_text": ([*ASK, {"role": "assistant", "content": "Let me check.\n", "tool_calls": CALLS[:1]},
                          RESULTS[0], {"role": "assistant", "content": "18 C."}], dict(tools=TOOLS)),
    "calls_with_reasoning": ([*ASK, {"role": "assistant", "content": None, "reasoning_content": "\nneed data\n",
                                     "tool_calls": CALLS[1:]}, RESULTS[0]],
                             dict(tools=TOOLS, add_generation_prompt=True, enable_thinking=True)),
    "history": ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
                 {"role": "user", "content": "Q2 "}, {"role": "assistant", "content": "<think>r2</think>A2"}], {}),
    "tool_response_user": ([*ASK, {"role": "assistant", "content": "<think>r</think>A"},
                            {"role": "user", "content": "<tool_response>\nx\n</tool_response>"},
                            {"role": "assistant", "content": "B"}], {}),
    "image": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is it? "}]}],
              dict(add_generation_prompt=True)),
    "video": ([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}], {}),
    "no_user": ([{"role": "system", "content": "S"}], {}),
    "late_system": ([*ASK, {"role": "system", "content": "S"}], {}),
    "unknown_role": ([*ASK, {"role": "critic", "content": "S"}], {}),
}


def _hub_template() -> str:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))["chat_template"]


def _render_hf(template: str, messages, **kw) -> str:
    """transformers' own renderer (`apply_chat_template` without a tokenizer); errors as text, to compare."""
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        return render_jinja_template([messages], chat_template=template, **kw)[0][0]
    except Exception as exc:        # the hub template raises for bad conversations: ours must raise the same
        return f"{type(exc).__name__}: {exc}"


def test_our_template_renders_what_the_hub_template_renders():
    pytest.importorskip("transformers")
    from minicpmv_edge.export.synth_tokenizer import chat_template_text
    hub, ours = _hub_template(), chat_template_text("qwen35")
    for name, (messages, kw) in CONVERSATIONS.items():
        expected = _render_hf(hub, messages, **kw)
        assert _render_hf(ours, messages, **kw) == expected, name
    calls = _render_hf(hub, *CONVERSATIONS["calls"][:1], **CONVERSATIONS["calls"][1])
    assert ("<tool_call>\n<function=set_alarm>\n<parameter=hour>\n7\n</parameter>\n<parameter=loud>\nTrue\n"
            "</parameter>\n<parameter=days>\n[\"mon\", \"tue\"]\n</parameter>\n<parameter=note>\ntwo\nlines\n"
            "</parameter>\n") in calls                       # the shapes the parser below reads back
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n<b>&\n</tool_response>" \
        "<|im_end|>\n" in calls
    assert _render_hf(hub, *CONVERSATIONS["no_user"][:1]) == "TemplateError: No user query found in messages."
