"""What padding short prompt batches to a whole kernel pass buys: question-only TTFTs with the decoder's padding
on (`gemm_rows` 16, the default on x86 where llama.cpp repacks) and off (0), same model, same run.

    .venv/bin/python bench/bench_prompt_batches.py BUNDLE [--llm Q4_K_M] [--vision int8] [--reps 6] [--json F]

A/B interleaved rep by rep (the order alternates). Each rep, per side: a cold question about a 448x448 image
(`minicpmv-edge bench`'s QUESTION), then "same image, new question" (the KV cache holds everything up to the
question: 14 positions of edge-4b's prompt, padded to 16 when on), then the image prepared ahead with
`prepare_image` and the question after it (18 positions: no padding either way, a control). One answer token
each: these are TTFTs. Reported: medians with min-max and each row's share of the cold TTFT.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import minicpmv_edge
from minicpmv_edge.workflows.benchmark import QUESTION
from minicpmv_edge.workflows.benchmark import _image_messages as _messages
from minicpmv_edge.workflows.demo import demo_image

ROWS = ("cold", "new_question", "prepared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--llm", default="Q4_K_M")
    ap.add_argument("--vision", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    image = str(Path(tempfile.mkdtemp()) / "image448.png")
    demo_image(448).save(image)
    model = minicpmv_edge.load(args.bundle, llm=args.llm, vision=args.vision, threads=args.threads)
    ask = lambda messages: model.chat(messages, greedy=True, max_tokens=1).timings     # noqa: E731
    ask(_messages(image, QUESTION))                                                     # warm-up
    sides = {rows: {r: [] for r in ROWS} | {"positions": {}} for rows in (0, 16)}
    for rep in range(args.reps):
        for rows in ((0, 16) if rep % 2 == 0 else (16, 0)):
            model.decoder.gemm_rows = rows
            out = sides[rows]
            model.forget()
            out["cold"].append(ask(_messages(image, QUESTION)).first_token)
            t = ask(_messages(image, "What colours are there?"))
            out["new_question"].append(t.first_token)
            out["positions"]["new_question"] = t.prefilled_tokens
            model.forget()
            prepared = model.prepare_image(image)
            t = ask([{"role": "user", "content": [prepared, {"type": "text", "text": QUESTION}]}])
            out["prepared"].append(t.first_token)
            out["positions"]["prepared"] = t.prefilled_tokens
    model.close()
    report = {"bundle": str(args.bundle), "llm": args.llm, "vision": args.vision, "threads": args.threads,
              "reps": args.reps, "sides": {}}
    for rows, out in sides.items():
        med = {r: statistics.median(out[r]) for r in ROWS}
        report["sides"][f"gemm_rows={rows}"] = {"median_s": med, "values_s": {r: out[r] for r in ROWS},
                                                "positions": out["positions"]}
        print(f"gemm_rows={rows:2d}: cold {med['cold']:.2f} s | " + " | ".join(
            f"{r} ({out['positions'][r]} positions) {med[r]:.3f} s ({min(out[r]):.3f}-{max(out[r]):.3f}) "
            f"= {med[r] / med['cold']:.3f} of cold" for r in ROWS[1:]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
