"""The model-facts table: lookups, and the rule that no other code branches on a version string."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from minicpmv_edge.facts import MODEL_FACTS, SUPPORTED_VERSIONS, UnknownVersionError, facts_for, normalize_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw, expected", [(2.6, "2.6"), ("4.5", "4.5"), (4, "4.0"), ("4.50", "4.5"), (4.0, "4.0")])
def test_normalize_version(raw, expected):
    assert normalize_version(raw) == expected


@pytest.mark.parametrize("raw", [None, True, "v4", "", 3.0])
def test_unknown_versions_are_refused_with_the_known_list(raw):
    with pytest.raises(UnknownVersionError, match="version|not a MiniCPM-V"):
        facts_for(raw)


def test_46_is_supported_end_to_end():
    assert "4.6" in SUPPORTED_VERSIONS and facts_for("4.6").mmproj_projector_type == "minicpmv4_6"


def test_a_listed_but_unsupported_slot_is_refused(monkeypatch):
    """What the 4.6 slot was refused with before it was supported: a version in the table with supported=False."""
    import dataclasses

    from minicpmv_edge import facts as F
    slot = dataclasses.replace(MODEL_FACTS["4.6"], version="9.9", supported=False, checkpoint_supported=False)
    monkeypatch.setattr(F, "MODEL_FACTS", {**MODEL_FACTS, "9.9": slot})
    with pytest.raises(UnknownVersionError, match="not supported yet"):
        facts_for("9.9")
    assert facts_for("9.9", allow_unsupported=True).mmproj_projector_type == "minicpmv4_6"


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_each_version_is_complete(version):
    f = facts_for(version)
    tokens = f.all_special_tokens()
    assert len(tokens) == len(set(tokens))
    assert set(f.special_tokens.values()) <= set(tokens)
    assert set(f.stop_tokens) <= set(tokens)
    # a llama.cpp projector: the resampler one with its minicpmv_version, or the version's own (4.6: minicpmv4_6)
    assert (f.mmproj_version is not None) == (f.mmproj_projector_type == "resampler") and f.llm_dims is not None
    assert (ROOT / "export" / "templates" / f"{f.chat_template}.jinja").is_file()
    assert f.thinking == ("think_start" in f.special_tokens)


def test_no_code_branches_on_a_version_string():
    """Only facts.py may compare against a version literal such as "4.5"; everything else reads a field."""
    pattern = re.compile(r"""(==|!=|\bin\b)\s*[\(\[{]?\s*["'](2\.6|4\.0|4\.5|4\.6)["']|["'](2\.6|4\.0|4\.5|4\.6)["']\s*(==|!=)""")
    offenders = []
    for folder in ("minicpmv_edge", "export", "quantize", "runtime", "bindings"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "facts.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
