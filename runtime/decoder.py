"""The LLM side of the runtime: llama.cpp through llama-cpp-python's low-level API, with image
embeddings injected as rows of a `llama_batch` (no torch, no mtmd).

A prompt is a list of segments: text token ids, or a block of embedding rows (one image slice, 64 x D).
Each position gets a key ("t", token id) or ("e", content hash, row), and the decoder remembers the keys
it has in its KV cache: a new prompt that starts with the same keys (a follow-up question, the same image
again) is prefilled only from the first difference.

Models with a recurrent state (4.6's gated-delta-net layers) cannot rewind that state to an arbitrary
position, so for them the decoder keeps snapshots of it (llama.cpp's partial sequence state) at the segment
boundaries of the last prompt and before its last position, resumes from the latest snapshot inside the
shared prefix, and otherwise recomputes from the start. Prompts are decoded in the same batches either way,
so a resumed prompt gives the tokens of a fresh run.

Embedding rows are placed at consecutive positions, as transformers does for every MiniCPM-V version; on
M-RoPE architectures (qwen35) llama.cpp wants four position components per row, given as (p, p, p, 0) like
the text tokens it expands itself.
"""
from __future__ import annotations

import ctypes
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence, Union

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

from . import llamacpp_log
from .memory import default_threads, resolve_load_mode

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0 = 0, 1, 8
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "q8_0": GGML_TYPE_Q8_0}
STATE_SEQ_PARTIAL_ONLY = 1     # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: only the recurrent (or SWA) part
MAX_STATE_SNAPSHOTS = 4     # ~20 MB each for 4.6 (18 delta-net layers x 16 heads x 128 x 128 f32)
# llama.cpp's x86 kernels for repacked weights (Q4_0, Q4_K, IQ4_NL, Q2_K interleaved 8x8; ggml-cpu/arch/x86/
# repack.cpp, `anr = nr - nr % 16`) multiply 16 prompt rows per pass over the weights, the rest 4 at a time and
# the last 1-3 one by one, so a 12-15 token batch costs more than a 16-token one (edge-4b Q4_K_M, 2 threads, AVX2:
# 14 tokens 1.23 s, 16 tokens 1.00 s; a 14-token question padded to 16: 0.67 s against 0.78 s unpadded, bench/
# README). Such batches get up to MAX_PAD_ROWS throwaway tokens after the real ones.
X86_GEMM_ROWS, MAX_PAD_ROWS = 16, 4


def pad_rows_for(n: int, block: int) -> int:
    """Throwaway rows that make an `n`-row batch a whole number of `block`-row kernel passes, when that is
    cheaper (at most MAX_PAD_ROWS of them, and never for fewer than a block's worth of real rows): else 0."""
    pad = -n % block if block else 0
    return pad if 0 < pad <= MAX_PAD_ROWS and n + pad >= block else 0


class ContextOverflowError(MiniCPMVEdgeError):
    """The prompt plus the answer would not fit in the context window."""


@dataclass(frozen=True)
class Embeddings:
    """Rows to inject at consecutive positions, with a key that identifies their content."""
    rows: np.ndarray          # [n, D] float32
    key: str                  # e.g. content hash of the image + preprocessing + slice index


Segment = Union[Sequence[int], Embeddings]


