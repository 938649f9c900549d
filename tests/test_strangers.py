"""Checkpoints and weight files from strangers (issue 16): a crafted corpus, each case a one-line error.

The corpus (tests/crafted.py) is generated from classes of fault; it runs in one worker subprocess, every case
through the CLI entry point (`inspect`, `export`) or the ctypes binding, each under a timeout. For every case:
exit code 1, exactly one error line naming the file and a field, no traceback, no hang; and the worker's peak RSS
stays bounded (a config asking for 10^9 layers used > 4 GB before the checks).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from crafted import CASE_TIMEOUT_S, OUTSIDE, checkpoint_corpus, run_corpus, weights_corpus
from minicpmv_edge.errors import CheckpointError, UntrustedFileError
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.untrusted import inside, json_depth, parse_json, read_json

# The worker imports the export stack (numpy, gguf, llama-cpp for the export cases) and reads tiny checkpoints;
# ~100 MB is what it needs. A case that sizes anything from an unchecked number goes far past this.
PEAK_RSS_MB = 512


def _one_line_error(rec: dict, prefix: str) -> str:
    lines = [ln for ln in rec["stderr"].replace("\r", "\n").splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"{rec['name']}: expected one '{prefix}' line, got {rec['stderr'][-1000:]!r}"
    return lines[0]


def _assert_names(case, message: str) -> None:
    assert case.file in message, f"{case.name}: the error does not name {case.file}: {message}"
    assert any(f in message for f in case.fields), f"{case.name}: the error names none of {case.fields}: {message}"
    assert "root:x" not in message, f"{case.name}: the error leaks file bytes: {message}"


@pytest.fixture(scope="module")
def tiny_mvr(tiny_checkpoint, tmp_path_factory) -> Path:
    from minicpmv_edge.export.resampler_weights import write_resampler_weights
    out = tmp_path_factory.mktemp("mvr")
    return write_resampler_weights(Checkpoint.open(tiny_checkpoint("4.5")), out / "tiny.mvr", "f32")


@pytest.fixture(scope="module")
def corpus(tiny_checkpoint, tiny_mvr, tmp_path_factory):
    out = tmp_path_factory.mktemp("crafted")
    cases = checkpoint_corpus(tiny_checkpoint("4.5"), out) + weights_corpus(tiny_mvr, out)
    results, peak = run_corpus(cases, out)
    return cases, {r["name"]: r for r in results}, peak


def test_crafted_corpus_sizes(corpus):
    cases, _, _ = corpus
    kinds = [c.kind for c in cases]
    n_ckpt, n_mvr = kinds.count("inspect") + kinds.count("export"), kinds.count("mvr")
    print(f"\ncrafted corpus: {n_ckpt} checkpoints ({kinds.count('export')} through export), {n_mvr} .mvr files")
    assert n_ckpt >= 100 and n_mvr >= 100


def test_crafted_checkpoints_one_line_errors(corpus):
    cases, results, peak = corpus
    slowest = 0.0
    for case in (c for c in cases if c.kind in ("inspect", "export")):
        rec = results[case.name]
        assert rec["traceback"] is None, f"{case.name}: {rec['traceback']}"
        assert rec["rc"] == 1, f"{case.name}: exit {rec['rc']}, stderr {rec['stderr'][-500:]!r}"
        assert "Traceback" not in rec["stderr"], f"{case.name}: {rec['stderr'][-2000:]}"
        line = _one_line_error(rec, f"minicpmv-edge {case.kind}: error: ")
        _assert_names(case, line)
        if case.kind == "export":
            # streaming: files of earlier stages may be complete, but no manifest declares the bundle done and
            # no file is left half written; the file being written when the NaN came is not there at all
            outputs = rec["outputs"]
            assert "manifest.json" not in outputs and not [n for n in outputs if ".partial" in n], outputs
            if "llm." in case.fields[0]:
                assert not [n for n in outputs if n.endswith(".gguf")], outputs
        slowest = max(slowest, rec["seconds"])
    # a case past CASE_TIMEOUT_S is stopped by the worker's alarm and fails above as a traceback (_Timeout)
    print(f"\ncheckpoints: slowest case {slowest:.2f} s (timeout {CASE_TIMEOUT_S} s); worker peak RSS {peak:.0f} MiB")
    assert peak < PEAK_RSS_MB


def test_crafted_weight_files_refused_by_both_parsers(corpus):
    cases, results, _ = corpus
    for case in (c for c in cases if c.kind == "mvr"):
        rec = results[case.name]
        assert rec["traceback"] is None, f"{case.name}: {rec['traceback']}"
        assert rec["rc"] == 1, f"{case.name}: the native library loaded it"
        assert "\n" not in rec["stderr"]
        _assert_names(case, rec["stderr"])
        assert rec["numpy"] is not None, f"{case.name}: the numpy backend loaded it"


def test_issue_cases_name_the_field(corpus):
    """The issue's findings, one by one, with the message each now gets."""
    _, results, _ = corpus
    for name, words in {"issue-num_hidden_layers-1e9": "num_hidden_layers", "issue-rope_theta-nan": "rope_theta",
                        "issue-rms_norm_eps-inf": "rms_norm_eps", "issue-rms_norm_eps-minus-1": "rms_norm_eps",
                        "issue-max_slice_nums-minus-3": "max_slice_nums", "fifo-model.safetensors": "not a regular",
                        "path-weight_map-dotdot": "not a .safetensors file name in the checkpoint folder",
                        "path-weight_map-symlink-out": "points outside the folder", "safetensors-header-list": "JSON object",
                        "safetensors-offsets-float": "data_offsets", "safetensors-overlap": "overlaps",
                        "json-config.json-deep": "nested", "json-config.json-bigint": "digits",
                        "export-nan-llm.model.embed_tokens.weight": "NaN"}.items():
        assert words in results[name]["stderr"], (name, results[name]["stderr"])
    print("\n" + "\n".join(results[n]["stderr"].strip().splitlines()[-1] for n in
                           ("issue-num_hidden_layers-1e9", "path-weight_map-dotdot", "fifo-model.safetensors",
                            "export-nan-llm.model.embed_tokens.weight")))


