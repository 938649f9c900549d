"""A hostile-request corpus against the live server (tiny 4.5 bundle, loopback): several hundred requests, each
with the status it must get, built from the classes of attack an adversarial pass found (local file reads through
every part shape, SSRF through redirects / rebinding / slow servers, memory and compute from small requests,
limit bypasses, malformed fields, control-token injection). Must hold: no 5xx, no local file opened, RSS after
the corpus within 10 % of before, /health under 1 s throughout, no ViT run for a request refused by the cheap
checks. SSRF cases run against loopback servers this file starts; the server treats 127.0.0.1 (only) as public
through its test-only `remote_trusted_networks` option.
"""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

import minicpmv_edge
from minicpmv_edge.workflows.demo import demo_image
from test_server import serving  # noqa: E402 (tests/ is on sys.path under pytest)

uvicorn = pytest.importorskip("uvicorn")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _raw_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose header says width x height; IDAT holds little (Pillow reads the size from IHDR alone)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    if idat is None:
        idat = zlib.compress((b"\0" + b"\x80" * width * 3) * height) if width * height < 4_000_000 else \
            zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ loopback servers

class _Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _origin(host: str, port_of_other: dict) -> tuple[_Origin, dict]:
    """A loopback web server with the routes the SSRF cases need; counts hits per path."""
    hits: dict[str, int] = {}
    png = _png(demo_image(64))

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, body=b"", headers=()):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            if not any(k.lower() == "content-length" for k, _ in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server API)
            hits[self.path] = hits.get(self.path, 0) + 1
            me = f"http://{host}:{self.server.server_address[1]}"
            other = f"http://127.0.0.2:{port_of_other.get('port', 1)}"
            routes = {
                "/img.png": lambda: self._send(200, png, [("Content-Type", "image/png")]),
                "/redirect-ok": lambda: self._send(302, headers=[("Location", "/img.png")]),
                "/redirect-private": lambda: self._send(302, headers=[("Location", other + "/img.png")]),
                "/redirect-ftp": lambda: self._send(302, headers=[("Location", "ftp://127.0.0.1/x.png")]),
                "/redirect-file": lambda: self._send(302, headers=[("Location", "file:///etc/passwd")]),
                "/redirect-gopher": lambda: self._send(302, headers=[("Location", "gopher://127.0.0.1/")]),
                "/redirect-unlisted": lambda: self._send(302, headers=[("Location", "http://example.org/a.png")]),
                "/redirect-loop": lambda: self._send(302, headers=[("Location", me + "/redirect-loop")]),
                "/redirect-empty": lambda: self._send(302),
                "/redirect-creds": lambda: self._send(302, headers=[("Location", f"http://u:p@{host}/img.png")]),
                "/redirect-v6": lambda: self._send(302, headers=[("Location", "http://[::1]/img.png")]),
                "/redirect-metadata": lambda: self._send(302, headers=[("Location",
                                                                          "http://169.254.169.254/latest")]),
                "/notfound": lambda: self._send(404, b"no"),
                "/error": lambda: self._send(500, b"boom"),
                "/big": lambda: self._send(200, b"", [("Content-Length", str(10 ** 10))]),
                "/not-image": lambda: self._send(200, b"hello" * 100),
            }
            if self.path in routes:
                routes[self.path]()
            elif self.path == "/big-chunked":      # no Content-Length: the byte cap must stop the read
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(200):
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass
            elif self.path == "/slow":             # a slow drip: the total deadline must stop it
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    for _ in range(100):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass
            else:
                self._send(404)

    srv = _Origin((host, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, hits


@pytest.fixture(scope="module")
def origins():
    other_port: dict = {}
    private, private_hits = _origin("127.0.0.2", other_port)
    other_port["port"] = private.server_address[1]
    public, public_hits = _origin("127.0.0.1", other_port)
    yield {"public": f"http://127.0.0.1:{public.server_address[1]}", "public_hits": public_hits,
           "private": f"http://127.0.0.2:{private.server_address[1]}", "private_hits": private_hits,
           "public_port": public.server_address[1]}
    public.shutdown()
    private.shutdown()


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    """Local files the server must never open: a real image, a symlink to it, a secret beside them."""
    root = tmp_path_factory.mktemp("canary")
    (root / "photo.png").write_bytes(_png(demo_image(64)))
    (root / "secret.txt").write_text("do not read")
    (root / "link.png").symlink_to(root / "photo.png")
    return root


@pytest.fixture(scope="module")
def live(tiny_bundle, origins):
    from minicpmv_edge.runtime.server import ServerOptions
    model = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    vit_runs = {"n": 0}
    encode = model.vision.encode

    def counting_encode(s):
        vit_runs["n"] += 1
        return encode(s)
    model.vision.encode = counting_encode
    opts = ServerOptions(name="tiny", max_queue=4, max_body_bytes=4 * 2 ** 20, max_image_bytes=2 * 2 ** 20,
                         max_video_bytes=2 * 2 ** 20, max_images=8, max_frames=64,
                         allow_remote_urls=True, remote_allow_hosts=("127.0.0.1", "rebind.test", "127.0.0.2"),
                         remote_trusted_networks=("127.0.0.1/32",), remote_timeout_s=2.0, strict_model_name=True)
    with serving(model, opts) as base:
        yield {"base": base, "model": model, "vit_runs": vit_runs}
    model.close()


# ------------------------------------------------------------------------------------------------ the corpus

GOOD = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def _with_part(part: dict, text: str = "describe") -> dict:
    return {**GOOD, "messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}]}


def _part_shapes(source) -> list[tuple[str, dict]]:
    """Every part shape that carries an image or video source."""
    return [("image_url", {"type": "image_url", "image_url": {"url": source}}),
            ("image_url-str", {"type": "image_url", "image_url": source}),
            ("input_image", {"type": "input_image", "image_url": source}),
            ("image", {"type": "image", "image": source}),
            ("video", {"type": "video", "video": source}),
            ("video_url", {"type": "video_url", "video_url": {"url": source}}),
            ("frames", {"type": "video", "video": {"frames": [source], "timestamps": [0.0]}})]


def build_corpus(canary: Path, origins: dict) -> list[tuple[str, object, int, bool]]:
    """(description, body (bytes: sent raw), expected status, must run no ViT)."""
    cases: list[tuple[str, object, int, bool]] = []

    def add(desc, body, status, no_vit=True):
        cases.append((desc, body, status, no_vit))

    # 1. bodies that are not a JSON object, or JSON no parser should accept whole
    for raw in [b"", b"{", b"[1, 2", b"nul", b"{'model': 'tiny'}", b"\xff\xfe\x00", b'{"model": "tiny",}', b"true",
                b"123", b'"a string"', b"[]", b"null", b"\x00" * 64, b'{"a": NaN}', b'{"a": Infinity}',
                b'{"a": -Infinity}', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                b'{"max_tokens": ' + b"9" * 5000 + b"}", b'{"seed": -' + b"1" * 5000 + b"}",
                b'{"model": "\\ud800", "messages": []}']:
        add(f"raw {raw[:16]!r}", raw, 400)
    nested: list = []
    for _ in range(40):
        nested = [nested]
    add("40-deep list in messages", {**GOOD, "messages": [{"role": "user", "content": nested}]}, 400)
    # 2. lone surrogates in every string field
    for where in ("model", "text", "role", "url", "preset"):
        s = "\ud800x"
        body = {"model": s} if where == "model" else \
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]} if where == "text" else \
            {**GOOD, "messages": [{"role": s, "content": "x"}]} if where == "role" else \
            _with_part({"type": "image_url", "image_url": {"url": s}}) if where == "url" else \
            {**GOOD, "stop": [s]}
        add(f"lone surrogate in {where}", json.dumps(body).encode(), 400)
    # 3. field types and ranges
    wrong = {"model": [1, True, {}, []], "messages": ["hi", 1, {}, [], [1], ["x"], [{"content": "x"}],
                                                     [{"role": 1, "content": "x"}], [{"role": "user", "content": 5}]],
             "max_tokens": ["8", 1.5, -1, 0, 10 ** 6, True, 2 ** 70], "max_completion_tokens": [0, "x", -5],
             "temperature": ["hot", -1, 5, [], 1e308], "top_p": [0, 2, "x", -0.5],
             "seed": ["x", 1.5, [], -1, -(2 ** 40), 2 ** 64], "stream": ["yes", 1, None, {}],
             "stop": [1, [1], ["a"] * 9, ["x" * 1000], {}]}
    for name, values in wrong.items():
        for v in values:
            if v is None:
                continue
            add(f"{name}={v!r}"[:40], {**GOOD, name: v}, 400)
    for model in ["gpt-4", "", "tiny-thinker", "TINY", "x" * 100_000]:
        add(f"unknown model {model[:12]!r}", {**GOOD, "model": model}, 404)
    for role in ["robot", "tool", "", "function", "Developer"]:   # "developer" is a system turn (#17)
        add(f"role {role!r}", {**GOOD, "messages": [{"role": role, "content": "hi"}]}, 400)
    for part in [{"text": "x"}, {"type": "audio", "audio": "x"}, {"type": 5}, {"type": "text"},
                 {"type": "text", "text": 3}, {"type": "text", "text": None}, "just a string", 7, None]:
        add(f"part {str(part)[:30]}", {**GOOD, "messages": [{"role": "user", "content": [part]}]}, 400)
    add("image in an assistant turn", {**GOOD, "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        {"role": "user", "content": "hi"}]}, 400)

    # 4. local files through every part shape, with and without the file existing (local files are disabled)
    photo, secret = canary / "photo.png", canary / "secret.txt"
    local_sources = {
        "existing path": str(photo), "missing path": str(canary / "missing.png"), "secret": str(secret),
        "file URL": photo.as_uri(), "file URL missing": (canary / "nope.png").as_uri(),
        "file URL host": "file://localhost" + str(photo), "traversal": str(canary / ".." / canary.name / "photo.png"),
        "relative traversal": "../../../../../../" + str(photo).lstrip("/"), "symlink": str(canary / "link.png"),
        "dev zero": "/dev/zero", "proc environ": "/proc/self/environ", "etc passwd": "/etc/passwd",
        "fifo-ish": "/dev/stdin", "NUL in path": str(photo) + "\x00.png", "windows": "C:\\Windows\\win.ini",
        "FILE upper": "FILE://" + str(photo),
    }
    for name, src in local_sources.items():
        for shape, part in _part_shapes(src):
            add(f"local {name} via {shape}", _with_part(part), 400)

    # 5. sources that are not what they claim, too big, or of the wrong kind
    bomb = _raw_png(30000, 30000)
    big = 2 * 2 ** 20 + 1000
    data_sources = {
        "text data URL": ("data:text/plain;base64,aGVsbG8=", 400), "broken base64": ("data:image/png;base64,@@@@", 400),
        "no base64 marker": ("data:image/png,abcd", 400), "empty": ("", 400),
        "not an image": (_data_url(b"hello world" * 10), 400), "truncated png": (_data_url(_png(demo_image(448)))[:400], 400),
        "bomb 30000x30000": (_data_url(bomb), 400), "over the byte cap": ("data:image/png;base64," + "A" * (big * 4 // 3), 413),
        "EPS": (_data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "image/eps"), 400),
        "PS as png": (_data_url(b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"), 400),
        "ftp": ("ftp://127.0.0.1/a.png", 400), "gopher": ("gopher://127.0.0.1/", 400), "javascript": ("javascript:alert(1)", 400),
        "malformed v6": ("http://[::1/x", 400), "bad port": ("http://127.0.0.1:99999/x", 400),
        "credentials": (f"http://u:p@127.0.0.1:{origins['public_port']}/img.png", 400),
        "not allow-listed": ("http://example.com/cat.png", 403), "private 10/8": ("http://10.0.0.1/cat.png", 403),
        "private literal allow-listed": (origins["private"] + "/img.png", 403),
        "video data URL garbage": (_data_url(b"\0" * 2000, "video/mp4"), 400),
    }
    for name, (src, status) in data_sources.items():
        for shape, part in _part_shapes(src):
            # an image data URL in a video part is refused for its media type before its size
            want = 400 if status == 413 and shape in ("video", "video_url") else status
            add(f"{name} via {shape}", _with_part(part), want)

    # 6. images and frames whose headers alone must refuse them (no ViT run)
    tall = _data_url(_raw_png(1, 100_000, zlib.compress(b"\0\x80\x80\x80" * 100_000)))
    taller = _data_url(_raw_png(1, 200_704, zlib.compress(b"\0\x80\x80\x80" * 200_704)))
    gif = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(gif, "GIF", save_all=True,
                                                 append_images=[Image.new("RGB", (32, 32), (0, 0, 200))])
    for name, src in {"1x100000 png": tall, "1x200704 png": taller, "animated gif": _data_url(gif.getvalue(), "image/gif")}.items():
        for shape, part in _part_shapes(src)[:4] + _part_shapes(src)[6:]:
            add(f"{name} via {shape}", _with_part(part), 400)
    # 7. limits: every image shape counts; frames; text over what the context can hold; sliced images past it
    tiny_png = _data_url(_png(demo_image(28)))
    for shape_index in range(4):
        parts = [_part_shapes(tiny_png)[shape_index][1] for _ in range(9)]
        add(f"9 images as {_part_shapes(tiny_png)[shape_index][0]} (limit 8)",
            {**GOOD, "messages": [{"role": "user", "content": parts}]}, 400)
    mixed = [_part_shapes(tiny_png)[i % 4][1] for i in range(9)]
    add("9 images of mixed shapes", {**GOOD, "messages": [{"role": "user", "content": mixed}]}, 400)
    add("2000 frames", _with_part({"type": "video", "video": {"frames": [tiny_png] * 2000,
                                                               "timestamps": list(range(2000))}}), 400)
    add("3 videos", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "video", "video": {"frames": [tiny_png], "timestamps": [0]}}] * 3}]}, 400)
    add("text past the context", {**GOOD, "messages": [{"role": "user", "content": "word " * 20_000}]}, 400)
    add("prompt longer than the context", {**GOOD, "messages": [{"role": "user", "content": "word " * 6000}]}, 400)
    big_img = _data_url(_png(Image.new("RGB", (1344, 1344), (90, 120, 200))))
    add("8 sliced images past the context", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big_img}}] * 8}]}, 400)
    add("60 frames past the context (4.5 packs 3)", _with_part({"type": "video", "video": {
        "frames": [tiny_png] * 64, "timestamps": [i * 2.0 for i in range(64)]}, "fps": 30, "packing": 1}), 400)
    # 8. video fields
    frames_ok = {"frames": [tiny_png, tiny_png], "timestamps": [0.0, 0.5]}
    for name, patch in {
            "fps nan": {"fps": "nan"}, "fps inf": {"fps": "inf"}, "fps string": {"fps": "3"}, "fps 0": {"fps": 0},
            "fps negative": {"fps": -1}, "fps huge": {"fps": 1e300}, "fps list": {"fps": [3]}, "fps bool": {"fps": True},
            "packing abc": {"packing": "abc"}, "packing list": {"packing": [1]}, "packing 0": {"packing": 0},
            "packing 7": {"packing": 7}, "packing 3.5": {"packing": 3.5}, "packing -1": {"packing": -1},
            "packing bool": {"packing": True}}.items():
        add(f"video {name}", _with_part({"type": "video", "video": frames_ok, **patch}), 400)
    for name, video in {
            "number": 5, "list": [1, 2], "bool": True, "empty dict": {}, "frames not list": {"frames": "x", "timestamps": [0]},
            "frames empty": {"frames": [], "timestamps": []}, "no timestamps": {"frames": [tiny_png]},
            "timestamps short": {"frames": [tiny_png] * 2, "timestamps": [0]},
            "timestamps decreasing": {"frames": [tiny_png] * 2, "timestamps": [1, 0]},
            "timestamps equal": {"frames": [tiny_png] * 2, "timestamps": [1, 1]},
            "timestamps negative": {"frames": [tiny_png] * 2, "timestamps": [-1, 0]},
            "timestamps strings": {"frames": [tiny_png] * 2, "timestamps": ["0", "1"]},
            "timestamps nan": {"frames": [tiny_png] * 2, "timestamps": ["nan", 1]},
            "timestamps huge": {"frames": [tiny_png] * 2, "timestamps": [0, 1e300]},
            "frame not string": {"frames": [5], "timestamps": [0]}}.items():
        add(f"video as {name}", _with_part({"type": "video", "video": video}), 400)

    # 9. SSRF against the loopback origins (127.0.0.1 is "public" for this test server, 127.0.0.2 is not)
    pub = origins["public"]
    ssrf = {"/redirect-private": 403, "/redirect-ftp": 400, "/redirect-file": 400, "/redirect-gopher": 400,
            "/redirect-unlisted": 403, "/redirect-loop": 400, "/redirect-empty": 400, "/redirect-creds": 400,
            "/redirect-v6": 403, "/redirect-metadata": 403, "/notfound": 400, "/error": 400, "/big": 413,
            "/big-chunked": 413, "/not-image": 400}
    for path, status in ssrf.items():
        for shape, part in _part_shapes(pub + path)[:1] + _part_shapes(pub + path)[3:5]:
            add(f"remote {path} via {shape}", _with_part(part), status)
    add("remote slow drip past the deadline", _with_part({"type": "image_url", "image_url": {"url": pub + "/slow"}}),
        400)
    return cases


