"""The quantization sweep end to end on a tiny model: every cell measured, files written, resumable."""
from __future__ import annotations

import json

from minicpmv_edge.workflows.sweep import run_sweep


def test_sweep_runs_and_resumes(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(tiny_checkpoint("4.5"), out, llm_types=["Q4_K_M", "Q8_0", "F16"], vision_types=["fp32", "fp16"],
                     slices=[1, 4], progress=False)
    assert len(rows) == 12
    assert {(r["llm"], r["vision"], r["slices"]) for r in rows} == {
        (q, v, s) for q in ("Q4_K_M", "Q8_0", "F16") for v in ("fp32", "fp16") for s in (1, 4)}
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (out / name).stat().st_size > 0
    by = {(r["llm"], r["vision"], r["slices"]): r for r in rows}
    assert by[("F16", "fp32", 1)]["kld_mean"] < 1e-6 and by[("F16", "fp32", 1)]["top1"] == 1.0   # the baseline
    assert by[("Q4_K_M", "fp32", 1)]["kld_mean"] > by[("Q8_0", "fp32", 1)]["kld_mean"]
    assert by[("Q4_K_M", "fp32", 1)]["llm_bytes"] < by[("Q8_0", "fp32", 1)]["llm_bytes"]
    assert 0.999 < by[("F16", "fp16", 4)]["embedding_cosine"] <= 1.0
    # the sliced TTFT image really slices more when more slices are allowed
    assert by[("F16", "fp32", 1)]["sliced_image_slices"] == 1 < by[("F16", "fp32", 4)]["sliced_image_slices"]
    llama_col = json.loads((out / "sweep.json").read_text())["llama_cpp"]
    assert [c["mmproj"] for c in llama_col] == ["F16", "Q8_0"] and min(c["embedding_cosine"] for c in llama_col) > 0.99
    # resumable: finished cells are read back, not recomputed; a new cell is added
    again = run_sweep(tiny_checkpoint("4.5"), out, llm_types=["Q4_K_M", "Q8_0", "F16", "Q6_K"],
                      vision_types=["fp32", "fp16"], slices=[1, 4], progress=False)
    assert len(again) == 16
    assert [r["seconds"] for r in again[:12]] == [r["seconds"] for r in rows]
