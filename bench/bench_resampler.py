"""Resampler speed: native kernels (each folding level, 1..T threads) vs numpy vs torch eager vs onnxruntime,
one slice, in one run, on the same random weights.

    .venv/bin/python bench/bench_resampler.py                       # D=4096, N=32x32=1024 patches, f32
    .venv/bin/python bench/bench_resampler.py --dim 2560 --dtype f16 --threads 1,2,4 --json out.json

Every backend is validated against torch eager before it is timed (max |ours - torch| / max |torch|), then
timed with warm-up and repetitions; the table gives medians, the ratio to torch eager at the same thread count,
the FLOPs each plan does and the rate it reached. Load time (which includes the load-time folding) is a column
of its own. Native variants: MVE_KERNEL (or --kernel) pins one. Timings on shared VMs vary by +-30 % run to run.

onnxruntime runs the resampler graph of export/onnx_vision.py (`SliceResampler`, the resampler part of the
"vision_resampler" graph), exported here at the bench's fixed grid; the column says n/a when that module is
missing or the export fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from minicpmv_edge.runtime import resampler as RS


# ---------------------------------------------------------------------------------------------- FLOPs

def flops(plan: str, d: int, c: int, n: int, q: int = 64, head_dim: int = 128) -> float:
    """Multiply-adds x 2 of one slice (matrix products only; LayerNorm/softmax are O(N*D))."""
    hq = d // head_dim * q
    kv = 2 * n * c * d                                   # z = x Wkv^T
    tail = 2 * 2 * q * d * d                             # out_proj, proj
    if plan == "none":
        return kv + 2 * q * d * d + 2 * 2 * n * d * d + 2 * 2 * q * n * d + tail   # Q, K, V proj; QK^T, PV
    if plan == "query":
        return kv + 2 * 2 * hq * n * d + 2 * q * d * d + tail                      # A k^T, P xl, (P xl) Wv_h^T
    if plan == "full":  # LN_kv statistics from ||R x|| (2 N C^2) instead of z (2 N C D)
        return 2 * n * c * c + 2 * 2 * hq * n * c + 2 * q * c * d + tail           # B x^T, P' x, U MT_h^T
    raise ValueError(plan)


def fold_flops(plan: str, d: int, c: int, q: int = 64, head_dim: int = 128) -> float:
    """Load-time folding (the export's float64 Gram + Cholesky for KV_NORM_R, 2 D C^2, is not counted)."""
    hq = d // head_dim * q
    query = 2 * q * d * d + 2 * q * d * d                # Qp = LN_q(query) Wq^T, A_h = Qp_h Wk_h
    return {"none": 0.0, "query": query, "full": query + 2 * hq * d * c + 2 * d * d * c}[plan]


# ---------------------------------------------------------------------------------------------- weights

def random_state(d: int, c: int, q: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Resampler tensors by checkpoint name (without "resampler."), fan-in scaled, LayerNorm gains near 1."""
    rng = np.random.default_rng(seed)
    shapes = {"query": (q, d), "kv_proj.weight": (d, c), "attn.in_proj_weight": (3 * d, d),
              "attn.in_proj_bias": (3 * d,), "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
              "proj": (d, d)}
    state = {}
    for name, shape in shapes.items():
        scale = 0.02 if len(shape) == 1 else shape[-1] ** -0.5
        state[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
    state["query"] *= 4.0
    for ln in ("ln_q", "ln_kv", "ln_post"):
        state[f"{ln}.weight"] = 1 + 0.1 * rng.standard_normal(d, dtype=np.float32)
        state[f"{ln}.bias"] = 0.1 * rng.standard_normal(d, dtype=np.float32)
    return state


def torch_module(state: dict[str, np.ndarray], d: int, c: int, q: int = 64):
    import torch

    from minicpmv_edge.export.checkpoint import ResamplerConfig
    from minicpmv_edge.export.reference import Resampler

    r = Resampler(ResamplerConfig(embed_dim=d, num_heads=d // 128, kv_dim=c, query_num=q))
    r.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return r.eval()


# ---------------------------------------------------------------------------------------------- timing

@dataclass
class Row:
    name: str
    threads: int | str
    gflop: float | None = None
    load_s: float | None = None
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    rel_err: float | None = None
    vs_torch: float | None = None
    note: str = ""


def time_it(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def rel(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def onnx_session(module, x: np.ndarray, h: int, w: int, threads: int, tmp: Path):
    """An ORT session of export/onnx_vision.py's one-slice resampler graph at this fixed grid, or a reason."""
    try:
        import onnxruntime as ort
        import torch

        from minicpmv_edge.export.onnx_vision import SliceResampler
    except Exception as exc:  # noqa: BLE001 - the column just says why it is empty
        return None, f"n/a ({type(exc).__name__}: {exc})"
    path = tmp / "resampler.onnx"
    if not path.exists():
        try:
            import logging
            import warnings

            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")

                class Fixed(torch.nn.Module):
                    def __init__(self):
                        super().__init__()
                        self.inner = SliceResampler(module)

                    def forward(self, feats):
                        return self.inner(feats, h, w)

                prog = torch.onnx.export(Fixed().eval(), (torch.from_numpy(x[None]),), dynamo=True,
                                         opset_version=18, optimize=True, verbose=False,
                                         input_names=["features"], output_names=["image_embeds"])
                prog.save(str(path), external_data=True)
        except Exception as exc:  # noqa: BLE001
            return None, f"n/a (export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096, help="embed_dim D (LLM width)")
    ap.add_argument("--kv-dim", type=int, default=1152, help="ViT width C")
    ap.add_argument("--grid", default="32x32", help="h x w patches of the slice")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="native weights file dtype")
    ap.add_argument("--threads", default="1,2", help="native/torch/ORT thread counts")
    ap.add_argument("--kernel", default=None, help="native variant (generic/avx2/neon); default auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of: torch,numpy,onnx,none,query")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    h, w = (int(v) for v in args.grid.lower().split("x"))
    d, c, n = args.dim, args.kv_dim, h * w
    threads = [int(t) for t in args.threads.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    x = np.random.default_rng(1).standard_normal((n, c), dtype=np.float32)
    state = random_state(d, c)
    rows: list[Row] = []
    torch_ms: dict[int, float] = {}

    with tempfile.TemporaryDirectory(prefix="bench-resampler-") as tmp_name:
        tmp = Path(tmp_name)
        header = RS.ResamplerHeader(RS.WeightDType.parse(args.dtype), d, c, 64, d // 128, 1e-6)
        from minicpmv_edge.export.resampler_weights import write_resampler_file
        path = write_resampler_file(tmp / "resampler.mvr", header, state.__getitem__)

        want = None
        if "torch" not in skip:
            import torch

            module = torch_module(state, d, c)
            with torch.no_grad():
                want = module([torch.from_numpy(x)], [(h, w)])[0].numpy().astype(np.float64)
            for t in threads:
                torch.set_num_threads(t)
                with torch.no_grad():
                    times = time_it(lambda: module([torch.from_numpy(x)], [(h, w)]), args.warmup, args.reps)
                row = Row("torch eager fp32", t, flops("none", d, c, n) / 1e9, times_ms=times, rel_err=0.0,
                          note="reference")
                rows.append(row)
                torch_ms[t] = statistics.median(times)

        for plan in ("full", "query", "none"):
            if plan in skip:
                continue
            for t in threads:
                t0 = time.perf_counter()
                r = RS.NativeResampler(path, threads=t, fold=plan, kernel=args.kernel)
                load = time.perf_counter() - t0
                out = r.run(x, h, w)
                times = time_it(lambda: r.run(x, h, w), args.warmup, args.reps)
                rows.append(Row(f"native {r.kernel} {args.dtype} fold={plan}", r.threads,
                                flops(plan, d, c, n) / 1e9, load, times_ms=times,
                                rel_err=rel(out, want) if want is not None else None,
                                note=f"load folds {fold_flops(plan, d, c) / 1e9:.1f} GFLOP"))
                r.close()

        if "numpy" not in skip:
            npr = RS.NumpyResampler(path)
            out = npr.run(x, h, w)
            times = time_it(lambda: npr.run(x, h, w), args.warmup, args.reps)
            rows.append(Row(f"numpy {args.dtype} weights (unfolded)", "BLAS", flops("none", d, c, n) / 1e9,
                            times_ms=times, rel_err=rel(out, want) if want is not None else None))

        if "onnx" not in skip and "torch" not in skip:
            for t in threads:
                sess, why = onnx_session(module, x, h, w, t, tmp)
                if sess is None:
                    rows.append(Row("onnxruntime fp32 (vision_resampler's resampler)", t, note=why))
                    break
                feed = {sess.get_inputs()[0].name: x[None]}
                out = sess.run(None, feed)[0][0]
                times = time_it(lambda: sess.run(None, feed), args.warmup, args.reps)
                rows.append(Row("onnxruntime fp32 (vision_resampler's resampler)", t, flops("none", d, c, n) / 1e9,
                                times_ms=times, rel_err=rel(out, want)))

    for row in rows:
        if row.times_ms:
            row.median_ms = statistics.median(row.times_ms)
            ref = torch_ms.get(row.threads) or (torch_ms.get(max(torch_ms)) if torch_ms else None)
            row.vs_torch = row.median_ms / ref if ref else None

    print(f"\nresampler, one slice: D={d}, C={c}, grid {h}x{w} (N={n}), Q=64, weights {args.dtype}; "
          f"{args.reps} reps after {args.warmup} warm-up; cpu: {os.cpu_count()} threads")
    print("ratio = median / torch eager median at the same thread count (numpy: vs the most-threaded torch)\n")
    print("| backend | threads | GFLOP | median ms | GFLOP/s | ratio vs torch | max rel err vs torch | load s | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)
        rate = r.gflop / (r.median_ms / 1e3) if r.gflop and r.median_ms else None
        print(f"| {r.name} | {r.threads} | {fmt(r.gflop, '.1f')} | {fmt(r.median_ms, '.1f')} | {fmt(rate, '.1f')} | "
              f"{fmt(r.vs_torch, '.3f')} | {fmt(r.rel_err, '.2e')} | {fmt(r.load_s, '.2f')} | {r.note} |")
    g_none, g_full = flops("none", d, c, n), flops("full", d, c, n)
    print(f"\nFLOPs per slice: unfolded {g_none / 1e9:.1f} G, query-folded {flops('query', d, c, n) / 1e9:.1f} G, "
          f"fully folded {g_full / 1e9:.1f} G ({g_none / g_full:.2f}x fewer)")
    by = {(r.name.split(" fold=")[-1], r.threads): r.median_ms for r in rows if "fold=" in r.name}
    for t in threads:
        if ("none", t) in by and ("full", t) in by:
            print(f"folding saves at {t} thread(s): {by[('none', t)]:.0f} ms -> {by[('full', t)]:.0f} ms "
                  f"({by[('none', t)] / by[('full', t)]:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
