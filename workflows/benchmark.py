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


class OursBench:
    """Our path. `warm_up()` once (vision included), then `rep()` per repetition: a cold first question, then
    the cached rows. Besides timings, `reuse` records per row how many prompt positions were computed and how
    many images came from the image cache, so the report shows what each row actually reused."""

    ROWS = ("preprocess", "vision", "resampler", "prefill", "ttft", "decode_tok_s", "repeat_ttft", "cached_ttft",
            "cached_cold_kv_ttft", "followup_ttft", "slices")

    def __init__(self, model, image, n_decode: int, max_slices: int | None):
        self.model, self.n_decode, self.max_slices = model, n_decode, max_slices
        self.stages = {k: Series() for k in self.ROWS}
        self.reuse: dict[str, dict[str, int]] = {}
        self.msgs = [{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": QUESTION}]}]
        self.other = [{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "What colours are there?"}]}]

    def _ask(self, row: str | None, messages):
        r = self.model.chat(messages, greedy=True, max_tokens=self.n_decode, max_slices=self.max_slices)
        if row is not None:
            t = r.timings
            self.reuse[row] = {"prompt_tokens": t.prompt_tokens, "prefilled_tokens": t.prefilled_tokens,
                               "vision_slices": t.slices, "image_cache_hits": t.image_cache_hits}
            self.stages[row].add(t.first_token)
        return r

    def warm_up(self) -> None:
        self.model.forget()
        self._ask(None, self.msgs)

    def rep(self) -> None:
        m = self.model
        m.forget()                    # a first-time image: vision runs, nothing of the prompt is in the KV cache
        first = self._ask("ttft", self.msgs)
        t = first.timings
        for k in ("preprocess", "vision", "resampler", "prefill"):
            self.stages[k].add(getattr(t, k))
        self.stages["decode_tok_s"].add(t.decode_tok_s)
        self.stages["slices"].add(t.slices)
        # the same image and question again (regenerate, a second sample): all of the prompt is in the KV
        # cache but its last position, recomputed for its logits
        self._ask("repeat_ttft", self.msgs)
        # the same image, another question: the image cache skips vision and the KV cache holds everything
        # up to the question
        self._ask("cached_ttft", self.other)
        # the same image after the context was used for something else: image cache only
        m.decoder.reset()
        self._ask("cached_cold_kv_ttft", self.msgs)
        # a follow-up in the same conversation (on random weights the answer may not re-tokenize to the same
        # ids, so its tokens can be prefilled again)
        self._ask("followup_ttft", self.msgs + [{"role": "assistant", "content": first.text},
                                                {"role": "user", "content": "Why?"}])

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.as_dict() for k, v in self.stages.items()}
        out["reuse"] = self.reuse
        return out


class LlamaCppBench:
    """llama.cpp's own path: mtmd preprocesses, encodes with clip and evaluates; timed from the call. Decode
    tok/s counts the positions llama.cpp evaluated after the first token (not text chunks, which merge
    tokens that end inside a UTF-8 character)."""

    def __init__(self, llm_gguf: Path, mmproj: Path, image, n_decode: int, threads: int, n_ctx: int):
        import tempfile

        import llama_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler

        from minicpmv_edge.runtime import llamacpp_log
        llamacpp_log.install()
        self._tmp = None
        if not isinstance(image, str):
            self._tmp = tempfile.TemporaryDirectory()
            path = Path(self._tmp.name) / "bench.png"
            image.save(path)
            image = str(path)
        url = Path(image).resolve().as_uri()
        handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
        self.llm = llama_cpp.Llama(str(llm_gguf), chat_handler=handler, n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, seed=0)
        self.messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}]
        self.n_decode = n_decode
        self.ttft, self.tok_s = Series(), Series()

    def _once(self) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n_at_first = 0
        for chunk in llm.create_chat_completion(self.messages, temperature=0.0, max_tokens=self.n_decode,
                                                stream=True):
            if first is None and chunk["choices"][0]["delta"].get("content") is not None:
                first, n_at_first = time.perf_counter(), llm.n_tokens
        end = time.perf_counter()
        first = first or end
        steps = llm.n_tokens - n_at_first
        return first - t0, steps / (end - first) if steps > 0 and end > first else 0.0

    def warm_up(self) -> None:
        self._once()

    def rep(self) -> None:
        a, b = self._once()
        self.ttft.add(a)
        self.tok_s.add(b)

    def result(self) -> dict[str, Any]:
        return {"ttft": self.ttft.as_dict(), "decode_tok_s": self.tok_s.as_dict()}

    def close(self) -> None:
        self.llm.close()
        if self._tmp is not None:
            self._tmp.cleanup()


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
    """Both paths are loaded and warmed up, then their repetitions alternate (ours, llama.cpp, ours, ...): on a
    shared or thermally throttled machine the speed drifts over minutes, and alternating keeps the drift out
    of the ratios."""
    from minicpmv_edge.runtime.bundle import Bundle, FileKind, load
    b = Bundle.open(bundle)
    model = load(b, llm=llm, vision=vision, threads=threads, n_ctx=n_ctx)
    img = _bench_image(image)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpu": cpu_name(),
        "threads": threads, "bundle": str(bundle), "llm": model.files["llm"].name,
        "vision": model.files["vision"].name, "resampler": type(model.resampler).__name__,
        "n_decode": n_decode, "reps": reps, "order": "interleaved",
    }
    llm_path = model.files["llm"]
    ours = OursBench(model, img, n_decode, max_slices)
    ours.warm_up()
    report["ours_peak_rss_mb"] = peak_rss_mb()        # before llama.cpp's copy is loaded
    base = None
    mm = [f for f in b.files if f.kind == FileKind.MMPROJ_GGUF]
    if baseline and mm:
        base = LlamaCppBench(llm_path, mm[0].path, img, n_decode, threads, n_ctx)
        base.warm_up()
    for _ in range(reps):
        ours.rep()
        if base:
            base.rep()
    report["ours"] = ours.result()
    if base:
        report["llama_cpp"] = base.result()
        report["peak_rss_mb_after_both"] = peak_rss_mb()
        base.close()
    model.close()
    bw = memory_bandwidth_gbs(threads=threads)
    per_tok = gguf_bytes_per_token(llm_path)
    report["decode_bound"] = {"bandwidth_gbs": bw, "bytes_per_token": per_tok, "tok_s": bw * 1e9 / per_tok}
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
