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


# ----- cells as pure functions: the Ray executor, the JSONL log, kill and resume, imatrix columns
QUALITY = ("kld_mean", "top1", "bits_per_weight", "embedding_cosine", "llm_bytes", "llm_file")


def test_ray_cluster_matches_local_executor(tiny_checkpoint, tmp_path):
    """A local Ray cluster with 2 workers runs the same cells (with and without an image+text imatrix) and gets
    the same quality columns as the local executor; quantized files are content-addressed and shared."""
    kw = dict(llm_types=["Q2_K", "Q4_K_M", "F16"], vision_types=["fp32"], slices=[1], imatrix_modes=["none", "image"],
              measures=["quality"], progress=False, threads=1)
    local = run_sweep(tiny_checkpoint("4.5"), tmp_path / "local", mmproj_types=["F16", "Q8_0", "Q6_K"], **kw)
    ray_rows = run_sweep(tiny_checkpoint("4.5"), tmp_path / "ray", executor="ray",
                         ray_init={"num_cpus": 2, "num_gpus": 0}, **kw)
    key = lambda r: (r["llm"], r["imatrix"], r["vision"], r["slices"])   # noqa: E731
    assert len(local) == len(ray_rows) == 5          # F16 takes no imatrix
    by_local = {key(r): r for r in local}
    for r in ray_rows:
        for col in QUALITY:
            assert r[col] == by_local[key(r)][col], (key(r), col)
    print("\n| cell | KLD local | KLD ray |")
    for r in sorted(ray_rows, key=key):
        print(f"| {key(r)} | {by_local[key(r)]['kld_mean']:.6f} | {r['kld_mean']:.6f} |")
    # the imatrix changes the quantized file and, on these cells, its quality
    assert by_local[("Q2_K", "image", "fp32", 1)]["llm_file"] != by_local[("Q2_K", "none", "fp32", 1)]["llm_file"]
    assert by_local[("Q2_K", "image", "fp32", 1)]["kld_mean"] != by_local[("Q2_K", "none", "fp32", 1)]["kld_mean"]
    # the mmproj column: llama.cpp's clip loads a Q6_K mmproj (K-quant blocks where rows are multiples of 256,
    # Q8_0 elsewhere) and it stays close to our fp32 path
    col = {c["mmproj"]: c for c in json.loads((tmp_path / "local" / "sweep.json").read_text())["llama_cpp"]}
    print({k: (c["bytes"], round(c["embedding_cosine"], 5)) for k, c in col.items()})
    assert col["Q6_K"]["bytes"] < col["Q8_0"]["bytes"] < col["F16"]["bytes"]
    assert col["Q6_K"]["embedding_cosine"] > 0.99
    log = [json.loads(line) for line in (tmp_path / "ray" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in log) == sorted({r["key"] for r in log})   # one row per cell


def test_killed_sweep_resumes_without_recomputing(tiny_checkpoint, tmp_path):
    """SIGKILL a sweep once its first cells are logged; the rerun keeps their rows and runs only the rest."""
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "minicpmv_edge", "sweep", str(tiny_checkpoint("4.5")), "--out", str(out),
           "--llm", "Q2_K,Q4_K_M,Q8_0,F16", "--vision", "fp32", "--slices", "1",
           "--measure", "quality,speed", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_bytes().count(b"\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    before = [json.loads(line) for line in log.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
    print(f"\nkilled after {len(before)} of 8 cells")
    assert proc.returncode == -signal.SIGKILL and 2 <= len(before) < 8
    rows = run_sweep(tiny_checkpoint("4.5"), out, llm_types=["Q2_K", "Q4_K_M", "Q8_0", "F16"],
                     vision_types=["fp32"], slices=[1], progress=False, threads=1)
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert after[:len(before)] == before                     # finished cells kept as they were
    assert len(after) == 8 and len({r["key"] for r in after}) == 8   # ... and not run again
    assert len(rows) == 4 and all("kld_mean" in r and "ttft_s" in r for r in rows)
    speed = [r for r in after if r["measure"] == "speed"]
    assert all(r["hardware"]["cores"] and r["hardware"]["threads"] == 1 for r in speed)
