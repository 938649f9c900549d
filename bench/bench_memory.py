"""What fits on a 4 GB or 8 GB device: peak resident memory of our runtime per version, LLM type and load mode.

    .venv/bin/python bench/bench_memory.py CHECKPOINT --vision VISION.onnx [--resampler R.mvr] \\
        --llm A.gguf --llm B.gguf ... [--mode default,low-memory] --out memory.json
    .venv/bin/python bench/bench_memory.py --table memory.json            # the markdown table of all rows

Each (LLM file, mode) runs in a fresh spawned process (VmHWM starts at exec, so no run inflates another): load
the files exported from CHECKPOINT (the runtime's own classes, as a bundle would load them), encode one image
ahead (`prepare_image`, a generated 448x448 picture: one slice), then ask about it and decode `--decode` tokens.
Memory is read from /proc/self/status after each stage; the row's figure is the process's peak (VmHWM), split at
the end into anonymous memory (heap, llama.cpp's weights in "read" mode, KV cache, ORT arena: what the OS
cannot drop) and file pages (mmap'd weights: clean, droppable and re-read under pressure). Modes: `default`
(the platform's load mode, runtime/memory.py) and `low-memory` (`--low-memory`: mmap without repacking, vision
session freed after the image, q8_0 KV cache, 128-token micro-batches: runtime/memory.low_memory_context). Each
row also has the seconds of the image's encoding, the question's TTFT after it and decode tok/s, so a memory lever
is seen next to its cost (`--reps` interleaves the modes). Rows append to --out, so runs over several checkpoints build one table.
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from minicpmv_edge.workflows.benchmark import bench_image_file

MODES = ("default", "low-memory")
GIB = 2 ** 30


def _snapshot() -> dict[str, float]:
    """The bench's per-stage reading (MiB: peak_rss_mb, rss_mb, rss_anon_mb, rss_file_mb, rss_shmem_mb)."""
    from minicpmv_edge.workflows.benchmark import memory_snapshot
    snap = memory_snapshot()
    if "rss_anon_mb" not in snap:
        raise SystemExit("bench_memory needs Linux's /proc/self/status")
    return snap


def _probe(conn, checkpoint: str, llm: str, vision: str, resampler: str | None, mode: str, threads: int,
           image: str, decode: int, n_ctx: int) -> None:
    """One measurement, in its own process; sends back the stages' snapshots (or the error as text)."""
    try:
        from minicpmv_edge.export.checkpoint import Checkpoint
        from minicpmv_edge.quantize.imatrix import session_from_files
        stages = {"imports": _snapshot()}
        ckpt = Checkpoint.open(checkpoint)
        m = session_from_files(ckpt, Path(llm), Path(vision), Path(resampler) if resampler else None, threads,
                               low_memory=mode == "low-memory", n_ctx=n_ctx)
        stages["load"] = _snapshot()
        prepared = m.prepare_image(image)
        stages["vision"] = _snapshot()
        r = m.chat([{"role": "user", "content": [prepared, {"type": "text", "text": "Describe this image."}]}],
                   greedy=True, max_tokens=decode)
        stages["answer"] = _snapshot()
        conn.send(("ok", {"stages": stages, "version": ckpt.facts.version, "load_mode": m.decoder.load_mode,
                          "answer_tokens": r.timings.completion_tokens, "n_ctx": m.decoder.n_ctx,
                          "kv_type": m.decoder.kv_type, "n_ubatch": m.decoder.n_ubatch, "prepare_s": prepared.timings.first_token,
                          "ttft_s": r.timings.first_token, "decode_tok_s": r.timings.decode_tok_s}))
        m.close()
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))


