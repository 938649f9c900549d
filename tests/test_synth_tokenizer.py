"""Synthetic tokenizers: special tokens, round trips, transformers parity, chat templates, determinism."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

from minicpmv_edge.export.synth_text import corpus_lines  # noqa: E402
from minicpmv_edge.export.synth_tokenizer import SPM_SPACE, chat_template_text, write_tokenizer  # noqa: E402
from minicpmv_edge.facts import RESAMPLER_VERSIONS, facts_for  # noqa: E402

TEST_SEED = 20240917  # not the training seed (0)


@pytest.fixture(scope="module", params=RESAMPLER_VERSIONS)
def synth(request, tmp_path_factory):
    """(facts, out_dir, returned token count) for one version, written once per module."""
    facts = facts_for(request.param)
    out = tmp_path_factory.mktemp(f"tok{request.param}")
    start = time.perf_counter()
    n = write_tokenizer(facts, out)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"write_tokenizer took {elapsed:.2f}s"
    return facts, out, n


def _load(out: Path) -> Tokenizer:
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def _auto(out: Path):
    return transformers.AutoTokenizer.from_pretrained(out)


def test_files_and_count(synth):
    facts, out, n = synth
    tok = _load(out)
    assert n == tok.get_vocab_size(with_added_tokens=True)
    assert n == max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids are dense
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    if facts.tokenizer_kind == "byte_bpe":
        expected |= {"vocab.json", "merges.txt"}
    assert {p.name for p in out.iterdir()} == expected

    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == facts.stop_tokens[0]
    assert config["bos_token"] == facts.bos_token
    assert config["unk_token"] == "<unk>"
    assert config["chat_template"] == chat_template_text(facts.chat_template)
    assert config["clean_up_tokenization_spaces"] is False
    if facts.tokenizer_kind == "byte_bpe":
        assert config["tokenizer_class"] == "Qwen2Tokenizer"
        assert config["pad_token"] == "<|endoftext|>" and config["errors"] == "replace"
        merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
        assert merges[0] == "#version: 0.2"
        model = json.loads(tok.to_str())["model"]
        assert len(merges) - 1 == len(model["merges"])
        assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == model["vocab"]
    else:
        assert config["pad_token"] == "</s>"
        assert config["add_bos_token"] is True and config["add_eos_token"] is False


def test_special_tokens(synth):
    facts, out, _ = synth
    tok = _load(out)
    decoder = tok.get_added_tokens_decoder()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = facts.all_special_tokens()
    for t in specials:
        tid = tok.token_to_id(t)
        assert tid is not None, t
        assert tok.encode(t, add_special_tokens=False).ids == [tid], t
        assert tok.decode([tid], skip_special_tokens=False) == t
        assert decoder[tid].special and not decoder[tid].normalized, t
        assert config["added_tokens_decoder"][str(tid)] == {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
    # Inside text, each special token still comes out as its one id.
    text = "a" + "b ".join(specials) + "\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert all(tok.token_to_id(t) in ids for t in specials)
    if facts.tokenizer_kind == "spm_bpe":
        assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
        assert [tok.id_to_token(i) for i in range(3, 3 + 256)] == [f"<0x{b:02X}>" for b in range(256)]
        assert tok.encode("hi").ids[0] == 1  # <s> prepended like Llama
        assert tok.token_to_id("\n") is not None  # MiniCPM-V looks up the "\n" piece
    else:
        # Special tokens sit after the BPE vocabulary, in the facts' order, like the hub's added tokens.
        first = min(tok.token_to_id(t) for t in specials)
        assert [tok.token_to_id(t) for t in specials] == list(range(first, first + len(specials)))
        assert tok.encode("hi").ids == tok.encode("hi", add_special_tokens=False).ids  # Qwen adds no BOS


def test_round_trip(synth):
    facts, out, _ = synth
    tok = _load(out)
    lines = corpus_lines(200, TEST_SEED)
    encodings = tok.encode_batch(lines)
    decoded = tok.decode_batch([e.ids for e in encodings])
    if facts.tokenizer_kind == "byte_bpe":
        assert decoded == lines  # the corpus is NFC, so byte-level BPE is lossless
    else:
        # spm_bpe is lossless except that a literal "▁" in the input reads back as a space.
        assert decoded == [line.replace(SPM_SPACE, " ") for line in lines]
        assert tok.token_to_id("<unk>") not in {i for e in encodings for i in e.ids}  # bytes cover all
        assert any(t.startswith("<0x") for e in encodings for t in e.tokens)  # byte fallback is exercised


def _messages():
    return [{"role": "user", "content": "Describe <image>./</image> please"}]


@pytest.mark.parametrize("with_config", [False, True], ids=["bare", "checkpoint"])
def test_autotokenizer_matches(synth, with_config, tmp_path):
    """transformers gives the same ids as tokenizers, both from a bare tokenizer folder and from a
    checkpoint folder whose config.json says model_type "minicpmv" (transformers treats that type specially)."""
    facts, out, _ = synth
    folder = out
    if with_config:
        folder = tmp_path / "ckpt"
        folder.mkdir()
        for p in out.iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "minicpmv", "version": float(facts.version), "architectures": ["MiniCPMV"]}))
    tok = _load(out)
    hf = _auto(folder)
    lines = corpus_lines(200, TEST_SEED)
    prompt = hf.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    for text in lines + [prompt, " leading space", "a<|im_start|> b", "x  <image> \n</image>\t y"]:
        assert hf(text)["input_ids"] == tok.encode(text).ids, repr(text)
    assert len(hf) == tok.get_vocab_size(with_added_tokens=True)
    assert hf.eos_token == facts.stop_tokens[0]
    assert hf.bos_token == facts.bos_token
    assert hf.unk_token == "<unk>"
    assert set(facts.all_special_tokens()) <= set(hf.all_special_tokens) | {hf.unk_token}
    decoded = hf.decode(tok.encode(prompt).ids, skip_special_tokens=False)
    if facts.tokenizer_kind == "byte_bpe":
        assert decoded == prompt
    else:
        # Legacy sentencepiece (and llama.cpp's SPM): every text run, also one after a special token,
        # gets the "▁" prefix, which decodes as a space; plus the <s> the tokenizer adds.
        special = "|".join(re.escape(t) for t in facts.all_special_tokens())
        assert decoded == "<s>" + re.sub(f"({special})(?!$|{special})", r"\1 ", prompt)


def _render(out: Path, messages, **kwargs) -> str:
    return _auto(out).apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template(synth):
    facts, out, _ = synth
    user = [{"role": "user", "content": "Hi"}]
    body = "<|im_start|>user\nHi<|im_end|>\n"
    gen = "<|im_start|>assistant\n"
    system = [{"role": "system", "content": "Be brief."}]
    sys_turn = "<|im_start|>system\nBe brief.<|im_end|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "image"},
                                          {"type": "text", "text": "two"}]}]

    if facts.chat_template == "qwen2":
        default = f"<|im_start|>system\n{facts.default_system_prompt}<|im_end|>\n"
        assert _render(out, user, add_generation_prompt=True) == default + body + gen
        assert _render(out, user) == default + body
        assert _render(out, system + user, add_generation_prompt=True) == sys_turn + body + gen
        assert _render(out, parts) == default + "<|im_start|>user\none\ntwo<|im_end|>\n"
    elif facts.chat_template == "chatml":
        assert facts.default_system_prompt is None
        assert _render(out, user, add_generation_prompt=True) == body + gen
        assert _render(out, system + user, add_generation_prompt=True) == sys_turn + body + gen
        assert _render(out, parts) == "<|im_start|>user\none\ntwo<|im_end|>\n"
        turn = [{"role": "assistant", "content": "Hello."}]
        assert _render(out, user + turn) == body + "<|im_start|>assistant\nHello.<|im_end|>\n"
    else:
        assert facts.chat_template == "qwen3" and facts.thinking
        assert _render(out, user, add_generation_prompt=True) == body + gen  # undefined: model decides
        assert _render(out, user, add_generation_prompt=True, enable_thinking=False) == (
            body + gen + "<think>\n\n</think>\n\n")
        assert _render(out, user, add_generation_prompt=True, enable_thinking=True) == body + gen + "<think>\n"
        assert _render(out, system + user, add_generation_prompt=True) == sys_turn + body + gen
        assert _render(out, parts) == "<|im_start|>user\none\ntwo<|im_end|>\n"
        # History: reasoning before the last user turn is dropped, reasoning after it is kept.
        convo = [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>r2</think>A2"},
        ]
        assert _render(out, convo) == (
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n")
        convo[-1] = {"role": "assistant", "content": "A2", "reasoning_content": "\nr2\n"}
        assert _render(out, convo).endswith("<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n")
        convo[-1] = {"role": "assistant", "content": "A2"}  # the last turn always gets a (maybe empty) block
        assert _render(out, convo).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n")


def test_deterministic(tmp_path):
    for version in RESAMPLER_VERSIONS:
        facts = facts_for(version)
        a, b, c = tmp_path / f"{version}a", tmp_path / f"{version}b", tmp_path / f"{version}c"
        assert write_tokenizer(facts, a, seed=3) == write_tokenizer(facts, b, seed=3)
        for p in a.iterdir():
            assert p.read_bytes() == (b / p.name).read_bytes(), (version, p.name)
        write_tokenizer(facts, c, seed=4)
        assert (a / "tokenizer.json").read_bytes() != (c / "tokenizer.json").read_bytes()


def test_vocab_size_and_errors(tmp_path):
    facts = facts_for("4.5")
    n = write_tokenizer(facts, tmp_path / "big", bpe_vocab_size=2048)
    assert n == 2048 + len(facts.all_special_tokens())
    with pytest.raises(ValueError, match="too small"):
        write_tokenizer(facts_for("4.0"), tmp_path / "small", bpe_vocab_size=300)


def test_corpus_is_varied():
    lines = corpus_lines(500, 1)
    assert lines == corpus_lines(500, 1) and lines != corpus_lines(500, 2)
    text = "\n".join(lines)
    for needle in ("\t", "\n", "  ", "\u200d", "def ", "{", "https://", "。"):
        assert needle in text, repr(needle)
    scripts = {"CJK": "\u4e00", "Hiragana": "\u3040", "Hangul": "\uac00", "Cyrillic": "\u0400",
               "Arabic": "\u0600", "Devanagari": "\u0900"}
    for name, lo in scripts.items():
        span = 0x5200 if name == "CJK" else 0x100
        assert any(lo <= ch < chr(ord(lo) + span) for ch in text), name
