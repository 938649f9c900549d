"""Constrained decoding: JSON schemas and grammars enforced on the logits, whatever the weights.

The engine is llguidance (Microsoft's Rust grammar engine, on PyPI with wheels for every platform we serve
from). It builds its token trie once from the llama.cpp vocabulary and then computes the set of allowed next
tokens as a bitmask: ~0.7 ms a step on the 151k Qwen vocabulary, where llama.cpp's own grammar sampler
(llama_sampler_init_grammar over the full vocabulary) took ~150 ms (bench/bench_structured.py, README).

    engine = GrammarEngine(vocab, n_vocab, eos_id)     # one per model, built on first use (~1-10 s at 151k)
    grammar = engine.json_schema(schema)               # compiled and validated; reusable, immutable
    constraint = Constraint(engine, grammar, start_after=think_end_id)   # one per generation
    ... sampler: constraint.mask(logits); tok = draw(logits); constraint.accept(tok)

A constraint can wait for a token before it applies (`start_after`: the end of the reasoning block), so with
thinking on the reasoning is free and the answer is constrained.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Mapping

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

# Compact JSON with the separators json.dumps uses by default; no free whitespace, so a model cannot spend
# its whole budget on spaces between tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(MiniCPMVEdgeError):
    """A schema or grammar the engine cannot compile (the message says why)."""


class GrammarEngine:
    """llguidance's tokenizer for one llama.cpp vocabulary; compiles schemas and grammars against it."""

    def __init__(self, vocab: Any, n_vocab: int, eos_id: int):
        try:
            import llguidance
            import llguidance.llamacpp
        except ImportError:   # pragma: no cover - a base dependency
            from minicpmv_edge.errors import MissingExtraError
            raise MissingExtraError("base", "llguidance") from None
        self._llg = llguidance
        self.n_vocab = n_vocab
        self.eos_id = eos_id
        # the end-of-answer token the grammar allows once it is complete: the chat's stop token
        with warnings.catch_warnings():   # it reads token attributes through a deprecated llama_cpp name
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab, eos_token=eos_id)

    def _compile(self, grammar: str, what: str) -> str:
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise StructuredOutputError(f"{what}: {error.splitlines()[0]}")
        return grammar

    def json_schema(self, schema: Mapping[str, Any], what: str = "response_format.json_schema.schema") -> str:
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise StructuredOutputError(f"{what}: {exc}") from None
        return self._compile(grammar, what)

    def json_object(self) -> str:
        """Any JSON object (OpenAI's `json_object` mode)."""
        return self.json_schema({"type": "object"}, "response_format")

    def lark(self, text: str, what: str) -> str:
        return self._compile(self._llg.LLMatcher.grammar_from_lark(text), what)


class Constraint:
    """One generation's grammar state. Masks logits in place and follows the sampled tokens."""

    def __init__(self, engine: GrammarEngine, grammar: str, *, start_after: int | None = None):
        self.engine = engine
        self.matcher = engine._llg.LLMatcher(engine.tokenizer, grammar)
        if self.matcher.is_error():
            raise StructuredOutputError(self.matcher.get_error())
        self.start_after = start_after
        self.active = start_after is None
        self._mask = np.zeros(((engine.n_vocab + 31) // 32,), dtype=np.int32)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more: the answer ends here."""
        return self.active and self.matcher.is_stopped()

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids next to -inf (in place)."""
        if not self.active:
            return
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[:logits.size]
        logits[allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        if not self.active:
            self.active = token == self.start_after
            return
        if not self.matcher.consume_token(token):
            # only reachable if a caller sampled around the mask; the error names the grammar's complaint
            raise StructuredOutputError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
