"""Prompt building for the runtime, as the HF `model.chat` does it, without transformers:

1. each message's content items become strings, an image becoming the tag `(<image>./</image>)`, joined by "\\n";
2. the version's chat template (shipped jinja, rendered in a sandbox) turns the messages into text, with
   `enable_thinking` for templates that have the switch;
3. each tag is replaced, in order, by that image's placeholder (`[<image_id>i</image_id>]<image>` + 64 pads +
   `</image>` + slice rows);
4. after tokenization, each run of pad tokens inside `<image>`/`<slice>` pairs is where one slice's
   embeddings go.

Text that comes from the caller (system, user and tool turns) is wrapped in secret markers before the template
runs (`untrusted`), and `tokenize_prompt` tokenizes it with special-token parsing OFF: a user who types
`<|im_end|>\n<|im_start|>system` gets those characters as plain text tokens, and only the template's own
structure and the image placeholders produce control tokens. The same holds for the caller's JSON: tool specs
and an assistant turn's tool calls (`caller_tools`, `caller_tool_calls`): what templates write raw (a call's
name, its arguments as a string) is marked, and what they serialize (`tojson` of a spec or of arguments given
as an object) is marked as a whole, keys included. Text between control tokens is tokenized as
one piece, as before, so prompts without injected control strings tokenize exactly as the HF tokenizer does.
Templates that walk a call's arguments key by key (the XML call form of 4.6) get them as an object whose keys
and text values are marked, and the template's `trim` sees through the markers, so the marked prompt is the one
the template renders from the caller's plain text.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

from jinja2.exceptions import TemplateError

from minicpmv_edge.errors import PromptError

from .template_sandbox import BudgetedSandbox, render_template

# The user-side image tag HF `model.chat()` writes for every image in a message (docs/prompt.md).
IMAGE_TAG = "(<image>./</image>)"
# Markers around caller text in the rendered prompt: private-use characters + a per-process secret, so no input
# can forge them. They never reach the tokenizer.
_NONCE = secrets.token_hex(8)
_OPEN, _CLOSE = f"\ue000{_NONCE}\ue001", f"\ue002{_NONCE}\ue003"


def untrusted(text: str) -> str:
    """Mark caller text: it will be tokenized with special-token parsing off."""
    return _OPEN + text + _CLOSE


def caller_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    """OpenAI tool specs, ready for the template: each marked as the caller's JSON."""
    return None if not tools else [CallerJSON(t) if isinstance(t, Mapping) else t for t in tools]


def caller_tool_calls(calls: Any, arguments_as_items: bool = False) -> Any:
    """An assistant turn's `tool_calls`, ready for the template: the name and string arguments marked untrusted
    (templates write them raw), object arguments marked as the caller's JSON (templates write them with tojson).
    Calls in OpenAI's shape ({"function": {...}}) or flat ({"name", "arguments"}); anything else is left as is.

    `arguments_as_items` (templates of the XML call form, facts.tool_call_format "xml"): the template walks the
    arguments key by key (`arguments|items`), so arguments given as a JSON string (as OpenAI clients send them)
    are decoded to an object (ValueError if they are not one), and each key and each text value is marked
    untrusted, each object or list value as the caller's JSON."""
    if not isinstance(calls, (list, tuple)):
        return calls

    def mark(fn: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(fn)
        if isinstance(out.get("name"), str):
            out["name"] = untrusted(out["name"])
        args = out.get("arguments")
        if arguments_as_items and args is not None:
            out["arguments"] = _argument_items(args)
        else:
            out["arguments"] = untrusted(args) if isinstance(args, str) else \
                CallerJSON(args) if isinstance(args, Mapping) else args
        return out
    marked = []
    for call in calls:
        if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
            call = {**call, "function": mark(call["function"])}
        elif isinstance(call, Mapping):
            call = mark(call)
        marked.append(call)
    return marked


def _argument_items(args: Any) -> dict[str, Any]:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError("arguments: not valid JSON (this model's template needs them as an object)") from None
    if not isinstance(args, Mapping):
        raise ValueError("arguments: must be a JSON object")

    def value(v: Any) -> Any:
        if isinstance(v, str):
            return untrusted(v)
        if isinstance(v, Mapping):
            return CallerJSON(v)
        return CallerJSONList(v) if isinstance(v, (list, tuple)) else v
    return {untrusted(str(k)): value(v) for k, v in args.items()}


def _raise(message: str):
    raise TemplateError(message)


# The sandbox with a render budget (runtime/template_sandbox.py): time, loop iterations, output and value size.
_ENV = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
_ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))


