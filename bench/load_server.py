"""Bounded load test of `minicpmv-edge serve` on loopback: N concurrent clients mixing image and text requests
for a fixed time, then a report (status counts, latency percentiles, RSS before/after warm-up) and an exit
code that says whether it held: no 5xx other than the queue-full 503, no crash, RSS within 10 % after warm-up.

    python bench/load_server.py [--bundle DIR] [--clients 32] [--seconds 120]

Without --bundle it exports a tiny synthetic 4.5 bundle first. Only 127.0.0.1 is ever contacted.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_bundle(workdir: Path) -> Path:
    from minicpmv_edge.workflows.pipeline import export_checkpoint
    from minicpmv_edge.export.synth import synthesize
    ckpt = synthesize("4.5", "tiny", workdir / "ckpt")
    export_checkpoint(ckpt, workdir / "bundle", llm_types=["Q4_K_M"], mmproj_types=[], vision_types=["fp32"],
                      resampler_types=["f32"], name="tiny")
    return workdir / "bundle"


def _images() -> list[str]:
    from PIL import Image, ImageDraw
    urls = []
    for i, size in enumerate([(448, 448), (800, 600), (300, 900)]):
        img = Image.new("RGB", size, (40 * i, 120, 200))
        ImageDraw.Draw(img).ellipse((20, 20, 200, 200), fill=(250, 200 - 50 * i, 30))
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds before the RSS baseline is taken")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.seconds = min(args.seconds, 300.0)     # bounded: never more than 5 minutes of traffic

    work = Path(tempfile.mkdtemp(prefix="load-"))
    bundle = args.bundle or _tiny_bundle(work)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "minicpmv_edge", "serve", str(bundle), "--port", str(port),
                               "--name", "m", "--max-queue", "16"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            print("server did not start:", server.stderr.read().decode()[-2000:])
            return 2
        images = _images()
        stop_at = time.time() + args.seconds
        lock = threading.Lock()
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        errors: list[str] = []

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(timeout=120) as http:
                while time.time() < stop_at:
                    content = [{"type": "text", "text": rng.choice(["Describe it.", "What colour?", "Count."])}]
                    if rng.random() < 0.6:
                        content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
                    body = {"model": "m", "messages": [{"role": "user", "content": content}],
                            "max_tokens": rng.randint(4, 24), "stream": rng.random() < 0.3, "seed": k}
                    t0 = time.perf_counter()
                    try:
                        r = http.post(base + "/v1/chat/completions", json=body)
                        code = r.status_code
                        if code == 503:
                            time.sleep(float(r.headers.get("retry-after", "1")))
                    except httpx.HTTPError as exc:
                        code = 0
                        with lock:
                            errors.append(repr(exc)[:200])
                    with lock:
                        statuses[code] = statuses.get(code, 0) + 1
                        if code == 200:
                            latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(min(args.warmup, args.seconds / 4))
        rss_after_warmup = _rss_mb(server.pid)
        rss_samples, health_s = [], []
        while any(t.is_alive() for t in threads):
            rss_samples.append(_rss_mb(server.pid))
            t0 = time.perf_counter()
            try:
                httpx.get(base + "/health", timeout=30)
                health_s.append(time.perf_counter() - t0)
            except httpx.HTTPError:
                health_s.append(float("inf"))
            time.sleep(2)
        for t in threads:
            t.join()
        alive = server.poll() is None
        healthy = alive and httpx.get(base + "/health", timeout=5).status_code == 200
        rss_end = _rss_mb(server.pid) if alive else float("nan")
        lat = sorted(latencies)
        pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))  # noqa: E731
        bad_5xx = {c: n for c, n in statuses.items() if 500 <= c < 600 and c != 503}
        growth = (max(rss_samples) - rss_after_warmup) / rss_after_warmup if rss_samples else 0.0
        kinds: dict[str, int] = {}
        for e in errors:
            kinds[e.split("(")[0]] = kinds.get(e.split("(")[0], 0) + 1
        report = {"clients": args.clients, "seconds": args.seconds, "statuses": statuses, "client_errors": len(errors),
                  "client_error_kinds": kinds,
                  "ok_requests": len(lat), "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
                  "rss_mb": {"after_warmup": rss_after_warmup, "max": max(rss_samples or [rss_end]), "end": rss_end},
                  "rss_growth_after_warmup": growth, "health_max_s": max(health_s or [float("nan")]),
                  "server_alive": alive, "healthy_after": healthy}
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        held = alive and healthy and not bad_5xx and not errors and growth <= 0.10
        print("HELD" if held else "FAILED")
        return 0 if held else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    raise SystemExit(main())
