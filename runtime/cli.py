"""`minicpmv-edge run`, `chat` and `serve`: the runtime from the command line (no torch)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from minicpmv_edge.facts import MAX_SLICE_NUMS

from .bundle import VISION_BACKENDS


def _load_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("bundle", type=Path, help="bundle folder written by `minicpmv-edge export`")
    ap.add_argument("--llm", help="LLM precision to load (e.g. Q4_K_M, Q8_0, F16; default: the smallest good one)")
    ap.add_argument("--vision", help="vision precision (fp32, fp16, int8)")
    ap.add_argument("--vision-kind", choices=tuple(VISION_BACKENDS),
                    help="which vision file runs (default: the first of these the bundle has and this machine runs)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the sha256 check of the files loaded (checked once per file version, then cached)")
    ap.add_argument("--resampler", default="auto", choices=("auto", "native", "numpy"))
    ap.add_argument("--threads", type=int, help="CPU threads (default: the physical cores this process may use)")
    ap.add_argument("--ctx", type=int, default=4096, help="context length in tokens")
    ap.add_argument("--low-memory", action="store_true",
                    help="keep the LLM weights in evictable file pages (mmap, no repacked copy: slower matmuls), "
                         "a q8_0 KV cache and 128-token prompt micro-batches, and free the vision session between "
                         "requests (reloaded per request)")


def _load(args):
    from .bundle import load
    return load(args.bundle, llm=args.llm, vision=args.vision, vision_kind=args.vision_kind, resampler=args.resampler,
                threads=args.threads, n_ctx=args.ctx, verify=not args.no_verify, low_memory=args.low_memory)


def _gen_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--think", action="store_true", help="thinking mode (models that have one)")
    ap.add_argument("--seed", type=int, help="sampling seed (same seed, same answer)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--max-slices", type=int, help=f"slices per image, 1-{MAX_SLICE_NUMS} (default: the model's; fewer = faster on a phone)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--greedy", action="store_true", help="argmax decoding")


def _chat_kwargs(args) -> dict:
    return dict(thinking=args.think, seed=args.seed, max_tokens=args.max_tokens, max_slices=args.max_slices,
                temperature=args.temperature, greedy=args.greedy)


def run_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge run", description="Ask one question about images.")
    _load_args(ap)
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    ap.add_argument("--video", help="video file (4.5: frames packed through the temporal resampler)")
    ap.add_argument("--fps", type=float, default=3.0, help="video frames sampled per second")
    ap.add_argument("--packing", type=int, help="video frames per 64-token block (1-6; default: the recipe's)")
    ap.add_argument("-p", "--prompt", required=True)
    ap.add_argument("--json", action="store_true", help="print the answer, its boxes and the stage timings as JSON")
    ap.add_argument("--draw", type=Path, metavar="OUT.png",
                    help="write the last image with the answer's boxes and points drawn on it (PNG or JPEG)")
    _gen_args(ap)
    args = ap.parse_args(argv)
    if args.draw:
        _check_draw_target(args.draw, args.image)
    model = _load(args)
    content = [{"type": "image_url", "image_url": {"url": str(p)}} for p in args.image]
    if args.video:
        content.append({"type": "video", "video": args.video, "fps": args.fps, "packing": args.packing})
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    if args.json:
        res = model.chat(messages, **_chat_kwargs(args))
        if args.draw:
            _draw(args.draw, args.image[-1], res)
        print(json.dumps({"answer": res.text, "reasoning": res.reasoning, "finish_reason": res.finish_reason,
                          "boxes": [b.as_dict() for b in res.boxes], "timings": res.timings.as_dict()},
                         ensure_ascii=False, indent=2))
        return 0
    result = None
    for ev in model.chat(messages, stream=True, **_chat_kwargs(args)):
        if ev.result is not None:
            result = ev.result
        elif ev.delta:
            sys.stdout.write(ev.delta)
            sys.stdout.flush()
    t = result.timings
    if t.video_frames:
        print(f"\n[video: {t.video_frames} frames -> {t.video_blocks} blocks of 64 tokens, decoded in "
              f"{t.video_decode * 1000:.0f} ms]", file=sys.stderr, end="")
    print(f"\n[ttft {t.first_token * 1000:.0f} ms (preprocess {t.preprocess * 1000:.0f}, vision {t.vision * 1000:.0f}, "
          f"resampler {t.resampler * 1000:.0f}, prefill {t.prefill * 1000:.0f}) | decode {t.decode_tok_s:.1f} tok/s]",
          file=sys.stderr)
    if args.draw:
        _draw(args.draw, args.image[-1], result)
        print(f"[{len(result.boxes)} boxes/points drawn on {args.draw}]", file=sys.stderr)
    return 0


def _check_draw_target(out: Path, images: list[str]) -> None:
    """Refuse a --draw that cannot be written before the model runs, not after."""
    from PIL import Image

    from minicpmv_edge.errors import MiniCPMVEdgeError
    if not images:
        raise MiniCPMVEdgeError("--draw needs an --image to draw on")
    if Image.registered_extensions().get(out.suffix.lower()) not in ("PNG", "JPEG"):
        raise MiniCPMVEdgeError(f"--draw {out}: write a .png or .jpg file")
    if not out.resolve().parent.is_dir():
        raise MiniCPMVEdgeError(f"--draw {out}: folder {out.resolve().parent} does not exist")


def _draw(out: Path, image_path: str, result) -> None:
    """The answer's boxes on the image they refer to (the last one), written whole or not at all."""
    from PIL import Image

    from minicpmv_edge.errors import MiniCPMVEdgeError

    from .grounding import draw
    from .images import load_image
    drawn = draw(load_image(image_path).image, result.boxes)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        drawn.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
        os.replace(tmp, out)
    except OSError as exc:
        raise MiniCPMVEdgeError(f"--draw {out}: cannot write it ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def chat_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge chat", description="Interactive chat. Type /image PATH to "
                                 "attach an image to the next message, /reset to start over, /quit to leave.")
    _load_args(ap)
    _gen_args(ap)
    args = ap.parse_args(argv)
    model = _load(args)
    from minicpmv_edge.errors import MiniCPMVEdgeError
    history: list[dict] = []
    pending: list[dict] = []
    print("minicpmv-edge chat: /image PATH, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, pending = [], []
            continue
        if line.startswith("/image "):
            pending.append({"type": "image_url", "image_url": {"url": line[7:].strip()}})
            continue
        msg = {"role": "user", "content": [*pending, {"type": "text", "text": line}]}
        try:
            result = None
            for ev in model.chat([*history, msg], stream=True, **_chat_kwargs(args)):
                if ev.result is not None:
                    result = ev.result
                elif ev.delta:
                    sys.stdout.write(ev.delta)
                    sys.stdout.flush()
            print()
            history += [msg, {"role": "assistant", "content": result.text}]
            pending = []
        except MiniCPMVEdgeError as exc:   # a bad image or an overflow ends this turn, not the session
            print(f"error: {exc}", file=sys.stderr)


def serve_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge serve", description="OpenAI-compatible local server.")
    _load_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--name", help="model id served (default: the bundle's name)")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--allow-local-files", action="store_true", help="accept local paths and file:// URLs as "
                    "image and video sources")
    ap.add_argument("--allow-dir", action="append", default=[], help="with --allow-local-files: only files inside "
                    "this folder (repeat for several)")
    ap.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image/video URLs (allow-listed)")
    ap.add_argument("--allow-host", action="append", default=[], help="host allowed for remote URLs")
    ap.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    ap.add_argument("--strict-model-name", action="store_true",
                    help="answer 404 to a 'model' other than --name (default: any name is served)")
    ap.add_argument("--api-key", default=os.environ.get("MINICPMV_EDGE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health "
                         "(default: $MINICPMV_EDGE_API_KEY; unset: no key)")
    ap.add_argument("--cors-origin", action="append", default=[],
                    help="browser origin allowed to call the server, e.g. http://localhost:3000 (repeatable; "
                         "'*' for any; default: CORS off)")
    args = ap.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        from minicpmv_edge.errors import MissingExtraError
        raise MissingExtraError("serve", "uvicorn") from None
    from .server import ServerOptions, create_app, make_server
    model = _load(args)
    name = args.name or model.bundle.name or "minicpm-v"
    opts = ServerOptions(name=name, max_queue=args.max_queue, allow_local_files=args.allow_local_files,
                         local_roots=tuple(args.allow_dir), allow_remote_urls=args.allow_remote_urls,
                         remote_allow_hosts=tuple(h.lower() for h in args.allow_host), docs=args.docs,
                         strict_model_name=args.strict_model_name, api_key=args.api_key or None,
                         cors_origins=tuple(args.cors_origin))
    make_server(create_app(model, opts), args.host, args.port, opts).run()
    return 0
