"""Synthetic tokenizers with the machinery and special tokens of the real MiniCPM-V ones.

`minicpmv-edge synth` makes random-weight checkpoints that look like the hub's. The tokenizer is a
real BPE, trained in about a second on `synth_text.corpus_lines`, with the same pipeline as the real
one (Qwen2 byte-level BPE for 2.6/4.5, Qwen3.5's for 4.6, sentencepiece-style byte-fallback BPE for 4.0),
the real special tokens, and the files a hub checkpoint ships. Only the vocabulary is small.
"""
from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from minicpmv_edge.facts import ModelFacts

from .synth_text import corpus_lines

__all__ = ["write_tokenizer", "chat_template_text", "QWEN2_PRETOKENIZE_REGEX", "QWEN35_PRETOKENIZE_REGEX",
           "SPM_SPACE"]

# The pre-tokenizer split of Qwen2/Qwen2.5/Qwen3 tokenizer.json.
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5's (MiniCPM-V 4.6): combining marks (\p{M}) stay with the letters they modify.
QWEN35_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
                            r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Split regex by the llama.cpp pre-tokenizer name in the facts table (both sides must split alike).
BYTE_BPE_SPLITS = {"qwen2": QWEN2_PRETOKENIZE_REGEX, "qwen35": QWEN35_PRETOKENIZE_REGEX}
# The transformers tokenizer class that rebuilds exactly that pipeline from vocab + merges.
BYTE_BPE_CLASSES = {"qwen2": "Qwen2Tokenizer", "qwen35": "Qwen3_5Tokenizer"}
# transformers processor attributes (tokenizer.image_token, ...) by our image-grammar role, for the
# transformers-native processors (4.6) that read them from tokenizer_config.json's extra_special_tokens.
PROCESSOR_TOKEN_ATTRS = {"image_pad": "image_token", "video_pad": "video_token", "image_start": "image_start_token",
                         "image_end": "image_end_token", "slice_start": "slice_start_token",
                         "slice_end": "slice_end_token", "image_id_start": "image_id_start_token",
                         "image_id_end": "image_id_end_token"}
SPM_SPACE = "\u2581"  # sentencepiece's visible space "▁"
SPM_HEAD = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in every Llama-style vocab
TRAIN_LINES = 3000


