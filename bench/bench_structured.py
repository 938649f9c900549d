"""What constrained decoding costs: decode tok/s with and without a JSON-schema grammar, same model, same run.

    .venv/bin/python bench/bench_structured.py BUNDLE [--llm Q4_K_M] [--rounds 5] [--items 60]
    .venv/bin/python bench/bench_structured.py BUNDLE --vocab ggml-vocab-qwen2.gguf   # + engine mask cost

A/B, interleaved round by round (A = free decoding, B = the same prompt under a schema), greedy. The schema
is a fixed-length array of small integers, so B's answer has a known length; A decodes exactly as many tokens
(max_tokens = B's count, EOS pushed out of reach by logit_bias), so both sides time the same number of
decode steps. Reported: median decode tok/s of each side and the relative cost of the grammar.

--vocab GGUF also times one mask computation per step, over that file's vocabulary (a vocab-only GGUF such as
llama.cpp's models/ggml-vocab-qwen2.gguf, 151,936 tokens, like 4.5's), for llguidance (ours) and for
llama.cpp's own grammar sampler (llama_sampler_init_grammar + llama_sampler_apply over the full vocabulary):
why llguidance was picked. Timings on shared VMs vary by +-30 % run to run.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import numpy as np

import minicpmv_edge


def _schema(items: int) -> dict:
    return {"type": "array", "minItems": items, "maxItems": items,
            "items": {"type": "integer", "minimum": 0, "maximum": 9}}


def decode_ab(bundle: str, llm: str | None, rounds: int, items: int) -> dict:
    model = minicpmv_edge.load(bundle, llm=llm)
    messages = [{"role": "user", "content": "List some digits."}]
    grammar = model.grammar_engine().json_schema(_schema(items))
    no_eos = {t: -1e9 for t in model.stop_ids}
    free, constrained, n_tokens = [], [], 0
    for r in range(rounds + 1):                                  # round 0 warms up, not counted
        b = model.chat(messages, greedy=True, grammar=grammar, max_tokens=4 * items + 16)
        json.loads(b.text)                                       # validated before it counts
        n_tokens = b.timings.completion_tokens
        a = model.chat(messages, greedy=True, max_tokens=n_tokens, logit_bias=no_eos)
        assert a.timings.completion_tokens == n_tokens, (a.timings.completion_tokens, n_tokens)
        if r:
            free.append(a.timings.decode_tok_s)
            constrained.append(b.timings.decode_tok_s)
    model.close()
    f, c = statistics.median(free), statistics.median(constrained)
    return {"bundle": bundle, "llm": llm, "rounds": rounds, "tokens": n_tokens, "free_tok_s": f,
            "grammar_tok_s": c, "cost_pct": 100 * (f - c) / f, "free_all": free, "grammar_all": constrained}


def mask_cost(vocab_path: str, steps: int = 60) -> dict:
    """Median ms per step to mask random logits by a JSON schema, llguidance vs llama.cpp's grammar."""
    import llama_cpp
    import llguidance
    import llguidance.llamacpp
    from llama_cpp import llama_grammar

    from minicpmv_edge.runtime.structured import JSON_OPTIONS
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(vocab_path.encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 40}, "kind": {"enum": ["cat", "dog"]},
                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}}}}
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    tok = llguidance.llamacpp.lltokenizer_from_vocab(vocab)
    build_s = time.perf_counter() - t0
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    bits = np.zeros(((n + 31) // 32,), dtype=np.int32)
    ours = []
    for _ in range(steps):
        logits = rng.standard_normal(n)
        t = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        logits[np.unpackbits(bits.view(np.uint8), bitorder="little")[:n] == 0] = -np.inf
        ours.append(time.perf_counter() - t)
        token = int(np.argmax(logits))
        if matcher.is_stopped() or not matcher.consume_token(token):
            break

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, llama_grammar.json_schema_to_gbnf(json.dumps(schema)).encode(),
                                                   b"root")
    theirs = []
    for _ in range(steps):
        data = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        data["id"] = np.arange(n)
        data["logit"] = rng.standard_normal(n)
        t = time.perf_counter()
        arr = llama_cpp.llama_token_data_array((llama_cpp.llama_token_data * n).from_buffer(data), n, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
        theirs.append(time.perf_counter() - t)
        token = int(np.argmax(data["logit"]))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llama_cpp.llama_sampler_accept(sampler, token)
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_model_free(model)
    return {"vocab": vocab_path, "n_vocab": n, "llguidance_build_s": build_s,
            "llguidance_ms": 1e3 * statistics.median(ours), "llguidance_steps": len(ours),
            "llamacpp_grammar_ms": 1e3 * statistics.median(theirs), "llamacpp_grammar_steps": len(theirs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--llm", default=None, help="LLM quantization in the bundle (default: the bundle's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--items", type=int, default=60, help="array length of the schema (answer ~2 tokens each)")
    ap.add_argument("--vocab", help="a GGUF whose vocabulary to time the two grammar engines' masks on")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    out = {"decode": decode_ab(args.bundle, args.llm, args.rounds, args.items)}
    d = out["decode"]
    print(f"decode, {d['tokens']} tokens, median of {d['rounds']} interleaved rounds: free {d['free_tok_s']:.1f} tok/s, "
          f"with grammar {d['grammar_tok_s']:.1f} tok/s -> grammar costs {d['cost_pct']:.1f} %")
    if args.vocab:
        out["mask"] = m = mask_cost(args.vocab)
        print(f"mask per step over {m['n_vocab']:,} tokens: llguidance {m['llguidance_ms']:.2f} ms "
              f"(tokenizer built once in {m['llguidance_build_s']:.1f} s), llama.cpp grammar sampler "
              f"{m['llamacpp_grammar_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
