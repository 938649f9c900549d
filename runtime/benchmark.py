"""`minicpmv-edge bench`: our runtime and llama.cpp's own multimodal path, same weights, same run.

For each path: a warm-up (the vision encoder included: llama.cpp's own warm-up skips it), then N
repetitions of "one image + a question, 128 answer tokens", reporting medians and spread for every stage,
plus cached-image and follow-up-question TTFT (ours), peak RSS, and the decode bound of this machine
(measured memory bandwidth / bytes of weights read per token). Output: a llama-bench-style markdown table
and JSON. Timings here are measurements of this machine on this run; ratios are what transfer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

QUESTION = "Describe this image in detail."


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(float(v))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """Half the range, relative to the median (± %)."""
        if len(self.values) < 2 or not self.median:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / abs(self.median)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "spread": self.spread, "values": self.values}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def memory_bandwidth_gbs(size_mb: int = 1024, reps: int = 5, threads: int = 2) -> float:
    """Read bandwidth, GB/s: `threads` threads at once each sum a large array (numpy releases the GIL in the
    reduction), best of `reps`. A decode step is a read-only stream over the weights, so this is its limit."""
    import threading
    n = size_mb * 2 ** 20 // 4 // threads
    arrays = [np.ones(n, dtype=np.float32) for _ in range(threads)]
    best = float("inf")
    for _ in range(reps):
        workers = [threading.Thread(target=np.add.reduce, args=(a,)) for a in arrays]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return sum(a.nbytes for a in arrays) / best / 1e9


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of weights a decode step reads: every tensor except the token embedding (one row is read)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def _bench_image(path: Path | None) -> Any:
    if path is not None:
        return str(path)
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (448, 448), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 60, 200, 220), fill=(220, 40, 40))
    d.rectangle((240, 80, 400, 240), fill=(40, 90, 220))
    return img


def bench_ours(model, image, reps: int, n_decode: int, max_slices: int | None) -> dict[str, Any]:
    """Our path: a cold first question, then the cached rows. Besides the timings, `reuse` records for each
    row how many prompt positions were computed and how many images came from the image cache, so the
    report shows what each row actually reused."""
    stages = {k: Series() for k in ("preprocess", "vision", "resampler", "prefill", "ttft", "decode_tok_s",
                                    "repeat_ttft", "cached_ttft", "cached_cold_kv_ttft", "followup_ttft",
                                    "slices")}
    reuse: dict[str, dict[str, int]] = {}
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    other = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "What colours are there?"}]}]

    def ask(row: str, messages):
        r = model.chat(messages, greedy=True, max_tokens=n_decode, max_slices=max_slices)
        t = r.timings
        reuse[row] = {"prompt_tokens": t.prompt_tokens, "prefilled_tokens": t.prefilled_tokens,
                      "vision_slices": t.slices, "image_cache_hits": t.image_cache_hits}
        stages[row].add(t.first_token)
        return r

    model.forget()
    model.chat(msgs, greedy=True, max_tokens=n_decode, max_slices=max_slices)     # warm-up, vision included
    for _ in range(reps):
        model.forget()                # a first-time image: vision runs, nothing of the prompt is in the KV cache
        first = ask("ttft", msgs)
        t = first.timings
        for k in ("preprocess", "vision", "resampler", "prefill"):
            stages[k].add(getattr(t, k))
        stages["decode_tok_s"].add(t.decode_tok_s)
        stages["slices"].add(t.slices)
        # the same image and question again (regenerate, a second sample): all of the prompt is in the KV
        # cache but its last position, recomputed for its logits
        ask("repeat_ttft", msgs)
        # the same image, another question: the image cache skips vision and the KV cache holds everything
        # up to the question
        ask("cached_ttft", other)
        # the same image after the context was used for something else: image cache only
        model.decoder.reset()
        ask("cached_cold_kv_ttft", msgs)
        # a follow-up in the same conversation (on random weights the answer may not re-tokenize to the same
        # ids, so its tokens can be prefilled again)
        ask("followup_ttft", msgs + [{"role": "assistant", "content": first.text},
                                     {"role": "user", "content": "Why?"}])
    out: dict[str, Any] = {k: v.as_dict() for k, v in stages.items()}
    out["reuse"] = reuse
    return out


def bench_llama_cpp(llm_gguf: Path, mmproj: Path, image, reps: int, n_decode: int, threads: int,
                    n_ctx: int) -> dict[str, Any]:
    """llama.cpp's own path: mtmd preprocesses, encodes with clip and evaluates; timed from the call."""
    import tempfile
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    from . import llamacpp_log
    llamacpp_log.install()
    if not isinstance(image, str):
        tmp = Path(tempfile.mkdtemp()) / "bench.png"
        image.save(tmp)
        image = str(tmp)
    url = Path(image).resolve().as_uri()
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = llama_cpp.Llama(str(llm_gguf), chat_handler=handler, n_ctx=n_ctx, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    ttft, tok_s = Series(), Series()

    def once():
        llm.reset()
        t0 = time.perf_counter()
        first, n = None, 0
        for chunk in llm.create_chat_completion(messages, temperature=0.0, max_tokens=n_decode, stream=True):
            delta = chunk["choices"][0]["delta"]
            if delta.get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        first = first or end
        return first - t0, (n - 1) / (end - first) if n > 1 and end > first else 0.0
    once()                            # warm-up
    for _ in range(reps):
        a, b = once()
        ttft.add(a)
        tok_s.add(b)
    Image.open(image).close()
    return {"ttft": ttft.as_dict(), "decode_tok_s": tok_s.as_dict()}


def markdown_table(report: dict[str, Any]) -> str:
    ours, base = report["ours"], report.get("llama_cpp")

    def ms(s):
        return f"{s['median'] * 1000:.1f} ± {s['spread'] * 100:.0f}%"
    rows = [("preprocess", ms(ours["preprocess"]), "–", "–"),
            ("vision (all slices)", ms(ours["vision"]), "–", "–"),
            ("resampler", ms(ours["resampler"]), "–", "–"),
            ("prefill", ms(ours["prefill"]), "–", "–")]
    ratio = lambda a, b: f"{a / b:.2f}" if b and b == b else "–"   # noqa: E731
    if base:
        rows.append(("TTFT", ms(ours["ttft"]), ms(base["ttft"]),
                     ratio(ours["ttft"]["median"], base["ttft"]["median"])))
        rows.append(("decode tok/s", f"{ours['decode_tok_s']['median']:.1f}", f"{base['decode_tok_s']['median']:.1f}",
                     ratio(ours["decode_tok_s"]["median"], base["decode_tok_s"]["median"])))
    else:
        rows.append(("TTFT", ms(ours["ttft"]), "–", "–"))
        rows.append(("decode tok/s", f"{ours['decode_tok_s']['median']:.1f}", "–", "–"))
    for key, label in (("repeat_ttft", "same image and question again"), ("cached_ttft", "same image, new question"),
                       ("cached_cold_kv_ttft", "same image, cold KV cache"), ("followup_ttft", "follow-up question")):
        u = ours["reuse"][key]
        what = (f"TTFT, {label} ({u['prefilled_tokens']} of {u['prompt_tokens']} positions computed, "
                f"{u['vision_slices']} slices encoded)")
        rows.append((what, ms(ours[key]), "–", f"{ours[key]['median'] / ours['ttft']['median']:.2f} of first"))
    bound = report["decode_bound"]
    rows.append(("decode bound (bandwidth / bytes per token)", f"{bound['tok_s']:.1f} tok/s", "–",
                 f"ours reaches {ours['decode_tok_s']['median'] / bound['tok_s'] * 100:.0f}%"))
    out = ["| stage | minicpmv-edge | llama.cpp mtmd | ratio |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def run_bench(bundle: Path, *, image: Path | None = None, reps: int = 3, n_decode: int = 128,
              max_slices: int | None = None, threads: int = 2, llm: str | None = None, vision: str | None = None,
              baseline: bool = True, n_ctx: int = 4096) -> dict[str, Any]:
    from .bundle import Bundle, FileKind, load
    b = Bundle.open(bundle)
    model = load(b, llm=llm, vision=vision, threads=threads, n_ctx=n_ctx)
    img = _bench_image(image)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpu": cpu_name(),
        "threads": threads, "bundle": str(bundle), "llm": model.files["llm"].name,
        "vision": model.files["vision"].name, "resampler": type(model.resampler).__name__,
        "n_decode": n_decode, "reps": reps,
    }
    report["ours"] = bench_ours(model, img, reps, n_decode, max_slices)
    report["ours_peak_rss_mb"] = peak_rss_mb()
    llm_path = model.files["llm"]
    model.close()
    bw = memory_bandwidth_gbs(threads=threads)
    per_tok = gguf_bytes_per_token(llm_path)
    report["decode_bound"] = {"bandwidth_gbs": bw, "bytes_per_token": per_tok, "tok_s": bw * 1e9 / per_tok}
    if baseline:
        mm = [f for f in b.files if f.kind == FileKind.MMPROJ_GGUF]
        if mm:
            report["llama_cpp"] = bench_llama_cpp(llm_path, mm[0].path, img, reps, n_decode, threads, n_ctx)
            report["peak_rss_mb_after_both"] = peak_rss_mb()
    return report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge bench", description=__doc__.strip().splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, help="image to ask about (default: a generated 448x448 picture)")
    ap.add_argument("--max-slices", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128, help="answer tokens per repetition (tg128)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llm", help="LLM precision in the bundle")
    ap.add_argument("--vision", help="vision precision in the bundle")
    ap.add_argument("--no-baseline", action="store_true", help="skip llama.cpp's own path")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    report = run_bench(args.bundle, image=args.image, reps=args.reps, n_decode=args.decode,
                       max_slices=args.max_slices, threads=args.threads, llm=args.llm, vision=args.vision,
                       baseline=not args.no_baseline)
    print(f"{report['cpu']} ({report['machine']}), {report['threads']} threads, {report['date']}; "
          f"LLM {report['llm']}, vision {report['vision']}, resampler {report['resampler']}")
    print(markdown_table(report))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".partial")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0