# ---------------------------------------------------------------------------------------------
# The rules themselves, directly


def test_inside_refuses_escapes_and_allows_the_hf_cache(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "a.safetensors").write_bytes(b"x")
    assert inside(root, "a.safetensors") == root / "a.safetensors"
    for bad in ("../x", "/etc/passwd", "", "a\0b"):
        with pytest.raises(UntrustedFileError):
            inside(root, bad)
    os.symlink(OUTSIDE, root / "out.safetensors")
    with pytest.raises(UntrustedFileError, match="outside"):
        inside(root, "out.safetensors")
    # the Hugging Face cache: snapshots/<rev>/file -> ../../blobs/<hash> is the one way out that is allowed
    snap = tmp_path / "models--x" / "snapshots" / "abc"
    blobs = tmp_path / "models--x" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "123").write_bytes(b"{}")
    os.symlink("../../blobs/123", snap / "config.json")
    assert read_json(inside(snap, "config.json")) == {}


def test_json_bounds():
    assert json_depth(b'{"a": "[[[[", "b": [[1], {"c": 2}]}') == 3   # brackets inside strings do not count
    with pytest.raises(UntrustedFileError, match="nested 100000 deep"):
        parse_json(b"[" * 100_000 + b"]" * 100_000, Path("x.json"))
    with pytest.raises(UntrustedFileError, match="5000 digits"):
        parse_json(b'{"a": ' + b"1" * 5000 + b"}", Path("x.json"))
    assert parse_json(b'{"a": 18446744073709551615, "b": NaN}', Path("x.json"))["a"] == 2 ** 64 - 1


