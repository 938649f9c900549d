"""The chat template's sandbox: a bundle's jinja template is a stranger's program, so it renders under a budget.

jinja2's ImmutableSandboxedEnvironment already refuses attribute escapes and mutation. On top of it:

* time: a trace function on the rendering thread checks the clock every few hundred template lines, so a nested
  loop or a recursive macro stops after RENDER_SECONDS instead of hanging a request;
* iterations: `range()` is capped at MAX_RANGE and every item it yields counts against MAX_ITERATIONS per render,
  so `{% for i in range(99999) %}{% for j in range(99999) %}` fails in a fraction of a second;
* size: the rendered text is collected chunk by chunk (`generate`) and refused past MAX_CHARS, and the operations
  that build a big value from small ones (`*`, `**`, `%`, `+`, str.center/ljust/rjust/zfill/expandtabs/replace/
  join/format, the center/indent/format/join/replace filters) are refused when their result would pass MAX_CHARS,
  before it is allocated.

`render_template` is the one entry point; every failure is a TemplateBudgetError or jinja2's own TemplateError,
and any other exception a template raises is turned into a TemplateError by the caller (runtime/prompt.py).
"""
from __future__ import annotations

import re
import sys
import threading
import time
from typing import Any, Mapping

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_SECONDS = 2.0        # a real chat template renders in well under a millisecond
MAX_CHARS = 1 << 20         # rendered prompt and any value built while rendering (a 40k-token context is ~200k)
MAX_TEMPLATE_CHARS = 256 * 1024
MAX_RANGE = 10_000
MAX_ITERATIONS = 100_000
MAX_INT_BITS = 4096
_BIG_NUMBER = re.compile(r"\d{7,}")   # a width or precision in a format string that would pass MAX_CHARS


class TemplateBudgetError(TemplateError):
    """The template went past its time, iteration or size budget."""


