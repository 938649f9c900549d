"""The server's one source policy: every image or video a request names, whatever the part's shape
(`image_url`, `input_image`, `image`, `video`, `video_url`, video `frames`), becomes bytes here, read with a
byte cap, or a 4xx naming the field. The runtime is never handed a path or a URL by the server.

- `data:` URLs: decoded, size checked from the base64 length first.
- local paths and `file://` URLs: only with `allow_local_files`, optionally confined to `local_roots` (the
  path is resolved, symlinks included, and must stay inside one root); a file that is missing, unreadable, not
  a regular file or outside the roots gets the same message, so errors do not reveal what exists.
- `http(s)://` URLs: only with `allow_remote_urls`, to allow-listed hosts, fetched by httpx on the event loop
  (async: `/health` stays responsive) under one total deadline and byte cap. The host is resolved once, every
  address must be public, and the connection goes to that address (TLS still checks the host name), so DNS
  rebinding cannot move it; each redirect is checked the same way before it is followed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from .images import ImageInputError, decode_data_url

REDIRECTS = (301, 302, 303, 307, 308)


class SourceError(Exception):
    """A source the policy refuses: HTTP status + a one-line message that names the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class SourcePolicy:
    max_image_bytes: int = 20 * 2 ** 20
    max_video_bytes: int = 64 * 2 ** 20
    allow_local_files: bool = False
    local_roots: tuple[str, ...] = ()          # empty: anywhere the server process may read
    allow_remote_urls: bool = False
    remote_allow_hosts: tuple[str, ...] = ()
    remote_timeout_s: float = 10.0             # total, DNS and redirects included
    remote_max_redirects: int = 3
    # Networks treated as public for remote URLs. Empty by default; tests put 127.0.0.1/32 here to run SSRF
    # cases against loopback servers. Never needed in production.
    remote_trusted_networks: tuple[str, ...] = ()

    def cap(self, kind: str) -> int:
        return self.max_video_bytes if kind == "video" else self.max_image_bytes


def short(value: Any, limit: int = 60) -> str:
    """An input quoted for an error message, cut to `limit` characters (never a whole data URL)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


async def read_source(value: Any, field: str, kind: str, policy: SourcePolicy) -> bytes:
    """A source string (data URL, path, file:// or http(s) URL) -> its bytes, under the policy."""
    if not isinstance(value, str) or not value:
        raise SourceError(400, f"{field} must be a non-empty string (a data: URL{', path' if policy.allow_local_files else ''}"
                               f"{' or http(s) URL' if policy.allow_remote_urls else ''})")
    cap = policy.cap(kind)
    if value[:5].lower() == "data:":
        try:
            return decode_data_url(value, cap, kind)
        except ImageInputError as exc:
            raise SourceError(413 if "over the limit" in str(exc) else 400, f"{field}: {exc}") from None
    try:
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
    except ValueError:
        raise SourceError(400, f"{field}: malformed URL {short(value)}") from None
    if scheme in ("http", "https"):
        if not policy.allow_remote_urls:
            raise SourceError(400, f"{field}: remote URLs are disabled on this server (start it with "
                                   "--allow-remote-urls); send the data as a data: URL")
        try:
            return await asyncio.wait_for(_fetch(value, field, cap, policy), policy.remote_timeout_s)
        except asyncio.TimeoutError:
            raise SourceError(400, f"{field}: the remote server did not deliver within "
                                   f"{policy.remote_timeout_s:g} s") from None
    if scheme == "file" or (scheme == "" or (len(scheme) == 1 and value[1:3] in (":\\", ":/"))):
        if not policy.allow_local_files:
            raise SourceError(400, f"{field}: local files are disabled on this server (start it with "
                                   "--allow-local-files)")
        path = unquote(parts.path) if scheme == "file" else value
        return await asyncio.to_thread(_read_local, path, field, cap, policy)
    raise SourceError(400, f"{field}: unsupported URL scheme {short(scheme, 20)} (use data:, http(s):// or a "
                           "path)")


# ------------------------------------------------------------------------------------------------ local files

def _read_local(path: str, field: str, cap: int, policy: SourcePolicy) -> bytes:
    refused = SourceError(400, f"{field}: cannot read this local file (missing, not a regular readable file, or "
                               "outside the allowed folders)")
    try:
        real = Path(path).resolve()            # symlinks and ../ resolved before the confinement check
        roots = [Path(r).resolve() for r in policy.local_roots]
        if roots and not any(real.is_relative_to(r) for r in roots):
            raise refused
        # O_NONBLOCK: a FIFO must not hang the thread; O_NOFOLLOW: the resolved path must not become a link
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError, RuntimeError):
        raise refused from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):     # a folder, a device, a FIFO
            raise refused
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    except OSError:
        raise refused from None
    finally:
        os.close(fd)
    if len(data) > cap:
        raise SourceError(413, f"{field}: the file is over the limit of {cap:,} bytes")
    return data


