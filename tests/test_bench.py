"""`minicpmv-edge bench` end to end on the tiny bundle: the report's structure and what each cached row reused.

No timing is asserted (timings belong in bench/README.md); what is asserted is that each row measured what its
name says: the cold row ran vision and prefilled the whole prompt, the cached rows did not."""
from __future__ import annotations

import json

from minicpmv_edge.cli import main as cli


def test_bench_report_on_tiny_bundle(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli(["bench", str(tiny_bundle("4.5")), "--reps", "2", "--decode", "8", "--llm", "Q4_K_M",
                "--json", str(out)]) == 0
    table = capsys.readouterr().out
    print(table)
    report = json.loads(out.read_text())
    ours, reuse = report["ours"], report["ours"]["reuse"]

    for stage in ("preprocess", "vision", "resampler", "prefill", "ttft"):
        assert len(ours[stage]["values"]) == 2 and ours[stage]["median"] > 0, stage
    first = reuse["ttft"]
    assert first["vision_slices"] >= 1 and first["image_cache_hits"] == 0
    assert first["prefilled_tokens"] == first["prompt_tokens"] > 64        # image tokens + text, all computed
    # same image and question again: only the last position is recomputed, no vision
    assert reuse["repeat_ttft"]["prefilled_tokens"] == 1 and reuse["repeat_ttft"]["vision_slices"] == 0
    # new question: the image comes from the cache and the KV prefix up to the question is reused
    new_q = reuse["cached_ttft"]
    assert new_q["vision_slices"] == 0 and new_q["image_cache_hits"] == 1
    assert 0 < new_q["prefilled_tokens"] < new_q["prompt_tokens"] - 64
    # cold KV cache: no vision, but the whole prompt is prefilled again
    cold = reuse["cached_cold_kv_ttft"]
    assert cold["vision_slices"] == 0 and cold["prefilled_tokens"] == cold["prompt_tokens"]
    assert reuse["followup_ttft"]["prompt_tokens"] > first["prompt_tokens"]

    # llama.cpp's own path ran in the same run, on the same LLM file
    base = report["llama_cpp"]
    assert base["ttft"]["median"] > 0 and len(base["ttft"]["values"]) == 2
    assert report["llm"].endswith("Q4_K_M.gguf")
    assert report["decode_bound"]["bytes_per_token"] > 0 and report["decode_bound"]["tok_s"] > 0
    assert "| TTFT |" in table and "of first" in table and "positions computed" in table