def test_nan_weights_refused_with_the_tensor_name(tiny_checkpoint, tmp_path):
    """At the streaming read every exporter uses (Checkpoint.tensor -> load_tensor), chunk by chunk."""
    from minicpmv_edge.export import safetensors_io as st
    src = tiny_checkpoint("4.5")
    ckpt = Checkpoint.open(src)
    info = ckpt.tensors["llm.model.layers.0.mlp.up_proj.weight"]
    raw = bytearray((src / "model.safetensors").read_bytes())
    at = info.offset + info.nbytes - 2           # the very last element: the chunked scan must reach it
    raw[at:at + 2] = b"\x80\x7f"                 # bf16 +inf
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    bad = st.TensorInfo(info.name, tmp_path / "model.safetensors", info.dtype, info.shape, info.offset, info.nbytes)
    old_chunk = st._FINITE_CHUNK
    st._FINITE_CHUNK = 1000                      # several chunks even for a tiny tensor
    try:
        with pytest.raises(st.NonFiniteTensorError, match="up_proj.weight.*flat index") as exc:
            st.load_tensor(bad)
        assert exc.value.field == f"tensor {info.name!r}"
        assert np.isfinite(st.load_tensor(info)).all()
    finally:
        st._FINITE_CHUNK = old_chunk


def test_config_bounds_come_from_the_facts():
    from minicpmv_edge.export.checkpoint_checks import LLM_BOUNDS, PREPROCESS_BOUNDS, VISION_BOUNDS
    from minicpmv_edge.facts import MODEL_FACTS, facts_for
    from minicpmv_edge import _native
    # every real model's dimensions fit; the resampler's width and input fit what libmve loads
    for f in MODEL_FACTS.values():
        if f.llm_dims:
            for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "head_dim"):
                assert getattr(f.llm_dims, key) <= LLM_BOUNDS[key].top(f)
        assert f.max_slice_nums <= PREPROCESS_BOUNDS["max_slice_nums"].top(f)
    assert LLM_BOUNDS["hidden_size"].top(None) == _native.MVE_MAX_EMBED_DIM
    assert VISION_BOUNDS["hidden_size"].top(None) <= _native.MVE_MAX_KV_DIM
    assert LLM_BOUNDS["query_num"].top(facts_for("4.5")) == _native.MVE_MAX_QUERY_NUM
    assert not math.isinf(LLM_BOUNDS["rope_theta"].top(None))


def test_native_limits_mirror_the_header():
    import re
    from minicpmv_edge import _native
    header = (Path(__file__).resolve().parents[1] / "bindings/include/mve.h").read_text()
    limits = dict(re.findall(r"#define (MVE_MAX_\w+) (\d+)", header))
    assert {k: int(v) for k, v in limits.items()} == {k: getattr(_native, k) for k in limits}
    assert len(limits) >= 8


# ---------------------------------------------------------------------------------------------
# The chat template's render budget (runtime/template_sandbox.py through runtime/prompt.py)

HOSTILE_TEMPLATES = {
    "nested range(99999)": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                            "range of 99999 items"),
    # stopped by the iteration count, or by the clock first on a loaded machine: either is the budget
    "nested range(9999)": ("{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}",
                           ("loop iterations", "rendering took more than")),
    "string times 10^8": ("{{ 'x' * 100000000 }}", "would make a value"),
    "list times 10^8": ("{{ (range(10)|list) * 100000000 }}", "would make a value"),
    "huge power": ("{{ 2 ** 100000000 }}", "bits"),
    "ljust 10^9": ("{{ 'a'.ljust(999999999) }}", "a call with the number"),
    "center filter 10^9": ("{{ 'a'|center(999999999) }}", "would make a value"),
    "percent width": ("{{ '%999999999d' % 1 }}", "format width"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "format width"),
    "replace blow-up": ("{% set s = 'x' * 900000 %}{{ s|replace('', s) }}", "would make a value"),
    "join blow-up": ("{% set s = 'x' * 900000 %}{{ range(1000)|join(s) }}", "would make a value"),
    "output 10 MB": ("{% for i in range(10000) %}{{ 'y' * 1000 }}{% endfor %}", "rendered prompt passed"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "attribute escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "syntax error": ("{% for %}", "chat template error"),
    "not text": (None, "must be text"),
}


