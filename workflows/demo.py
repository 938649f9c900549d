"""`minicpmv-edge demo`: the whole pipeline on a built-in default, on a fresh machine, in under a minute.

1. synthesize a tiny MiniCPM-V checkpoint (random weights, real layout and tokenizer);
2. read and validate it;
3. export it to a bundle: LLM GGUF ladder, llama.cpp mmproj, ONNX vision tower, native resampler weights,
   manifest.json;
4. ask a question about a generated image with the on-device runtime (no torch: ONNX Runtime, our
   resampler kernels, llama.cpp with injected embeddings), and check the greedy answer against the torch
   reference; then ask llama.cpp's own multimodal path on the same files.

The weights are random, so the answers are noise; the demo shows every stage runs and agrees.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from minicpmv_edge.facts import SUPPORTED_VERSIONS

QUESTION = "What shapes are in this picture?"


def demo_image(size: int = 448) -> Image.Image:
    """A picture with a few coloured shapes (deterministic)."""
    img = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 60, 200, 220), fill=(220, 40, 40))
    d.rectangle((240, 80, 400, 240), fill=(40, 90, 220))
    d.polygon([(120, 420), (220, 260), (320, 420)], fill=(40, 170, 70))
    return img


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.perf_counter()


def _llama_cpp_answer(llm_path: Path, mmproj_path: Path, image_path: Path, max_tokens: int) -> str:
    """llama.cpp's own multimodal path (mtmd) on our GGUF + mmproj: the baseline our runtime is measured
    against."""
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=str(mmproj_path), verbose=False)
    llm = llama_cpp.Llama(str(llm_path), chat_handler=handler, n_ctx=2048, n_threads=2, verbose=False, seed=0)
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_path.as_uri()}},
                                               {"type": "text", "text": QUESTION}]}],
        temperature=0.0, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge demo", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--version", default="4.5", choices=SUPPORTED_VERSIONS)
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="working folder (default ./demo-out)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    args.out = args.out.resolve()   # file URIs (llama.cpp's image path) need an absolute path

    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.workflows.pipeline import export_checkpoint
    from minicpmv_edge.export.reference import MiniCPMVReference
    from minicpmv_edge.export.synth import synthesize

    t_all = time.perf_counter()
    ckpt_dir = args.out / f"MiniCPM-V-{args.version}-tiny"
    t = _step(f"synthesize a tiny MiniCPM-V {args.version} checkpoint -> {ckpt_dir}")
    synthesize(args.version, "tiny", ckpt_dir, overwrite=True)
    print(f"    {time.perf_counter() - t:.1f} s")

    t = _step("read and validate it")
    ckpt = Checkpoint.open(ckpt_dir)
    info = ckpt.summary()
    print(f"    {info['llm_arch']} LLM {info['parameters']['llm'] / 1e6:.1f} M params, "
          + ", ".join(f"{'ViT' if role == 'vision' else role} {n / 1e6:.2f} M"
                      for role, n in info["parameters"].items() if role != "llm"))

    bundle = args.out / "bundle"
    t = _step(f"export a bundle -> {bundle}")
    res = export_checkpoint(ckpt_dir, bundle, llm_types=["F32", "Q4_K_M", "Q8_0"], mmproj_types=["F16"],
                            vision_types=["fp32"], resampler_types=["f32"])
    for f in res.files:
        print(f"    {f.kind:<18} {f.precision or '':<7} {Path(f.path).name:<40} {Path(f.path).stat().st_size / 2**20:6.2f} MiB")
    for note in res.notes:
        print(f"    note: {note}")

    print(f"    {time.perf_counter() - t:.1f} s")
    image_path = args.out / "shapes.png"
    demo_image().save(image_path)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image_path)}},
                                             {"type": "text", "text": QUESTION}]}]

    from minicpmv_edge.runtime.bundle import FileKind, load
    t = _step(f"runtime (no torch), F32 GGUF: {QUESTION!r} about {image_path}")
    model = load(bundle, llm="F32", exact=True)
    answer = model.chat(messages, greedy=True, max_tokens=args.max_tokens)
    tm = answer.timings
    print(f"    {answer.text!r}")
    print(f"    TTFT {tm.first_token * 1000:.0f} ms (preprocess {tm.preprocess * 1000:.0f}, vision {tm.vision * 1000:.0f}, "
          f"resampler {tm.resampler * 1000:.0f}, prefill {tm.prefill * 1000:.0f}), decode {tm.decode_tok_s:.0f} tok/s")
    again = model.chat(messages, greedy=True, max_tokens=args.max_tokens)
    print(f"    asked again: image cache hit, KV reuse; TTFT {again.timings.first_token * 1000:.0f} ms, "
          f"same answer: {again.token_ids == answer.token_ids}")
    model.close()

    if ckpt.resampler is not None:
        t = _step("torch reference, same question (greedy)")
        ref = MiniCPMVReference.from_checkpoint(ckpt)
        ids = ref.generate_greedy([{"role": "user", "content": QUESTION}], images=[Image.open(image_path)],
                                  max_new_tokens=args.max_tokens)
    else:   # transformers-native (4.6): transformers' own processor and model are the reference
        from minicpmv_edge.export.reference_native import native_greedy, native_model, native_processor
        t = _step("transformers reference (its own processor and generate), same question (greedy)")
        _, ids = native_greedy(native_model(ckpt_dir), native_processor(ckpt_dir),
                               [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                               [Image.open(image_path)], max_new_tokens=args.max_tokens)
    same = ids == answer.token_ids
    print(f"    {len(ids)} tokens in {time.perf_counter() - t:.1f} s; identical to the runtime's: {same}")

    t = _step("llama.cpp's own multimodal path (mtmd) on the exported Q8_0 GGUF + mmproj")
    lc_text = _llama_cpp_answer(res.path(FileKind.LLM_GGUF, "Q8_0"), res.path(FileKind.MMPROJ_GGUF, "F16"),
                                image_path, args.max_tokens)
    print(f"    {time.perf_counter() - t:.1f} s: {lc_text!r} (llama.cpp slices and prompts a little differently)")

    summary = {"version": args.version, "checkpoint": str(ckpt_dir), "bundle": str(bundle),
               "runtime_answer": answer.text, "runtime_timings": tm.as_dict(), "reference_identical": same,
               "llama_cpp_answer": lc_text}
    (args.out / "demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"done in {time.perf_counter() - t_all:.1f} s (random weights: the answers are noise). "
          f"Summary: {args.out / 'demo.json'}")
    return 0 if same else 1
