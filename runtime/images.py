"""Turning what a user passes as an image into a decoded PIL image, or one clear error.

Accepted: a PIL image, a path, raw bytes, or a `data:image/...;base64,` URL. Remote http(s) URLs are
refused here (the server may fetch them when enabled). The pixel cap is checked from the header, before
any pixel is decoded, so a 30000x30000 "bomb" costs nothing; truncated and corrupt files are errors, not
half-grey images.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from minicpmv_edge.errors import MiniCPMVEdgeError

from .preprocess import DEFAULT_MAX_PIXELS

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)?(?P<params>(;[\w=.-]+)*?)(;base64)?,", re.I)


class ImageInputError(MiniCPMVEdgeError):
    """The input is not an image we can use; the message says which input and why."""


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image        # decoded, EXIF orientation not yet applied (preprocess does it)
    digest: str               # sha256 of the encoded bytes (or of the pixels for PIL input): the cache key
    source: str               # what to call it in messages


def _open_bytes(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageInputError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageInputError(f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                      f"(raise max_pixels to allow it)")
            if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
                raise ImageInputError(f"{name}: animated image ({img.n_frames} frames); pass a still image, or "
                                      "the frames as a video")
            img.verify()                       # checksums (PNG CRCs) without decoding pixels
            img = Image.open(io.BytesIO(data))  # verify() leaves the image unusable: open again
            img.load()   # decode now, so a truncated or corrupt file fails here and not later
    except ImageInputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"{name}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    m = _DATA_URL.match(url)
    if not m or ";base64," not in url[: m.end() + 1]:
        raise ImageInputError("data URL: expected data:image/<type>;base64,<data>")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageInputError(f"data URL: media type {mime!r} is not an image")
    payload = url[m.end():]
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
        raise ImageInputError(f"data URL: {len(payload) * 3 // 4:,} bytes is over the limit of {max_bytes:,}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("data URL: the base64 payload is not valid") from None


def load_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, allow_paths: bool = True,
               max_bytes: int | None = None) -> LoadedImage:
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > max_pixels:
            raise ImageInputError(f"image: {w}x{h} is over the limit of {max_pixels:,} pixels")
        digest = hashlib.sha256(source.mode.encode() + str(source.size).encode() + source.tobytes()).hexdigest()
        return LoadedImage(source, digest, "PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return LoadedImage(_open_bytes(data, "image bytes", max_pixels), hashlib.sha256(data).hexdigest(), "bytes")
    if isinstance(source, str) and source.startswith("data:"):
        data = decode_data_url(source, max_bytes)
        return LoadedImage(_open_bytes(data, "data URL image", max_pixels), hashlib.sha256(data).hexdigest(),
                           "data URL")
    if isinstance(source, str) and re.match(r"^[a-z][a-z0-9+.-]*://", source, re.I) and \
            not source.lower().startswith("file://"):
        raise ImageInputError(f"{source[:80]}: remote URLs are not fetched by the runtime; pass the bytes or a "
                              "data URL")
    if isinstance(source, (str, Path)):
        if not allow_paths:
            raise ImageInputError("local file paths are not allowed here")
        path = Path(str(source)[7:] if str(source).lower().startswith("file://") else source)
        if not path.is_file():
            raise ImageInputError(f"{path}: file not found")
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise ImageInputError(f"{path}: {path.stat().st_size:,} bytes is over the limit of {max_bytes:,}")
        data = path.read_bytes()
        return LoadedImage(_open_bytes(data, str(path), max_pixels), hashlib.sha256(data).hexdigest(), str(path))
    raise ImageInputError(f"unsupported image input of type {type(source).__name__}")
