"""Importance-matrix sweep: mean KLD and top-1 vs F16 for Q2_K, Q3_K_M, IQ4_XS, Q4_K_M quantized with no imatrix,
a text-only imatrix and an image+text imatrix, on the sweep's held-out image+text prompts (the calibration set is
`quantize/imatrix.py`'s built-in one: other images, other questions).

    python bench/imatrix_sweep.py --out imatrix-sweep                 # a ~100M-parameter stand-in, minutes
    python bench/imatrix_sweep.py --out imatrix-sweep --checkpoint edge4b      # real size (hours on 2 cores)

Without --checkpoint it synthesizes MiniCPM-V 4.5 with the tiny vision tower and a mid-size LLM (hidden 1024,
8 blocks, K-quant-friendly widths): big enough that every K/IQ type applies to every matrix, small enough for a
shared 2-core machine. It is a thin wrapper over `minicpmv-edge sweep` (same files, same result log).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

TYPES = "Q2_K,Q3_K_M,IQ4_XS,Q4_K_M,F16"


def synthesize_mid(out: Path) -> Path:
    from minicpmv_edge.export import synth
    mid = dataclasses.replace(synth.TINY_LLM, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=128, intermediate_size=2816)
    synth.TINY_LLM = mid   # the "tiny" recipe with this LLM; the process ends after the sweep
    return synth.synthesize("4.5", "tiny", out, seed=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, help="default: synthesize the mid-size stand-in into OUT/ckpt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = args.out / "ckpt"
        if not (ckpt / "config.json").is_file():
            synthesize_mid(ckpt)
    from minicpmv_edge.workflows.sweep import main as sweep
    rc = sweep([str(ckpt), "--out", str(args.out / "sweep"), "--llm", TYPES, "--vision", "fp32", "--slices", "1",
                "--imatrix", "none,text,image", "--measure", "quality", "--mmproj", "F16,Q8_0,Q6_K",
                "--discard-quantized", "--threads", str(args.threads)])
    plot(json.loads((args.out / "sweep" / "sweep.json").read_text())["rows"], args.out / "imatrix.png")
    print(f"wrote {args.out / 'imatrix.png'}")
    return rc


def plot(rows: list[dict], path: Path) -> None:
    """Mean KLD and top-1 per type, one bar per imatrix mode (the sweep's own plot is size vs KLD)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    types = [t for t in TYPES.split(",") if t != "F16"]
    modes = (("none", "no imatrix"), ("text", "text-only imatrix"), ("image", "image+text imatrix"))
    by = {(r["llm"], r["imatrix"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in ((axes[0], "kld_mean", "mean KLD vs F16 (log)"), (axes[1], "top1", "top-1 vs F16")):
        for k, (mode, name) in enumerate(modes):
            xs = [i + (k - 1) * 0.27 for i in range(len(types))]
            ax.bar(xs, [by[(t, mode)][col] if (t, mode) in by else 0 for t in types], width=0.27, label=name)
        ax.set_xticks(range(len(types)), types)
        ax.set(ylabel=label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title("synthetic weights: the ordering is the finding")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