def _send(http: httpx.Client, base: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(base + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    return http.post(base + "/v1/chat/completions", json=body)


class _Audit:
    """Records every file the process opens under `root` while armed (Python's audit hook sees io.open and
    os.open, so PIL, PyAV's Python side and our reader are all covered)."""

    def __init__(self, root: Path):
        self.root, self.armed, self.opened = str(root), False, []
        sys.addaudithook(self)

    def __call__(self, event, args):
        if self.armed and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0]) if not isinstance(args[0], str) else args[0]
            if path.startswith(self.root) or path in ("/etc/passwd", "/proc/self/environ", "/dev/zero"):
                self.opened.append(path)


def test_hostile_corpus(live, canary, origins):
    base = live["base"]
    cases = build_corpus(canary, origins)
    print(f"\n{len(cases)} hostile requests")
    assert len(cases) >= 300
    audit = _Audit(canary)
    with httpx.Client(timeout=60) as http:
        warm = http.post(base + "/v1/chat/completions", json=_with_part(
            {"type": "image_url", "image_url": {"url": _data_url(_png(demo_image(448)))}}))
        assert warm.status_code == 200, warm.text[:300]
        rss_before = _rss_mb()
        health_ms: list[float] = []
        stop = threading.Event()

        def poll_health():
            with httpx.Client(timeout=10) as h:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = h.get(base + "/health")
                    health_ms.append((time.perf_counter() - t0) * 1000 if r.status_code == 200 else 1e9)
                    time.sleep(0.05)
        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        audit.armed = True
        wrong, statuses = [], {}
        t0 = time.perf_counter()
        try:
            for desc, body, status, no_vit in cases:
                vit_before = live["vit_runs"]["n"]
                r = _send(http, base, body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                try:
                    err = r.json().get("error", {})
                except ValueError:
                    err = {"message": f"NOT JSON: {r.text[:80]}"}
                ok = r.status_code == status and isinstance(err.get("message"), str) and 10 < len(err["message"]) < 400
                if no_vit and live["vit_runs"]["n"] != vit_before:
                    ok = False
                    err = {**err, "vit": live["vit_runs"]["n"] - vit_before}
                if not ok:
                    wrong.append((desc, status, r.status_code, str(err)[:200]))
        finally:
            audit.armed = False
            stop.set()
            poller.join(timeout=10)
        elapsed = time.perf_counter() - t0
        after = http.post(base + "/v1/chat/completions", json=GOOD)
    rss_after = _rss_mb()
    print(f"statuses {dict(sorted(statuses.items()))} in {elapsed:.1f} s; RSS {rss_before:.0f} -> {rss_after:.0f} MB; "
          f"/health max {max(health_ms):.0f} ms over {len(health_ms)} polls; local opens {audit.opened}")
    for w in wrong:
        print("  WRONG", w)
    assert not wrong, f"{len(wrong)} of {len(cases)} got the wrong answer"
    assert not any(s >= 500 for s in statuses)
    assert audit.opened == []
    assert after.status_code == 200
    assert max(health_ms) < 1000
    assert abs(rss_after - rss_before) <= 0.10 * rss_before
    assert origins["private_hits"] == {}, "a request reached the private (127.0.0.2) origin"


def test_errors_do_not_reveal_whether_a_local_file_exists(live, canary):
    with httpx.Client(timeout=30) as http:
        msgs = [_send(http, live["base"], _with_part({"type": "image", "image": p})).json()["error"]["message"]
                for p in (str(canary / "photo.png"), str(canary / "missing.png"))]
    assert msgs[0].replace("photo", "X") == msgs[1].replace("missing", "X") or msgs[0] == msgs[1]


def test_remote_fetch_follows_a_checked_redirect_and_pins_the_address(live, origins, monkeypatch):
    """A redirect to an allowed host is followed; `rebind.test` resolves once (to 127.0.0.1) and a second lookup
    would say 127.0.0.2: the fetch goes to the address that passed the check, and resolves only once."""
    base, pub = live["base"], origins["public"]
    with httpx.Client(timeout=60) as http:
        ok = _send(http, base, _with_part({"type": "image_url", "image_url": {"url": pub + "/redirect-ok"}}))
        assert ok.status_code == 200, ok.text[:300]
        lookups = []
        real = socket.getaddrinfo

        def rebinding(host, *args, **kwargs):
            if host == "rebind.test":
                lookups.append(host)
                ip = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, origins["public_port"]))]
            return real(host, *args, **kwargs)
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        url = f"http://rebind.test:{origins['public_port']}/img.png"
        r = _send(http, base, _with_part({"type": "image_url", "image_url": {"url": url}}))
        assert r.status_code == 200, r.text[:300]
        assert lookups == ["rebind.test"]
        lookups.clear()
        lookups.append("first")      # the next check now sees the private address: refused before connecting
        r = _send(http, base, _with_part({"type": "image_url", "image_url": {"url": url}}))
        assert r.status_code == 403, r.text[:300]
    assert origins["private_hits"] == {}


