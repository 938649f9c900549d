"""One way for tests to run the HTTP server: an ASGI app on a free loopback port, in a thread, until the block
ends. Only 127.0.0.1 is ever used."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, opts=None) -> Iterator[str]:
    """Yields the base URL once /health answers. With `opts` (ServerOptions) the server is the production one
    (runtime/server.make_server: header timer, header size limit); without, plain uvicorn."""
    import httpx
    import uvicorn
    port = free_port()
    if opts is not None:
        from minicpmv_edge.runtime.server import make_server
        srv = make_server(app, "127.0.0.1", port, opts, log_level="error")
    else:
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