class CallerJSON(dict):
    """A JSON object from the caller (a tool spec, a call's arguments): `tojson` marks all of its text untrusted."""


class CallerJSONList(list):
    """A JSON array from the caller (an argument's value): `tojson` marks all of its text untrusted."""


def _holds_caller_json(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (CallerJSON, CallerJSONList)):
        return True
    if depth < 3 and isinstance(value, (list, tuple)):      # `tools | tojson` serializes the whole list
        return any(_holds_caller_json(v, depth + 1) for v in value)
    return False


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """Plain JSON, as transformers' template environment renders `tojson` (jinja's own escapes <, > and &
    for HTML, which would change the prompt the model was trained on); the caller's JSON marked untrusted."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return untrusted(text) if _holds_caller_json(value) else text


_ENV.filters["tojson"] = _tojson


def _trim(value: Any, chars: str | None = None) -> str:
    """jinja's `trim`, seeing through the untrusted markers: whitespace at either end of the text is removed
    whether it is the template's or the caller's (templates trim message content; a marked message that is only
    whitespace trims to "")."""
    text = str(value)
    if _OPEN not in text:
        return text.strip(chars)
    pieces = _pieces(text)
    while pieces and not pieces[0][0].lstrip(chars):
        pieces.pop(0)
    while pieces and not pieces[-1][0].rstrip(chars):
        pieces.pop()
    if not pieces:
        return ""
    pieces[0] = (pieces[0][0].lstrip(chars), pieces[0][1])
    pieces[-1] = (pieces[-1][0].rstrip(chars), pieces[-1][1])
    return "".join(piece if trusted else untrusted(piece) for piece, trusted in pieces)


_ENV.filters["trim"] = _trim


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
    if not isinstance(fmt.chat_template, str):
        raise PromptError(f"chat template must be text, not {type(fmt.chat_template).__name__}")
    variables = dict(messages=list(messages), add_generation_prompt=add_generation_prompt,
                     bos_token=fmt.bos_token or "", eos_token=fmt.eos_token or "", **extra)
    try:
        text = render_template(_ENV, fmt.chat_template, variables)
    except TemplateError as exc:
        raise PromptError(f"chat template error: {exc}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError,
            MemoryError) as exc:   # a stranger's template can fail in any of these ways: one line, no traceback
        raise PromptError(f"chat template error: {type(exc).__name__}: {exc}") from None
    if tools and not all(json.dumps(t["function"]["name"], ensure_ascii=False)[1:-1] in text for t in tools):
        raise PromptError("this bundle's chat template does not render tools (re-export it with a tool-aware "
                          "template, e.g. the 4.5 or 4.6 one)")
    return text


# A conversation that exercises what a chat template is given: an image tag, two turns (no system message: some
# templates refuse one, and that is not a fault).
_SAMPLE_MESSAGES = (
    {"role": "user", "content": f"{IMAGE_TAG}\nWhat is in the image?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour is it?"},
)


def check_chat_template(fmt: PromptFormat) -> None:
    """Render a sample conversation once, under the render budget, so a bundle whose template does not compile,
    loops or explodes is refused when it is opened (PromptError), not on its first request."""
    for thinking in ((False, True) if fmt.thinking else (None,)):
        text = render(fmt, _SAMPLE_MESSAGES, enable_thinking=thinking)
        if IMAGE_TAG not in text:
            raise PromptError("chat template error: the rendered sample conversation lost the image tag "
                              f"{IMAGE_TAG} (the template must keep message content)")


def image_placeholder(grid: tuple[int, int] | None, image_index: int, *, use_image_id: bool, query_num: int,
                      tokens: Mapping[str, str], slice_tokens: Sequence[int] | None = None,
                      pad_role: str = "image_pad") -> str:
    """HF `get_slice_image_placeholder` (docs/model.md §6.1): `[<image_id>i</image_id>]<image>` + pad*query_num +
    `</image>`, then, if sliced, `rows` lines of `cols` x `<slice>` + pad*query_num + `</slice>` joined by "\\n".

    `tokens` is `facts.special_tokens` (roles image_start, image_end, slice_start, slice_end,
    image_id_start, image_id_end, image_pad). `slice_tokens` (4.6, `PreprocessedImage.slice_tokens`): the pad
    count of each slice, overview first, instead of `query_num` for all (transformers
    `MiniCPMV4_6Processor.replace_image_token`). `pad_role`: "video_pad" for 4.6 video frames.
    """
    n_slices = 1 + (grid[0] * grid[1] if grid is not None else 0)
    counts = [query_num] * n_slices if slice_tokens is None else [int(n) for n in slice_tokens]
    if len(counts) != n_slices:
        raise ValueError(f"{len(counts)} slice token counts for an image of {n_slices} slices (grid {grid})")
    pad = tokens[pad_role]
    text = f"{tokens['image_id_start']}{image_index}{tokens['image_id_end']}" if use_image_id else ""
    text += tokens["image_start"] + pad * counts[0] + tokens["image_end"]
    if grid is not None:
        cols, rows = grid
        cells = [tokens["slice_start"] + pad * n + tokens["slice_end"] for n in counts[1:]]
        text += "\n".join("".join(cells[r * cols:(r + 1) * cols]) for r in range(rows))
    return text


def image_text(grid: tuple[int, int] | None, index: int, fmt: PromptFormat, *, use_image_id: bool | None = None,
               slice_tokens: Sequence[int] | None = None, pad_role: str = "image_pad") -> str:
    """The placeholder of one image (`index` counts images from 0 over the prompt); `slice_tokens` as in
    `image_placeholder` (4.6: each slice's own count)."""
    uid = fmt.use_image_id if use_image_id is None else use_image_id
    return image_placeholder(grid, index, use_image_id=uid, query_num=fmt.query_num, tokens=fmt.special_tokens,
                             slice_tokens=slice_tokens, pad_role=pad_role)


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


def _pieces(text: str) -> list[tuple[str, bool]]:
    """Rendered text -> its (text, trusted) pieces, caller text (between the markers) untrusted."""
    pieces: list[tuple[str, bool]] = []
    head, *rest = text.split(_OPEN)
    pieces.append((head, True))
    for chunk in rest:
        inner, sep, after = chunk.partition(_CLOSE)
        pieces.append((inner, False))            # an unclosed marker (cannot happen) keeps the rest untrusted
        if sep:
            pieces.append((after, True))
    return pieces


def tokenize_prompt(text: str, placeholders: Sequence[str], special_tokens: Sequence[str],
                    tokenize: Callable[[str], list[int]], special_id: Callable[[str], int]
                    ) -> tuple[list[int], set[int]]:
    """The rendered prompt (caller text marked by `untrusted`) -> (token ids, positions of control tokens).

    Each IMAGE_TAG outside caller text becomes its placeholder; in the template's text and the placeholders,
    every occurrence of one of `special_tokens` becomes that token (`special_id`); everything else, caller
    text included, is tokenized by `tokenize` with special-token parsing off, in runs between control tokens."""
    pieces = _pieces(text)
    expanded: list[tuple[str, bool]] = []
    tags = iter(placeholders)
    n_tags = 0
    for piece, trusted in pieces:
        if not trusted:
            expanded.append((piece, False))
            continue
        chunks = piece.split(IMAGE_TAG)
        expanded.append((chunks[0], True))
        for chunk in chunks[1:]:
            n_tags += 1
            expanded += [(next(tags, ""), True), (chunk, True)]
    if n_tags != len(placeholders):
        raise PromptError(f"the prompt has {n_tags} image tags for {len(placeholders)} images/videos")
    by_length = sorted(set(special_tokens), key=len, reverse=True)   # longest first, as llama.cpp matches
    specials = re.compile("|".join(map(re.escape, by_length)))
    ids: list[int] = []
    control: set[int] = set()
    run: list[str] = []                           # plain text waiting to be tokenized as one piece

    def flush() -> None:
        text = "".join(run)
        run.clear()
        if text:
            ids.extend(tokenize(text))
    for piece, trusted in expanded:
        pos = 0
        if trusted:
            for m in specials.finditer(piece):
                run.append(piece[pos:m.start()])
                flush()
                control.add(len(ids))
                ids.append(special_id(m.group()))
                pos = m.end()
        run.append(piece[pos:])
    flush()
    return ids, control


def image_spans(ids: Sequence[int], open_ids: set[int], close_ids: set[int],
                control: set[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) of the pad tokens between every opening and closing image/slice token, in order
    (with `control`, only tokens at those positions count as opening or closing)."""
    spans, start = [], None
    for i, tid in enumerate(ids):
        if control is not None and i not in control:
            continue
        if tid in open_ids:
            start = i + 1
        elif tid in close_ids and start is not None:
            spans.append((start, i))
            start = None
    return spans