# ------------------------------------------------------------------------------------------------ remote URLs

def _is_public(ip: ipaddress._BaseAddress, policy: SourcePolicy) -> bool:
    if any(ip in ipaddress.ip_network(n, strict=False) for n in policy.remote_trusted_networks):
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    return ip.is_global and not ip.is_multicast


async def _pinned_address(host: str, port: int, field: str, policy: SourcePolicy) -> str:
    """Resolve once (off the event loop); every address must be public; connect to the first."""
    try:
        literal = ipaddress.ip_address(host)
        addresses = [literal]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, proto=6)
        except (OSError, UnicodeError):
            raise SourceError(400, f"{field}: cannot resolve host {short(host, 40)}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(_is_public(a, policy) for a in addresses):
        raise SourceError(403, f"{field}: host {short(host, 40)} resolves to a private or local address")
    return str(addresses[0])


def _check_url(url: str, field: str, policy: SourcePolicy) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        raise SourceError(400, f"{field}: malformed URL {short(url)}") from None
    if scheme not in ("http", "https"):
        raise SourceError(400, f"{field}: only http(s) URLs are fetched, not {short(scheme, 20)}")
    if parts.username or parts.password:
        raise SourceError(400, f"{field}: URLs with credentials are refused")
    if host not in policy.remote_allow_hosts:
        raise SourceError(403, f"{field}: host {short(host, 40)} is not in the remote URL allow-list")
    return scheme, host, port or (443 if scheme == "https" else 80)


async def _fetch(url: str, field: str, cap: int, policy: SourcePolicy) -> bytes:
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                 timeout=httpx.Timeout(policy.remote_timeout_s)) as client:
        for _hop in range(policy.remote_max_redirects + 1):
            scheme, host, port = _check_url(url, field, policy)
            address = await _pinned_address(host, port, field, policy)
            parts = urlsplit(url)
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            pinned = parts._replace(netloc=netloc, fragment="").geturl()
            default_port = port == (443 if scheme == "https" else 80)
            headers = {"Host": host if default_port else f"{host}:{port}", "User-Agent": "minicpmv-edge",
                       "Accept-Encoding": "identity"}
            request = client.build_request("GET", pinned, headers=headers,
                                           extensions={"sni_hostname": host} if scheme == "https" else {})
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise SourceError(400, f"{field}: could not fetch {short(url)} ({type(exc).__name__})") from None
            try:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise SourceError(400, f"{field}: redirect without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise SourceError(400, f"{field}: the remote server answered {response.status_code}")
                length = response.headers.get("content-length")
                if length and length.isdigit() and int(length) > cap:
                    raise SourceError(413, f"{field}: the remote file is over the limit of {cap:,} bytes")
                data = bytearray()
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > cap:
                        raise SourceError(413, f"{field}: the remote file is over the limit of {cap:,} bytes")
                return bytes(data)
            except httpx.HTTPError as exc:
                raise SourceError(400, f"{field}: could not fetch {short(url)} ({type(exc).__name__})") from None
            finally:
                await response.aclose()
    raise SourceError(400, f"{field}: more than {policy.remote_max_redirects} redirects")