def _fmt(template):
    from minicpmv_edge.facts import facts_for
    from minicpmv_edge.runtime.prompt import PromptFormat
    f = facts_for("4.5")
    return PromptFormat(chat_template=template, special_tokens=f.special_tokens, use_image_id=True, query_num=64,
                        thinking=False)


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_chat_template_refused_in_one_line(name):
    from minicpmv_edge.runtime.prompt import PromptError, check_chat_template
    template, words = HOSTILE_TEMPLATES[name]
    with pytest.raises(PromptError) as exc:
        check_chat_template(_fmt(template))
    message = str(exc.value)
    print(f"\n{name}: {message[:160]}")
    assert any(w in message for w in ((words,) if isinstance(words, str) else words)), message
    assert "\n" not in message.strip()


def test_render_time_budget_stops_loops_range_does_not_count():
    """A triple loop over a list the caller passes (so no range() to count): only the clock can stop it."""
    from minicpmv_edge.runtime.template_sandbox import BudgetedSandbox, TemplateBudgetError, render_template
    env = BudgetedSandbox()
    src = "{% for a in x %}{% for b in x %}{% for c in x %}{% endfor %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateBudgetError, match=r"rendering took more than 0.3 s"):
        render_template(env, src, {"x": list(range(1000))}, seconds=0.3)   # 10^9 iterations: never finishes
    before = sys.gettrace()
    assert render_template(env, src, {"x": [1, 2]}, seconds=0.3) == ""   # the same loop, small, renders
    assert sys.gettrace() is before                                       # the caller's trace function is back


@pytest.mark.parametrize("version", ["2.6", "4.0", "4.5", "4.6"])
def test_shipped_chat_templates_pass_the_open_check(version):
    """The templates the exporter ships render the sample conversation within the budget, unchanged."""
    from minicpmv_edge.facts import facts_for
    from minicpmv_edge.runtime.prompt import IMAGE_TAG, PromptFormat, check_chat_template, render
    f = facts_for(version)
    source = (Path(__file__).resolve().parents[1] / "export" / "templates" / f"{f.chat_template}.jinja").read_text()
    fmt = PromptFormat(chat_template=source, special_tokens=f.special_tokens, use_image_id=f.use_image_id,
                       query_num=f.query_num, thinking=f.thinking)
    check_chat_template(fmt)
    text = render(fmt, [{"role": "user", "content": f"{IMAGE_TAG}\nhi"}], enable_thinking=False if f.thinking else None)
    assert "<|im_start|>user\n" + IMAGE_TAG in text


@pytest.mark.parametrize("version", ["2.6", "4.0", "4.5", "4.6"])
def test_long_numbers_in_messages_are_text_not_format_widths(version):
    """A user's phone number (or a model's digits, fed back in a later turn) is content: the format-width guard
    applies to str.format and '%' only, never to the other str methods a template calls on content."""
    from minicpmv_edge.facts import facts_for
    from minicpmv_edge.runtime.prompt import PromptFormat, render
    f = facts_for(version)
    source = (Path(__file__).resolve().parents[1] / "export" / "templates" / f"{f.chat_template}.jinja").read_text()
    fmt = PromptFormat(chat_template=source, special_tokens=f.special_tokens, use_image_id=f.use_image_id,
                       query_num=f.query_num, thinking=f.thinking)
    digits = "call me at 004915112345678, order 12345678901234567890"
    messages = [{"role": "system", "content": digits}, {"role": "user", "content": digits},
                {"role": "assistant", "content": digits}, {"role": "user", "content": "and " + digits}]
    text = render(fmt, messages, enable_thinking=False if f.thinking else None)
    assert text.count("12345678901234567890") == 4