def measure(checkpoint: Path, llm: Path, vision: Path, resampler: Path | None, mode: str, threads: int,
            image: Path, decode: int, n_ctx: int = 4096) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_probe, args=(child, str(checkpoint), str(llm), str(vision),
                                            str(resampler) if resampler else None, mode, threads, str(image), decode,
                                            n_ctx))
    t0 = time.perf_counter()
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        proc.join(5)
        status, payload = "error", f"the probe process died (exit code {proc.exitcode})"
    proc.join(60)
    if status == "error":
        raise SystemExit(f"{llm.name} ({mode}): {payload}")
    end = payload["stages"]["answer"]
    files = {"llm": llm.stat().st_size, "vision": vision.stat().st_size,
             "resampler": resampler.stat().st_size if resampler else 0}
    return {"version": payload["version"], "llm_file": llm.name, "vision_file": vision.name, "mode": mode,
            "load_mode": payload["load_mode"], "threads": threads, "n_ctx": payload["n_ctx"],
            "kv_type": payload["kv_type"], "n_ubatch": payload["n_ubatch"], "prepare_s": payload["prepare_s"],
            "ttft_s": payload["ttft_s"], "decode_tok_s": payload["decode_tok_s"],
            "answer_tokens": payload["answer_tokens"], "file_mib": {k: v / 2 ** 20 for k, v in files.items()},
            "peak_mib": end["peak_rss_mb"], "end_anon_mib": end["rss_anon_mb"], "end_file_mib": end["rss_file_mb"],
            "base_mib": payload["stages"]["imports"]["peak_rss_mb"], "stages": payload["stages"], "seconds": time.perf_counter() - t0,
            "machine": f"{platform.machine()} {platform.system()} {os.cpu_count()} cpus",
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _fits(peak_mib: float, ram_gib: int) -> str:
    """Pi-style (Linux, the whole RAM but ~1 GiB for the OS and a shell) and phone-style (an app gets about half
    the RAM before the OS kills it: iOS's default per-app limit and Android's low-memory killer are both in that
    range) verdicts."""
    peak = peak_mib * 2 ** 20
    pi = peak <= ram_gib * GIB - GIB
    phone = peak <= ram_gib * GIB / 2
    return "yes" if phone else ("Pi only" if pi else "no")


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| version | LLM file | vision file | mode (load, KV, micro-batch), context | files MiB | peak RSS MiB | "
            "peak / files | anon / file pages at end MiB | 4 GB | 8 GB | image s | TTFT s | decode tok/s |\n"
            "|---|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|")
    lines = [head]
    for r in rows:
        files = sum(r["file_mib"].values())
        # rows written before the KV/micro-batch/timing columns existed ran f16, 512, untimed
        settings = f"{r['load_mode']}, {r.get('kv_type', 'f16')}, {r.get('n_ubatch', 512)}"
        timing = " | ".join(f"{r[k]:.2f}" if k in r else "–" for k in ("prepare_s", "ttft_s", "decode_tok_s"))
        lines.append(f"| {r['version']} | {r['llm_file']} | {r['vision_file']} | {r['mode']} ({settings}), {r['n_ctx']} "
                     f"| {files:,.0f} | {r['peak_mib']:,.0f} | {r['peak_mib'] / files:.2f} | "
                     f"{r['end_anon_mib']:,.0f} / {r['end_file_mib']:,.0f} | {_fits(r['peak_mib'], 4)} | "
                     f"{_fits(r['peak_mib'], 8)} | {timing} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("checkpoint", type=Path, nargs="?", help="the checkpoint the files were exported from")
    ap.add_argument("--llm", type=Path, action="append", default=[], help="an LLM GGUF (repeatable)")
    ap.add_argument("--vision", type=Path, help="the vision ONNX file")
    ap.add_argument("--resampler", type=Path, help="the resampler weights (2.6-4.5)")
    ap.add_argument("--mode", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=4096, help="context length (the KV cache is sized by it)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, the modes interleaved within each")
    ap.add_argument("--out", type=Path, help="JSON list of rows to append to")
    ap.add_argument("--table", type=Path, help="print the markdown table of this JSON file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    modes = args.mode.split(",")
    if not args.checkpoint or not args.vision or not args.llm or set(modes) - set(MODES):
        ap.error("CHECKPOINT, --vision and at least one --llm are needed; --mode from " + ", ".join(MODES))
    rows = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        image = bench_image_file(None, Path(tmp))     # the bench's generated 448x448 picture
        runs = [(llm, mode) for llm in args.llm for _ in range(args.reps) for mode in modes]
        for llm, mode in runs:
            row = measure(args.checkpoint, llm, args.vision, args.resampler, mode, args.threads, image,
                          args.decode, args.ctx)
            print(table([row]).splitlines()[-1], flush=True)
            rows.append(row)
            if args.out:
                tmp_out = args.out.with_name(args.out.name + ".partial")
                tmp_out.write_text(json.dumps(rows, indent=1) + "\n")
                os.replace(tmp_out, args.out)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