def chat_template_text(name: str) -> str:
    """The jinja text of `export/templates/{name}.jinja` (works from an editable install and a wheel)."""
    return resources.files(__package__).joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def _train_byte_bpe(lines: list[str], vocab_size: int, split: str = QWEN2_PRETOKENIZE_REGEX) -> Tokenizer:
    """Qwen2-style: NFC, regex split, byte-level BPE, no unk (every byte is in the vocab)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         special_tokens=[], show_progress=False)
    tok.train_from_iterator(lines, trainer)
    # Spell the model and decoder the way Qwen's tokenizer.json does ("" affixes, flags off); the
    # decoder flags have no effect on decoding, only on how the file reads.
    data = json.loads(tok.to_str())
    data["model"].update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                         fuse_unk=False, byte_fallback=False, ignore_merges=False)
    data["decoder"].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return Tokenizer.from_str(json.dumps(data))


def _train_spm_bpe(lines: list[str], vocab_size: int) -> Tokenizer:
    """Llama/sentencepiece-style: "▁" for spaces, byte fallback through <0x00>..<0xFF>, <s> prepended.

    Training splits at "▁" (as sentencepiece does) so merges never span words; inference then runs
    with no pre-tokenizer, exactly like a converted Llama tokenizer.json.
    """
    n_bytes = 256
    trained_size = vocab_size - n_bytes
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), normalizers.Replace(" ", SPM_SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="never", split=True)
    # A capped alphabet leaves rare characters (much CJK, most emoji) to byte fallback, like
    # sentencepiece's character_coverage does, so that path is exercised too. We pick it ourselves:
    # the trainer's own cut breaks frequency ties in hash order, which differs from run to run.
    counts = Counter(ch for line in lines for ch in SPM_SPACE + line.replace(" ", SPM_SPACE))
    n_alpha = max(64, (vocab_size - len(SPM_HEAD) - n_bytes) // 3)
    by_freq = [ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if ch != "\n"]
    # "\n" is always a piece of its own: MiniCPM-V's processor looks up convert_tokens_to_ids("\n").
    alphabet = ["\n"] + by_freq[:n_alpha - 1]
    trainer = BpeTrainer(vocab_size=trained_size, special_tokens=list(SPM_HEAD), initial_alphabet=alphabet,
                         limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(lines, trainer)

    # Insert the 256 byte tokens at ids 3..258, as in Llama vocabularies, and shift the rest up.
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = list(SPM_HEAD) + [f"<0x{b:02X}>" for b in range(n_bytes)]
    seen = set(order)
    order += [t for t, _ in trained if t not in seen]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    data["model"].update(dropout=None, unk_token="<unk>", continuing_subword_prefix=None, end_of_word_suffix=None,
                         fuse_unk=True, byte_fallback=True, ignore_merges=False)
    data["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    return tok


def _added_token_json(tok: AddedToken) -> dict:
    return {"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized, "rstrip": tok.rstrip,
            "single_word": tok.single_word, "special": tok.special}


def write_tokenizer(facts: ModelFacts, out_dir: Path, *, bpe_vocab_size: int = 1024, seed: int = 0) -> int:
    """Train a small tokenizer for `facts` and write the hub's tokenizer files into `out_dir`.

    Writes tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json,
    plus vocab.json and merges.txt for byte-level BPE (Qwen repos ship those slow-tokenizer files).
    Returns the total token count (BPE vocab + added tokens); config.json's vocab_size must be >= it.
    `bpe_vocab_size` is an upper bound: the training corpus runs out of merges near 7.9k tokens for
    byte-level BPE (16k for spm); ask for more and you get what it supports.
    """
    kind = facts.tokenizer_kind
    min_size = {"byte_bpe": 300, "spm_bpe": 512}.get(kind)
    if min_size is None:
        raise ValueError(f"MiniCPM-V {facts.version}: unknown tokenizer kind {kind!r}")
    if bpe_vocab_size < min_size:
        raise ValueError(f"bpe_vocab_size {bpe_vocab_size} is too small for {kind} (minimum {min_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = corpus_lines(TRAIN_LINES, seed)
    if kind == "byte_bpe":
        if facts.gguf_tokenizer_pre not in BYTE_BPE_SPLITS:
            raise ValueError(f"MiniCPM-V {facts.version}: no split regex for pre-tokenizer "
                             f"{facts.gguf_tokenizer_pre!r}")
        tok = _train_byte_bpe(lines, bpe_vocab_size, BYTE_BPE_SPLITS[facts.gguf_tokenizer_pre])
    else:
        tok = _train_spm_bpe(lines, bpe_vocab_size)

    specials = facts.all_special_tokens()
    vocab = tok.get_vocab(with_added_tokens=True)
    # spm's <unk>/<s>/</s> are already ids 0..2 (trainer special tokens); the rest go after the BPE vocab.
    new = [t for t in specials if t not in vocab]
    if facts.plain_added_tokens:
        # in the real order, with the tokens the real tokenizer marks special=false (4.6's <think>,
        # <tool_call>, ...) added as such: one call, so the ids follow the list
        tok.add_tokens([AddedToken(t, special=t not in facts.plain_added_tokens, normalized=False) for t in new])
    else:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    for t in specials:
        ids = tok.encode(t, add_special_tokens=False).ids
        if ids != [tok.token_to_id(t)] or tok.decode(ids, skip_special_tokens=False) != t:
            raise RuntimeError(f"special token {t!r} does not encode to one id ({ids})")
    tok.save(str(out_dir / "tokenizer.json"))
    if kind == "byte_bpe":
        tok.model.save(str(out_dir))  # vocab.json + merges.txt ("#version: 0.2" header)

    _write_configs(facts, tok, out_dir)
    return tok.get_vocab_size(with_added_tokens=True)


def _write_configs(facts: ModelFacts, tok: Tokenizer, out_dir: Path) -> None:
    """tokenizer_config.json and special_tokens_map.json, in the layout transformers writes them."""
    decoder = tok.get_added_tokens_decoder()
    byte_bpe = facts.tokenizer_kind == "byte_bpe"
    eos = facts.stop_tokens[0]
    pad = "<|endoftext|>" if byte_bpe else "</s>"
    unk = "<unk>"
    extra = [t for t in facts.all_special_tokens() if t not in {facts.bos_token, eos, pad, unk}]

    config: dict = {}
    if not byte_bpe:
        config.update(add_bos_token=facts.bos_token is not None, add_eos_token=False)
    else:
        config.update(add_prefix_space=False)
    config.update(
        added_tokens_decoder={str(i): _added_token_json(decoder[i]) for i in sorted(decoder)},
        additional_special_tokens=extra,
        bos_token=facts.bos_token,
        chat_template=chat_template_text(facts.chat_template),
        clean_up_tokenization_spaces=False,
        eos_token=eos,
    )
    if byte_bpe:
        config["errors"] = "replace"
    config.update(
        model_max_length=facts.llm_dims.max_position_embeddings if facts.llm_dims else 32768,
        pad_token=pad,
        split_special_tokens=False,
        # Qwen2Tokenizer rebuilds exactly our pipeline. transformers 5's LlamaTokenizer would instead
        # rebuild a Metaspace(prepend_scheme) pipeline that drops the legacy extra "▁" before text that
        # starts with a space (and after special tokens), which neither sentencepiece nor llama.cpp do.
        # PreTrainedTokenizerFast loads tokenizer.json verbatim, which is also what the hub checkpoint
        # gets (its MiniCPMVTokenizerFast class is unknown to transformers 5, which falls back to that).
        tokenizer_class=BYTE_BPE_CLASSES[facts.gguf_tokenizer_pre] if byte_bpe else "PreTrainedTokenizerFast",
        unk_token=unk,
    )
    if facts.hf_model_type != "minicpmv":
        # transformers-native processors (4.6) read the image grammar as tokenizer attributes
        config["extra_special_tokens"] = {attr: facts.special_tokens[role]
                                          for role, attr in PROCESSOR_TOKEN_ATTRS.items()
                                          if role in facts.special_tokens}

    def entry(t: str) -> dict:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map: dict = {"additional_special_tokens": extra}
    for role, t in (("bos_token", facts.bos_token), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
        if t is not None:
            special_map[role] = entry(t)

    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