def test_slow_remote_server_does_not_stall_health(live, origins):
    base = live["base"]
    result = {}

    def slow():
        with httpx.Client(timeout=60) as http:
            t0 = time.perf_counter()
            result["r"] = _send(http, base, _with_part({"type": "image_url",
                                                        "image_url": {"url": origins["public"] + "/slow"}}))
            result["s"] = time.perf_counter() - t0
    t = threading.Thread(target=slow)
    t.start()
    worst = 0.0
    with httpx.Client(timeout=10) as h:
        while t.is_alive():
            t0 = time.perf_counter()
            assert h.get(base + "/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.05)
    t.join()
    print(f"\nslow drip refused after {result['s']:.2f} s (deadline 2 s); /health worst {worst * 1000:.0f} ms")
    assert result["r"].status_code == 400 and "did not deliver" in result["r"].json()["error"]["message"]
    assert result["s"] < 2.0 + 1.5
    assert worst < 1.0


def test_local_files_confined_to_allowed_folders(tmp_path, canary):
    from minicpmv_edge.runtime.sources import SourceError, SourcePolicy, read_source
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(b"png bytes")
    (allowed / "escape.png").symlink_to(canary / "photo.png")
    (allowed / "big.bin").write_bytes(b"\0" * 5000)
    policy = SourcePolicy(allow_local_files=True, local_roots=(str(allowed),), max_image_bytes=4096)

    def read(path):
        return asyncio.run(read_source(path, "image", "image", policy))
    assert read(str(allowed / "ok.png")) == b"png bytes"
    assert read((allowed / "ok.png").as_uri()) == b"png bytes"
    refused = set()
    for path in [str(canary / "photo.png"), str(allowed / "escape.png"), str(allowed / ".." / "allowed" / ".." /
                 canary.name / "photo.png"), str(allowed / "missing.png"), str(allowed), "/etc/passwd",
                 (canary / "photo.png").as_uri()]:
        with pytest.raises(SourceError) as exc:
            read(path)
        refused.add((exc.value.status, exc.value.message))
    assert len(refused) == 1, refused          # one message for missing, outside, symlinked out, a folder
    with pytest.raises(SourceError, match="over the limit") as exc:
        read(str(allowed / "big.bin"))
    assert exc.value.status == 413


def test_pixel_cap_is_the_documented_one():
    """DEFAULT_MAX_PIXELS (178 956 970, Pillow's own hard limit) is the one cap: a 10000x10000 header (over Pillow's
    89 478 485 warning threshold) is accepted, 13400x13400 is refused, both from the header alone."""
    from minicpmv_edge.runtime.images import ImageInputError, open_header
    from minicpmv_edge.runtime.preprocess import DEFAULT_MAX_PIXELS
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970
    assert open_header(_raw_png(10_000, 10_000), "big", DEFAULT_MAX_PIXELS).size == (10_000, 10_000)
    with pytest.raises(ImageInputError, match="over the limit|bomb"):
        open_header(_raw_png(13_400, 13_400), "bigger", DEFAULT_MAX_PIXELS)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageInputError, match="supported format"):
        open_header(eps, "eps", DEFAULT_MAX_PIXELS)
