"""`minicpmv-edge bench` end to end on the tiny bundle: the report's structure and what each cached row reused.

No timing is asserted (timings belong in bench/README.md); what is asserted is that each row measured what its
name says: the cold row ran vision and prefilled the whole prompt, the cached rows did not."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

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


def test_bench_sweep_contended_and_tables_on_tiny_bundle(tiny_bundle, tmp_path, capsys):
    """`--threads 1,2 --contended 1`: one quiet and one contended run per thread count, memory per stage for each
    path read in its own process, the decode loops' overhead, and the same series in CSV and JSONL, each row with
    the hardware fingerprint."""
    out = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "csv", "jsonl", "md")}
    assert cli(["bench", str(tiny_bundle("4.5")), "--reps", "1", "--decode", "4", "--llm", "Q4_K_M",
                "--threads", "1,2", "--contended", "1", "--json", str(out["json"]), "--csv", str(out["csv"]),
                "--jsonl", str(out["jsonl"]), "--markdown", str(out["md"])]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out["json"].read_text())

    runs = [(r["threads"], r["condition"], r["background_procs"]) for r in report["runs"]]
    assert runs == [(1, "quiet", 0), (1, "contended", 1), (2, "quiet", 0), (2, "contended", 1)]
    for r in report["runs"]:
        assert len(r["ours"]["ttft"]["values"]) == 1 and len(r["llama_cpp"]["ttft"]["values"]) == 1
        s = r["ours"]["ttft"]
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]

    fp = report["fingerprint"]
    for key in ("cpu", "cpu_flags", "cores_physical", "cores_logical", "ram_gb", "os", "kernel", "python",
                "llama_cpp_python", "onnxruntime", "id"):
        assert key in fp, key
    assert fp["cores_logical"] >= 1 and fp["ram_gb"] > 0
    assert fp["llama_cpp"]["system_info"].startswith("CPU") and fp["llama_cpp"]["cpu_backend"].startswith("libggml")
    assert any(p.endswith(("libllama.so", "libllama.dylib")) for p in fp["llama_cpp"]["libs"])

    for t in ("1", "2"):
        per = report["per_threads"][t]
        assert per["decode_bound"]["tok_s"] > 0
        for path in ("ours", "llama_cpp"):
            mem = per["memory"][path]
            assert list(mem) == ["load", "vision", "prefill", "decode", "end"], list(mem)
            # each process's own peak, which can only grow stage by stage; resident = anonymous + file-backed
            peaks = [mem[s]["peak_rss_mb"] for s in mem]
            assert peaks == sorted(peaks) and peaks[0] > 10, peaks
            for snap in mem.values():
                assert snap["rss_mb"] <= snap["peak_rss_mb"] + 1
                parts = snap["rss_anon_mb"] + snap["rss_file_mb"] + snap["rss_shmem_mb"]
                assert abs(parts - snap["rss_mb"]) < 0.01, (parts, snap["rss_mb"])
            o = per["decode_overhead"][path]
            assert 1 <= o["steps"] <= 3 and 0 < o["inside_llama_decode_s"] <= o["decode_s"], o

    rows = list(csv.DictReader(out["csv"].open()))
    lines = [json.loads(x) for x in out["jsonl"].read_text().splitlines()]
    assert len(rows) == len(lines) > 0
    assert {r["fp_id"] for r in rows} == {fp["id"]} and all(x["fingerprint"] == fp for x in lines)
    keys = {(r["threads"], r["condition"], r["path"], r["metric"]) for r in rows}
    for t in ("1", "2"):
        for cond in ("quiet", "contended"):
            assert (t, cond, "ours", "ttft") in keys and (t, cond, "llama_cpp", "decode_tok_s") in keys
        assert (t, "quiet", "llama_cpp", "peak_rss_mb@decode") in keys
        assert (t, "quiet", "ours", "decode_overhead_ms_per_token") in keys
    assert "### 2 threads, contended, 1 busy-loop processes" in printed and "### Memory, 1 threads" in printed
    assert out["md"].read_text().strip() == printed.strip()
    # each phase was also appended as it finished (a long run killed midway keeps its finished phases)
    phases = [json.loads(x) for x in out["json"].with_suffix(".progress.jsonl").read_text().splitlines()]
    assert [(p["threads"], p["condition"]) for p in phases] == [(1, "quiet"), (1, "contended"), (2, "quiet"),
                                                                  (2, "contended")]
    assert phases[1]["ours"]["ttft"] == report["runs"][1]["ours"]["ttft"]


def test_bench_compares_llama_builds_each_in_its_own_process(tiny_bundle, tmp_path):
    """`--llama-lib NAME=DIR` on a bare LLM GGUF: prefill and decode tok/s of each llama.cpp build, and each worker
    really ran the build it was given (the libraries mapped into it come from that folder)."""
    from minicpmv_edge.workflows.benchmark import default_llama_lib
    installed = default_llama_lib()
    copy = tmp_path / "lib-copy"
    shutil.copytree(installed, copy, symlinks=True)
    gguf = next(tiny_bundle("4.5").glob("*Q4_K_M.gguf"))
    out = tmp_path / "builds.json"
    assert cli(["bench", str(gguf), "--reps", "2", "--decode", "4", "--prompt-tokens", "16", "--threads", "1",
                "--llama-lib", f"copy={copy}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    builds = {b["build"]: b for b in report["builds"]}
    assert list(builds) == ["default", "copy"]
    for name, folder in (("default", installed), ("copy", copy)):
        b = builds[name]
        assert len(b["prefill_tok_s"]["values"]) == 2 and b["prefill_tok_s"]["median"] > 0
        assert len(b["decode_tok_s"]["values"]) == 2 and b["decode_tok_s"]["median"] > 0
        libs = b["llama_cpp"]["libs"]
        assert libs and all(Path(p).parent == folder.resolve() for p in libs), (name, libs)
    assert "runs" in report and report["runs"] == [] and report["llm"] == gguf.name


def test_bench_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["bench", str(tmp_path), "--threads", "0,2"])
    with pytest.raises(SystemExit):
        cli(["bench", str(tmp_path), "--llama-lib", "nofolder"])
    with pytest.raises(SystemExit):
        cli(["bench", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert "--threads: each count must be between 1 and" in err and "NAME=DIR" in err and "no such bundle" in err
