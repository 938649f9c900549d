"""The decode loop (#18): one reused one-token batch, logits read in place, no decode nobody reads (after the last
allowed token, of the stop token), greedy without a float64 copy; the tokens are those of the plain step-by-step
loop, and decode_tok_s counts the steps llama.cpp evaluated."""
from __future__ import annotations

import numpy as np

import minicpmv_edge
from minicpmv_edge.runtime.decoder import Sampler, SamplingParams, pad_rows_for
from minicpmv_edge.workflows.demo import demo_image


def test_greedy_fast_path_draws_what_the_full_sampler_draws():
    rng = np.random.default_rng(18)
    for case in range(200):
        logits = rng.standard_normal(1000).astype(np.float32)
        if case % 3 == 0:
            logits[rng.integers(0, 1000, 5)] = logits.max()       # ties: the first maximum wins in both
        plain = Sampler(SamplingParams(temperature=0.0))
        full = Sampler(SamplingParams(temperature=0.0, logit_bias={0: 0.0}))   # a no-op bias: the float64 path
        assert plain._plain_greedy and not full._plain_greedy
        assert plain(logits, []) == full(logits, [])


def test_generate_equals_the_step_by_step_loop_and_skips_unread_decodes(tiny_bundle):
    model = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    try:
        segments = model.prepare([{"role": "user", "content": [demo_image(448), "What is this?"]}])
        dec = model.decoder
        n = 12
        dec.reset()
        got = list(dec.generate(segments, max_tokens=n, sampling=SamplingParams()))
        steps, n_past = dec.last_decode_steps, dec.n_past
        dec.reset()
        logits, want = dec.prefill(segments), []
        for _ in range(n):                        # the plain loop: copied logits, float64 argmax
            tok = int(np.argmax(np.asarray(logits, dtype=np.float64)))
            if dec.is_eog(tok) or tok in model.stop_ids:
                break
            want.append(tok)
            logits = dec.step(tok)
        print(f"\n{len(got)} tokens, {steps} one-token decodes, KV {n_past} positions; identical: {got == want}")
        assert got == want and len(got) >= 2
        prompt = sum(len(s) if isinstance(s, list) else s.rows.shape[0] for s in segments)
        if len(got) == n:         # ran to max_tokens: the last token is never decoded (nobody reads its logits)
            assert steps == n - 1 and n_past == prompt + n - 1
        else:                     # stopped: each answer token decoded, the stop token not
            assert steps == len(got) and n_past == prompt + len(got)
        res = model.chat([{"role": "user", "content": [demo_image(448), "What is this?"]}], greedy=True,
                         max_tokens=n)
        assert res.timings.decode_steps == (n - 1 if len(res.token_ids) == n else len(res.token_ids))
    finally:
        model.close()


def test_pad_rows_fill_whole_kernel_passes_only_when_cheap():
    got = {n: pad_rows_for(n, 16) for n in range(1, 40)}
    assert {n: p for n, p in got.items() if p} == {12: 4, 13: 3, 14: 2, 15: 1, 28: 4, 29: 3, 30: 2, 31: 1}
    assert all(pad_rows_for(n, 0) == 0 for n in range(1, 40))        # no kernel block: never padded


class _CountingLlama:
    """llama_cpp with llama_decode wrapped to record each batch's size."""
    def __init__(self, lc):
        self._lc, self.sizes = lc, []

    def __getattr__(self, name):
        return getattr(self._lc, name)

    def llama_decode(self, ctx, batch):
        self.sizes.append(batch.n_tokens)
        return self._lc.llama_decode(ctx, batch)


def test_padded_prompt_batch_gives_the_unpadded_logits_and_leaves_no_cells(tiny_bundle):
    """A 14-token prompt decoded as 16 (2 throwaway copies after it, x86's repacked-kernel block) gives the logits
    and the greedy continuation of the 14-token batch, and the KV cache holds exactly the 14 positions after."""
    model = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    dec = model.decoder
    try:
        toks = dec.tokenize("A short prompt of fourteen or so tokens, counted below.")[:14]
        assert len(toks) == 14
        runs = {}
        for rows in (0, 16):
            dec.reset()
            dec.gemm_rows, counting = rows, _CountingLlama(dec._lc)
            dec._lc, real = counting, dec._lc
            try:
                logits = dec.prefill([toks]).copy()
                cells = dec._lc.llama_memory_seq_pos_max(dec._mem, 0) + 1
                answer = list(dec.generate([toks], max_tokens=6, sampling=SamplingParams()))
            finally:
                dec._lc = real
            runs[rows] = (logits, counting.sizes[0], cells, answer)
        (plain, plain_batch, plain_cells, plain_answer), (padded, padded_batch, cells, answer) = runs.values()
        err = float(np.abs(padded - plain).max() / np.abs(plain).max())
        print(f"\nbatches {plain_batch} vs {padded_batch} tokens; KV cells after prefill {plain_cells} vs {cells}; "
              f"logits max rel. error {err:.2e} (tolerance 1e-3); answers identical: {answer == plain_answer}")
        assert (plain_batch, padded_batch) == (14, 16) and plain_cells == cells == 14
        assert err < 1e-3 and answer == plain_answer
    finally:
        model.close()