@dataclass
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.0   # 1 = off; applied to tokens seen in the last `penalty_last_n`
    penalty_last_n: int = 64
    seed: int | None = None
    presence_penalty: float = 0.0     # OpenAI's: minus this once for every token already in the answer,
    frequency_penalty: float = 0.0    # and minus this for each time it occurs there
    logit_bias: Mapping[int, float] | None = None   # added to the logits of these token ids
    top_logprobs: int | None = None   # None: no logprobs; k: the drawn token's and the k most likely ones'

    def validate(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise MiniCPMVEdgeError(f"invalid sampling parameters: {self}")


@dataclass(frozen=True)
class TokenLogprob:
    """A drawn token's log-probability and the `top_logprobs` most likely tokens at that step, from the
    logits after penalties, bias and grammar and before temperature/top-k/top-p (so greedy draws the top one)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class LogitConstraint(Protocol):
    """runtime/structured.Constraint: masks what a grammar forbids and follows the drawn tokens."""
    finished: bool

    def mask(self, logits: np.ndarray) -> None: ...

    def accept(self, token: int) -> None: ...


class Sampler:
    """Penalties -> logit bias -> grammar mask -> temperature -> top-k -> top-p -> draw, in numpy, seeded.
    With a constraint that is complete, the draw is `end_id` (the answer is over)."""

    def __init__(self, params: SamplingParams, *, constraint: LogitConstraint | None = None, end_id: int = -1):
        params.validate()
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.constraint, self.end_id = constraint, end_id
        self.counts: dict[int, int] = {}          # tokens drawn so far (presence/frequency penalties)
        self.last_logprob: TokenLogprob | None = None
        p = params
        self._plain_greedy = (p.temperature == 0 and p.repetition_penalty == 1.0 and not p.presence_penalty
                              and not p.frequency_penalty and not p.logit_bias and p.top_logprobs is None
                              and constraint is None)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.constraint is not None and self.constraint.finished:
            self.last_logprob = None
            return self.end_id
        if self._plain_greedy:    # nothing changes the logits: argmax of llama.cpp's float32 row, no float64 copy
            tok = int(np.argmax(logits))
            self.counts[tok] = self.counts.get(tok, 0) + 1
            return tok
        logits = self._process(np.array(logits, dtype=np.float64), history)
        tok = self._draw(logits)
        if self.p.top_logprobs is not None:
            self.last_logprob = _logprob(logits, tok, self.p.top_logprobs)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        if self.constraint is not None:
            self.constraint.accept(tok)
        return tok

    def _process(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.p
        if p.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history[-p.penalty_last_n:], dtype=np.int64))
            seen = seen[seen < logits.size]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            n = np.fromiter(self.counts.values(), dtype=np.float64)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * n
        if p.logit_bias:
            ids = np.fromiter(p.logit_bias.keys(), dtype=np.int64)
            logits[ids] += np.fromiter(p.logit_bias.values(), dtype=np.float64)
        if self.constraint is not None:
            self.constraint.mask(logits)
        return logits

    def _draw(self, logits: np.ndarray) -> int:
        p = self.p
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits.copy()
        logits /= p.temperature
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


def _logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    finite = np.isfinite(logits)
    top = logits.max()
    logp = logits - (top + np.log(np.exp(logits[finite] - top).sum()))
    k = min(k, int(finite.sum()))
    best = np.argpartition(-logp, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-logp[best], kind="stable")]
    return TokenLogprob(int(token), float(logp[token]), tuple((int(i), float(logp[i])) for i in best))


class Decoder:
    """One llama.cpp model + context (one sequence). Not thread-safe: callers serialise requests."""

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 4096, n_batch: int = 512, threads: int | None = None,
                 exact: bool = False, eval_callback=None, load_mode: str | None = None,
                 n_ubatch: int | None = None, kv_type: str = "f16"):
        """exact=True keeps the KV cache in f32 and disables flash attention, so logits match a float32
        reference to ~1e-6 (the defaults round K/V to f16: ~1e-3). `eval_callback` (a
        `llama_cpp.ggml_backend_sched_eval_callback`, kept referenced by the caller) sees every graph tensor:
        the importance-matrix collector (quantize/imatrix.py) reads matmul inputs through it. `load_mode`: how
        the weights are held, one of memory.LOAD_MODES (default "auto": resident once, see runtime/memory.py).
        `n_ubatch` (default n_batch) sizes llama.cpp's compute buffer, whose worst case holds the logits of a whole
        micro-batch; `kv_type` ("f16", "q8_0" or "f32") is the KV cache's type (memory.low_memory_context)."""
        import llama_cpp

        self._lc = llama_cpp
        llamacpp_log.install()
        llama_cpp.llama_backend_init()
        path = Path(gguf_path)
        if not path.is_file():
            raise MiniCPMVEdgeError(f"{path}: file not found")
        if kv_type not in KV_TYPES:        # before the weights are loaded
            raise MiniCPMVEdgeError(f"KV cache type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
        self.load_mode = resolve_load_mode(load_mode)
        mparams = llama_cpp.llama_model_default_params()
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE if self.load_mode == "read" else \
            llama_cpp.LLAMA_LOAD_MODE_MMAP
        mparams.use_extra_bufts = self.load_mode != "mmap-norepack"
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise MiniCPMVEdgeError(llamacpp_log.explain(f"{path}: llama.cpp could not load this GGUF"))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch or n_batch, n_batch)
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
        if kv_type == "q8_0":   # llama.cpp quantizes the V cache only with flash attention
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        threads = threads or default_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        if exact:
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if eval_callback is not None:
            cparams.cb_eval = eval_callback
            cparams.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise MiniCPMVEdgeError(llamacpp_log.explain(f"{path}: llama.cpp could not create a context"))
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.model)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = n_batch
        self.n_ubatch, self.kv_type = cparams.n_ubatch, "f32" if exact else kv_type
        self.last_prefill_positions = 0
        self.last_prefill_s = 0.0
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._keys: list[tuple] = []     # one key per position held in the KV cache
        self.path = path
        # M-RoPE architectures read 4 position components per embedding row (llama_batch_compat)
        self._pos_per_row = 4 if llama_cpp.llama_model_rope_type(self.model) in (
            llama_cpp.LLAMA_ROPE_TYPE_MROPE, llama_cpp.LLAMA_ROPE_TYPE_IMROPE) else 1
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(self.model)
                              or llama_cpp.llama_model_is_hybrid(self.model))
        self._snapshots: dict[int, bytes] = {}   # recurrent state after this many positions (recurrent only)
        self._one = None                 # the decode loop's one-token batch (`_step_in_place`)
        # token batches padded to whole kernel passes (X86_GEMM_ROWS) where llama.cpp repacks the weights on x86;
        # not for recurrent models (their state would see the padding) nor under an eval callback (it would)
        self.gemm_rows = X86_GEMM_ROWS if (
            platform.machine().lower() in ("x86_64", "amd64") and self.load_mode != "mmap-norepack"
            and not self.recurrent and eval_callback is None) else 0
        self.last_decode_steps = 0       # one-token decodes of the last `generate` (its answer tokens but the first)

    # ----- text
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            buf = (self._lc.llama_token * -n)()
            n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    # ----- KV cache bookkeeping
    @property
    def n_past(self) -> int:
        return len(self._keys)

    def reset(self) -> None:
        self._lc.llama_memory_clear(self._mem, True)
        self._keys = []
        self._snapshots = {}

    def _truncate(self, n_keep: int) -> None:
        """Keep the first `n_keep` positions, or fewer: `n_past` says how many were kept (0 = start over)."""
        if n_keep >= len(self._keys):
            return
        if self.recurrent:
            self._rewind(n_keep)
            return
        if not self._lc.llama_memory_seq_rm(self._mem, 0, n_keep, -1):
            self.reset()     # the cache could not drop a suffix: start over
            return
        del self._keys[n_keep:]

    # ----- recurrent state snapshots
    def _snapshot(self) -> None:
        """Remember the recurrent state at the current position (a few MB for 4.6, no attention cache)."""
        lc, n = self._lc, len(self._keys)
        if not self.recurrent or n in self._snapshots or n == 0:
            return
        size = lc.llama_state_seq_get_size_ext(self.ctx, 0, STATE_SEQ_PARTIAL_ONLY)
        buf = (ctypes.c_uint8 * size)()
        if lc.llama_state_seq_get_data_ext(self.ctx, buf, size, 0, STATE_SEQ_PARTIAL_ONLY) != size:
            return
        self._snapshots[n] = bytes(buf)
        while len(self._snapshots) > MAX_STATE_SNAPSHOTS:
            del self._snapshots[min(self._snapshots)]

    def _rewind(self, n_keep: int) -> None:
        """Go back to the latest snapshot at or before `n_keep`: restore the recurrent state, then drop the
        attention cache after it (the recurrent part then has nothing after it to drop). No snapshot: reset."""
        lc = self._lc
        for n in [k for k in self._snapshots if k > n_keep]:
            del self._snapshots[n]
        while self._snapshots:
            n = max(self._snapshots)
            data = self._snapshots[n]
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            if (lc.llama_state_seq_set_data_ext(self.ctx, buf, len(data), 0, STATE_SEQ_PARTIAL_ONLY) == len(data)
                    and lc.llama_memory_seq_rm(self._mem, 0, n, -1)):
                del self._keys[n:]
                return
            del self._snapshots[n]
        self.reset()

    @staticmethod
    def _segment_keys(seg: Segment) -> list[tuple]:
        if isinstance(seg, Embeddings):
            return [("e", seg.key, i) for i in range(seg.rows.shape[0])]
        return [("t", int(t)) for t in seg]

    # ----- prefill / decode
    def _decode_batch(self, *, tokens: Sequence[int] | None = None, rows: np.ndarray | None = None,
                      want_logits: bool, all_outputs: bool = False) -> None:
        lc = self._lc
        n = real = len(tokens) if tokens is not None else rows.shape[0]
        p0 = len(self._keys)
        if p0 + n > self.n_ctx:
            raise ContextOverflowError(f"the prompt needs {p0 + n} positions but the context holds {self.n_ctx} "
                                       f"(raise n_ctx, use fewer slices or images, or shorten the text)")
        # the throwaway tokens sit after the real ones, so causal attention keeps them out of the real rows, and
        # leave the KV cache right after; they are copies of the last token (any id would do)
        pad = pad_rows_for(n, self.gemm_rows) if tokens is not None and not all_outputs else 0
        if pad and p0 + n + pad <= self.n_ctx:
            tokens, n = [*tokens, *[tokens[-1]] * pad], n + pad
        # embedding rows on M-RoPE models take 4 position components each, section-major
        n_pos = n * self._pos_per_row if rows is not None else n
        batch = lc.llama_batch_init(n_pos, self.n_embd if rows is not None else 0, 1)
        try:
            if rows is not None:
                rows = np.ascontiguousarray(rows, dtype=np.float32)
                if rows.shape[1] != self.n_embd:
                    raise MiniCPMVEdgeError(f"embedding width {rows.shape[1]} != LLM input width {self.n_embd} "
                                            "(vision files from another model?)")
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            for i in range(n):
                if tokens is not None:
                    batch.token[i] = int(tokens[i])
                batch.pos[i] = p0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_outputs or (want_logits and i == real - 1)
            for j in range(1, n_pos // n):      # (p, p, p, 0), as llama.cpp expands text positions
                for i in range(n):
                    batch.pos[j * n + i] = p0 + i if j < 3 else 0
            batch.n_tokens = n
            rc = lc.llama_decode(self.ctx, batch)
            if n > real:
                lc.llama_memory_seq_rm(self._mem, 0, p0 + real, -1)
            if rc != 0:
                raise MiniCPMVEdgeError(llamacpp_log.explain(f"llama_decode failed (code {rc})"))
        finally:
            lc.llama_batch_free(batch)

    def prefill(self, segments: Sequence[Segment], *, all_outputs: bool = False) -> np.ndarray:
        """Bring the KV cache to exactly `segments` (reusing the longest common prefix already cached) and
        return the logits for the next token. Returns the number of positions actually computed in
        `self.last_prefill_positions`. `all_outputs` computes every position through the last layer (llama.cpp
        otherwise drops all rows but the last before it), as importance-matrix calibration needs."""
        keys = [k for seg in segments for k in self._segment_keys(seg)]
        if not keys:
            raise MiniCPMVEdgeError("empty prompt")
        if len(keys) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(keys)} positions long but the context holds "
                                       f"{self.n_ctx} (raise n_ctx, use fewer slices or images, or shorten the text)")
        common = 0
        for a, b in zip(self._keys, keys):
            if a != b:
                break
            common += 1
        common = min(common, len(keys) - 1)   # always recompute the last position to get its logits
        self._truncate(common)
        common = len(self._keys)              # a recurrent model may have gone back further
        self.last_prefill_positions = len(keys) - common
        # Recurrent models decode the last position on its own, after a snapshot, in fresh and resumed runs alike
        # (the same batches give the same numbers); segment ends are snapshot points too.
        last = len(keys) - 1 if self.recurrent else len(keys)
        pos = 0
        for seg in segments:
            seg_keys = self._segment_keys(seg)
            start, end = pos, pos + len(seg_keys)
            pos = end
            if end <= common:
                continue
            skip = max(common - start, 0)
            for lo, hi in ((start + skip, min(end, last)), (max(start + skip, last), end)):
                if lo >= hi:
                    continue
                if self.recurrent and lo == last:
                    self._snapshot()
                part_keys = keys[lo:hi]
                if isinstance(seg, Embeddings):
                    self._decode_rows(seg.rows[lo - start:hi - start], part_keys, want_logits=hi == len(keys),
                                      all_outputs=all_outputs)
                else:
                    self._decode_tokens(list(seg)[lo - start:hi - start], part_keys, want_logits=hi == len(keys),
                                        all_outputs=all_outputs)
            if self.recurrent and end < last:
                self._snapshot()
        return self.logits()

    def _decode_rows(self, rows: np.ndarray, keys: list[tuple], *, want_logits: bool, all_outputs: bool = False
                     ) -> None:
        for i in range(0, rows.shape[0], self.n_batch):
            part = rows[i:i + self.n_batch]
            self._decode_batch(rows=part, want_logits=want_logits and i + len(part) == len(rows),
                               all_outputs=all_outputs)
            self._keys.extend(keys[i:i + len(part)])

    def _decode_tokens(self, toks: list[int], keys: list[tuple], *, want_logits: bool, all_outputs: bool = False
                       ) -> None:
        for i in range(0, len(toks), self.n_batch):
            part = toks[i:i + self.n_batch]
            self._decode_batch(tokens=part, want_logits=want_logits and i + len(part) == len(toks),
                               all_outputs=all_outputs)
            self._keys.extend(keys[i:i + len(part)])

    def _logits_view(self) -> np.ndarray:
        """The last position's logits in llama.cpp's own buffer: valid until the next decode."""
        ptr = self._lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits(self) -> np.ndarray:
        return self._logits_view().copy()

    def _step_in_place(self, token: int) -> np.ndarray:
        """Append one token; the next logits as a view (`_logits_view`). The decode loop's step: one batch of one
        token reused for every step (no allocation, no per-field loop), no copy of the vocabulary's logits."""
        if len(self._keys) + 1 > self.n_ctx:
            raise ContextOverflowError(f"the answer reached the end of the {self.n_ctx}-token context")
        if self._one is None:
            self._one = self._lc.llama_batch_init(1, 0, 1)
            self._one.n_tokens, self._one.n_seq_id[0], self._one.seq_id[0][0], self._one.logits[0] = 1, 1, 0, 1
        self._one.token[0] = token
        self._one.pos[0] = len(self._keys)
        rc = self._lc.llama_decode(self.ctx, self._one)
        if rc != 0:
            raise MiniCPMVEdgeError(llamacpp_log.explain(f"llama_decode failed (code {rc})"))
        self._keys.append(("t", int(token)))
        return self._logits_view()

    def step(self, token: int) -> np.ndarray:
        """Append one token and return the next logits."""
        return self._step_in_place(token).copy()

    def generate(self, segments: Sequence[Segment], *, max_tokens: int, sampling: SamplingParams | None = None,
                 stop_ids: Sequence[int] = (), sampler: Sampler | None = None) -> Iterator[int]:
        """Prefill, then yield sampled token ids until a stop/end-of-generation token (not yielded) or
        `max_tokens`. The KV cache then holds the prompt and the answer but its last token (and the stop token),
        whose logits nobody reads: a follow-up that continues the conversation prefills them with its own tokens.
        A caller that wants the sampler's per-token logprobs or a grammar passes its own `sampler`."""
        sampler = sampler or Sampler(sampling or SamplingParams())
        stops = set(int(s) for s in stop_ids)
        t0 = time.perf_counter()
        self.prefill(segments)
        logits = self._logits_view()
        self.last_prefill_s = time.perf_counter() - t0
        self.last_decode_steps = 0
        history = [k[1] for k in self._keys if k[0] == "t"]
        for n in range(max_tokens):
            tok = sampler(logits, history)
            # a stop token is not decoded here: a follow-up prompt that continues after it prefills it then
            if tok in stops or self.is_eog(tok):
                return
            yield tok
            if n + 1 == max_tokens:     # the last token allowed: nobody reads the logits after it
                return
            history.append(tok)
            logits = self._step_in_place(tok)
            self.last_decode_steps += 1

    def close(self) -> None:
        if getattr(self, "_one", None) is not None:
            self._lc.llama_batch_free(self._one)
            self._one = None
        if getattr(self, "ctx", None):
            self._lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
