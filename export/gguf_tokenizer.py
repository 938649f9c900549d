"""Tokenizer metadata for the LLM GGUF: vocabulary, token types, merges or scores, special ids, template.

Byte-level BPE tokenizers (Qwen2/Qwen3: 2.6, 4.5) are written as llama.cpp's `gpt2` model with the
merges and the pre-tokenizer named in the facts table. Llama-style tokenizers (4.0, MiniCPM4) are
written as llama.cpp's `llama` (sentencepiece) model: with the real `tokenizer.model` when the
checkpoint ships one (gguf-py's SentencePieceVocab reads its scores), otherwise with scores derived
from the BPE merge order, which is the sentencepiece-BPE rule (merge the highest-scoring pair first).
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf

from minicpmv_edge.errors import CheckpointError
from minicpmv_edge.untrusted import inside, open_regular

from .checkpoint import TOKENIZER_JSON, Checkpoint

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _load_tokenizer_json(ckpt: Checkpoint) -> dict:
    path = ckpt.root / TOKENIZER_JSON
    data = ckpt.tokenizer_json   # read once, bounded and checked (export/checkpoint_checks.py)
    if data is None:
        raise CheckpointError(path, "file not found (the GGUF export reads the fast tokenizer)")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(path, f"expected a BPE tokenizer, found {model.get('type')!r}", "model.type")
    return data


def _tokens_and_types(ckpt: Checkpoint, data: dict) -> tuple[list[str], list[int], set[int]]:
    """Token strings by id, padded to config.json's vocab_size, with llama.cpp token types."""
    n_vocab = ckpt.llm.vocab_size
    by_id: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types: dict[int, gguf.TokenType] = {i: gguf.TokenType.NORMAL for i in by_id}
    added_ids: set[int] = set()
    for entry in data.get("added_tokens", []):
        tid = int(entry["id"])
        by_id[tid] = entry["content"]
        added_ids.add(tid)
        types[tid] = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise CheckpointError(ckpt.root / "config.json", f"{n_vocab} is smaller than the tokenizer "
                              f"({max(by_id) + 1} ids)", "vocab_size")
    tokens, token_types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # rows the embedding pads to a round size
            tokens.append(f"[PAD{i}]")
            token_types.append(gguf.TokenType.UNUSED)
    return tokens, token_types, added_ids


def _merges(data: dict) -> list[str]:
    # tokenizers >= 0.20 stores merges as pairs; older files as "a b" strings
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]


def _add_byte_bpe(w: gguf.GGUFWriter, ckpt: Checkpoint, data: dict) -> None:
    tokens, types, _ = _tokens_and_types(ckpt, data)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(ckpt.facts.gguf_tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(data))


def _add_spm(w: gguf.GGUFWriter, ckpt: Checkpoint, data: dict) -> None:
    if (ckpt.root / "tokenizer.model").is_file():
        for name in ("tokenizer.model", "added_tokens.json"):   # what gguf's reader opens: inside the folder
            if (ckpt.root / name).exists():
                open_regular(inside(ckpt.root, name, error=CheckpointError), error=CheckpointError).close()
        tokens, scores, types = [], [], []
        try:
            for text, score, ttype in gguf.SentencePieceVocab(ckpt.root).all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(ttype)
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a stranger's protobuf can fail in the parser in any way
            raise CheckpointError(ckpt.root / "tokenizer.model",
                                  f"not a readable sentencepiece model ({type(exc).__name__})") from None
        for i in range(len(tokens), ckpt.llm.vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
    else:
        tokens, types, added_ids = _tokens_and_types(ckpt, data)
        # score = -(merge rank of the merge that creates the token); single symbols score 0
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(_merges(data))))}
        scores = [0.0] * len(tokens)
        unk = data["model"].get("unk_token")
        for i, text in enumerate(tokens):
            if types[i] == gguf.TokenType.UNUSED or i in added_ids:
                scores[i] = -1000.0
                if text == unk:
                    types[i] = gguf.TokenType.UNKNOWN
            elif _BYTE_TOKEN.fullmatch(text):
                types[i] = gguf.TokenType.BYTE
            elif text in rank:
                scores[i] = -float(rank[text] + 1)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre(ckpt.facts.gguf_tokenizer_pre)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def add_tokenizer(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """Write every tokenizer key llama.cpp reads, plus special ids and the chat template."""
    data = _load_tokenizer_json(ckpt)
    if ckpt.facts.tokenizer_kind == "byte_bpe":
        _add_byte_bpe(w, ckpt, data)
    elif ckpt.facts.tokenizer_kind == "spm_bpe":
        _add_spm(w, ckpt, data)
    else:
        raise CheckpointError(ckpt.root, f"unknown tokenizer kind {ckpt.facts.tokenizer_kind!r} in the facts table")
    # bos/eos/pad/unk ids, add_bos flags and the chat template, as tokenizer_config.json says
    special = gguf.SpecialVocab(Path(ckpt.root), load_merges=False, n_vocab=ckpt.llm.vocab_size)
    special.add_to_gguf(w, quiet=True)
    if ckpt.chat_template and "tokenizer.chat_template" not in w.kv_data[0]:
        w.add_chat_template(ckpt.chat_template)