class _Budget:
    """Per-render counters and the trace function that enforces the time budget."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.iterations = 0
        self.lines = 0

    def trace(self, frame, event, arg):
        return self.trace_line

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"rendering took more than {self.seconds:g} s (a loop that does not end?)")

    def trace_line(self, frame, event, arg):
        self.lines += 1
        if self.lines & 255 == 0:
            self.check_time()
        return self.trace_line


_ACTIVE: dict[int, _Budget] = {}   # thread id -> the budget of the render running on it


def _budget() -> _Budget | None:
    return _ACTIVE.get(threading.get_ident())


def _too_big(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise TemplateBudgetError(f"{what} would make a value of {size} items, more than the {MAX_CHARS} "
                                  f"a chat template may build")


def _sized(x: Any) -> bool:
    return isinstance(x, (str, list, tuple))


def _check_format_string(text: str) -> None:
    if _BIG_NUMBER.search(text):
        raise TemplateBudgetError("a format width or precision of 7 or more digits")


def _counted_range(*args: int):
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateBudgetError(f"range of {len(rng)} items, more than the {MAX_RANGE} a chat template may use")
    budget = _budget()
    for i in rng:
        if budget is not None:
            budget.iterations += 1
            if budget.iterations > MAX_ITERATIONS:
                raise TemplateBudgetError(f"more than {MAX_ITERATIONS} loop iterations")
            if budget.iterations & 1023 == 0:
                budget.check_time()
        yield i


def _check_str_method(obj: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Predict the size of what an expanding str method returns."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    values = list(args) + list(kwargs.values())
    if name in ("center", "ljust", "rjust", "zfill") and values and isinstance(values[0], int):
        _too_big(values[0], f"str.{name}")
    elif name == "expandtabs":
        tab = values[0] if values and isinstance(values[0], int) else 8
        _too_big(len(owner) + owner.count("\t") * max(tab, 0), "str.expandtabs")
    elif name == "replace" and len(values) >= 2 and isinstance(values[0], str) and isinstance(values[1], str):
        hits = len(owner) + 1 if values[0] == "" else owner.count(values[0])
        _too_big(len(owner) + hits * len(values[1]), "str.replace")
    elif name == "join" and values:
        items = list(values[0]) if isinstance(values[0], (list, tuple, str)) else []
        _too_big(sum(len(i) for i in items if isinstance(i, str)) + len(owner) * len(items), "str.join")


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose value-building operations are size-checked before they run."""
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.globals["range"] = _counted_range
        self.globals.pop("lipsum", None)    # lipsum(n) builds n paragraphs: no template needs it
        for name in ("center", "indent", "format", "join", "replace"):
            self.filters[name] = _checked_filter(name, self.filters[name])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            if _sized(left) and isinstance(right, int):
                _too_big(len(left) * right, "'*'")
            elif _sized(right) and isinstance(left, int):
                _too_big(len(right) * left, "'*'")
            elif isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateBudgetError(f"a product of more than {MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * max(abs(left).bit_length(), 1) > MAX_INT_BITS:
            raise TemplateBudgetError(f"a power of more than {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
            for value in right if isinstance(right, tuple) else (right,):
                if isinstance(value, int) and abs(value) > MAX_CHARS:
                    raise TemplateBudgetError(f"'%' with a width of {value}")
        elif operator == "+" and _sized(left) and _sized(right):
            _too_big(len(left) + len(right), "'+'")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's own convention)
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
                raise TemplateBudgetError(f"a call with the number {value}, more than {MAX_CHARS}")
        _check_str_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any):
        # jinja calls this for every call; only str.format / str.format_map take a width from the string
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format_string(owner)
        return super().wrap_str_format(value)


def _checked_filter(name: str, fn):
    """A filter that builds text, refused when its result would pass MAX_CHARS."""
    def center(value, width=80):
        _too_big(max(len(str(value)), int(width)), "center")
        return fn(value, width)

    def indent(value, width=4, *args, **kwargs):
        pad = len(width) if isinstance(width, str) else int(width)
        _too_big(len(str(value)) * (1 + pad), "indent")
        return fn(value, width, *args, **kwargs)

    def format_(value, *args, **kwargs):
        _check_format_string(str(value))
        return fn(value, *args, **kwargs)

    def join(eval_ctx, value, d="", attribute=None):
        items = list(value)
        _too_big(sum(len(str(i)) for i in items) + len(str(d)) * len(items), "join")
        return fn(eval_ctx, items, d, attribute)

    def replace(eval_ctx, s, old, new, count=None):
        text, old, new = str(s), str(old), str(new)
        hits = len(text) + 1 if old == "" else text.count(old)
        _too_big(len(text) + hits * len(new), "replace")
        return fn(eval_ctx, s, old, new, count)

    wrapped = {"center": center, "indent": indent, "format": format_, "join": join, "replace": replace}[name]
    # keep jinja's pass_eval_context marking, which decides what the compiled template passes first
    for attr in ("jinja_pass_arg",):
        if hasattr(fn, attr):
            setattr(wrapped, attr, getattr(fn, attr))
    return wrapped


def render_template(env: BudgetedSandbox, source: str, variables: Mapping[str, Any], *,
                    seconds: float = RENDER_SECONDS) -> str:
    """Compile and render `source` with every budget above; raises TemplateError (or a subclass)."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateBudgetError(f"the template has {len(source)} characters, more than {MAX_TEMPLATE_CHARS}")
    template = env.from_string(source)
    budget = _Budget(seconds)
    me = threading.get_ident()
    previous_trace = sys.gettrace()
    _ACTIVE[me] = budget
    sys.settrace(budget.trace)
    try:
        out, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_CHARS:
                raise TemplateBudgetError(f"the rendered prompt passed {MAX_CHARS} characters")
            out.append(chunk)
            budget.check_time()
        return "".join(out)
    finally:
        sys.settrace(previous_trace)
        _ACTIVE.pop(me, None)


__all__ = ["BudgetedSandbox", "TemplateBudgetError", "render_template", "RENDER_SECONDS", "MAX_CHARS",
           "MAX_RANGE", "MAX_ITERATIONS", "MAX_TEMPLATE_CHARS"]
