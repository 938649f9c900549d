"""Prompt building for the runtime, as the HF `model.chat` does it, without transformers:

1. each message's content items become strings, an image becoming the tag `(<image>./</image>)`, joined by "\\n";
2. the version's chat template (shipped jinja, rendered in a sandbox) turns the messages into text, with
   `enable_thinking` for templates that have the switch;
3. each tag is replaced, in order, by that image's placeholder (`[<image_id>i</image_id>]<image>` + 64 pads +
   `</image>` + slice rows);
4. after tokenization, each run of pad tokens inside `<image>`/`<slice>` pairs is where one slice's
   embeddings go.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minicpmv_edge.errors import MiniCPMVEdgeError

from .preprocess import image_placeholder

IMAGE_TAG = "(<image>./</image>)"


class PromptError(MiniCPMVEdgeError):
    pass


def _raise(message: str):
    raise TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """Plain JSON, as transformers' template environment renders `tojson` (jinja's own escapes <, > and &
    for HTML, which would change the prompt the model was trained on)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
_ENV.filters["tojson"] = _tojson


@dataclass(frozen=True)
class PromptFormat:
    """What the bundle says about prompts (see facts.py for where each value comes from)."""
    chat_template: str
    special_tokens: Mapping[str, str]     # roles -> strings (image_start, slice_start, image_pad, ...)
    use_image_id: bool
    query_num: int
    thinking: bool
    default_system_prompt: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


def render(fmt: PromptFormat, messages: Sequence[Mapping[str, Any]], *, enable_thinking: bool | None = None,
           add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Messages whose content is already text (images as IMAGE_TAG) -> the templated prompt text.
    `tools` (OpenAI function specs) are passed as the template's `tools`; a template that does not show them
    to the model is an error, never a silent drop."""
    extra: dict[str, Any] = {}
    if fmt.thinking:
        extra["enable_thinking"] = bool(enable_thinking)
    elif enable_thinking:
        raise PromptError("this model's chat template has no thinking mode")
    if tools:
        extra["tools"] = list(tools)
    try:
        template = _ENV.from_string(fmt.chat_template)
        text = template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=fmt.bos_token or "", eos_token=fmt.eos_token or "", **extra)
    except TemplateError as exc:
        raise PromptError(f"chat template error: {exc}") from None
    if tools and not all(json.dumps(t["function"]["name"], ensure_ascii=False)[1:-1] in text for t in tools):
        raise PromptError("this bundle's chat template does not render tools (re-export it with a tool-aware "
                          "template, e.g. the 4.5 one)")
    return text


def image_text(grid: tuple[int, int] | None, index: int, fmt: PromptFormat, *, use_image_id: bool | None = None) -> str:
    """The placeholder of one image (`index` counts images from 0 over the prompt)."""
    uid = fmt.use_image_id if use_image_id is None else use_image_id
    return image_placeholder(grid, index, use_image_id=uid, query_num=fmt.query_num, tokens=fmt.special_tokens)


def video_text(n_blocks: int, fmt: PromptFormat) -> str:
    """A video's placeholder: one un-numbered, unsliced image placeholder per 64-token block, joined by "\n"
    (the HF processor keeps only the first frame of each packed group and strips the separators of the others)."""
    return "\n".join(image_text(None, 0, fmt, use_image_id=False) for _ in range(n_blocks))


def expand_tags(text: str, placeholders: Sequence[str]) -> str:
    """Replace each IMAGE_TAG, in order, by the placeholder of that image or video."""
    chunks = text.split(IMAGE_TAG)
    if len(chunks) - 1 != len(placeholders):
        raise PromptError(f"the prompt has {len(chunks) - 1} image tags for {len(placeholders)} images/videos")
    out = [chunks[0]]
    for ph, chunk in zip(placeholders, chunks[1:]):
        out += [ph, chunk]
    return "".join(out)


def image_spans(ids: Sequence[int], open_ids: set[int], close_ids: set[int]) -> list[tuple[int, int]]:
    """[start, end) of the pad tokens between every opening and closing image/slice token, in order."""
    spans, start = [], None
    for i, tid in enumerate(ids):
        if tid in open_ids:
            start = i + 1
        elif tid in close_ids and start is not None:
            spans.append((start, i))
            start = None
    return spans
