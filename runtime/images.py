"""Turning what a user passes as an image into a decoded PIL image, or one clear error.

Accepted: a PIL image, a path, raw bytes, or a `data:image/...;base64,` URL. Remote http(s) URLs are
refused here (the server may fetch them when enabled). Only the formats in IMAGE_FORMATS are decoded (never
Pillow's EPS/PostScript or other plug-ins). The pixel cap is checked from the header, before any pixel is
decoded, so a 30000x30000 "bomb" costs nothing; files are read with a byte cap, never whole; truncated and
corrupt files are errors, not half-grey images.
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

from .preprocess import (DEFAULT_MAX_PIXELS, downsample_side, find_best_resize, get_refine_size, get_sliced_grid,
                         get_sliced_grid_v46)

_URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)?(?P<params>(;[\w=.-]+)*?)(;base64)?,", re.I)


# The formats we document and decode (Pillow plug-in names). Anything else is "not an image we read".
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageInputError(MiniCPMVEdgeError):
    """The input is not an image we can use; the message says which input and why."""


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image        # decoded, EXIF orientation not yet applied (preprocess does it)
    digest: str               # sha256 of the encoded bytes (or of the pixels for PIL input): the cache key
    source: str               # what to call it in messages


@dataclass(frozen=True)
class ImageHeader:
    """An image whose header passed the checks, not decoded yet: the encoded bytes, or the caller's PIL image."""
    data: bytes | None
    image: Image.Image | None
    size: tuple[int, int]     # (width, height) before EXIF orientation
    source: str               # what to call it in messages


def slice_shapes(size: tuple[int, int], max_slice_nums: int, slice_size: int = 448, patch_size: int = 14,
                 slicing: str = "llava_uhd", downsample_mode: str = "16x"
                 ) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """(grid, [(h, w) in patches per slice, overview first]) that preprocessing will produce for an image of
    `size`, from the arithmetic alone (no pixels): what the cheap checks count before any ViT run.
    (The EXIF orientation may swap the sides; counts and the longest side do not change.) `downsample_mode` is
    read by "llava_uhd_v46" only, as in `preprocess_image`."""
    # 4.6: sides are multiples of patch x the patches merged per side
    align = patch_size * (downsample_side(downsample_mode) if slicing == "llava_uhd_v46" else 1)
    grid = (get_sliced_grid_v46(size, max_slice_nums, slice_size) if slicing == "llava_uhd_v46"
            else get_sliced_grid(size, max_slice_nums, slice_size))
    w, h = find_best_resize(size, slice_size, align, allow_upscale=grid is None)
    shapes = [(h // patch_size, w // patch_size)]
    if grid is not None:
        rw, rh = get_refine_size(size, grid, slice_size, align, allow_upscale=True)
        cell = (int(rh / grid[1]) // patch_size, int(rw / grid[0]) // patch_size)
        shapes += [cell] * (grid[0] * grid[1])
    return grid, shapes


def open_header(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Parse only the header (no pixel decoded): the format is one of IMAGE_FORMATS, the size within
    `max_pixels`, a still image. Cheap checks (slices, tokens) use the size before any decode."""
    if not data:
        raise ImageInputError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that (= DEFAULT_MAX_PIXELS): our own
            # max_pixels check below is the one limit, so the warning is not an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name}: refused as a decompression bomb (over {max_pixels:,} pixels)") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"{name}: corrupt image header ({str(exc)[:80]})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageInputError(f"{name}: the image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageInputError(f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                              f"(raise max_pixels to allow it)")
    if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        raise ImageInputError(f"{name}: animated image ({img.n_frames} frames); pass a still image, or "
                              "the frames as a video")
    return img


def _open_bytes(data: bytes, name: str, max_pixels: int) -> Image.Image:
    open_header(data, name, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            img.verify()                       # checksums (PNG CRCs) without decoding pixels
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # verify() leaves it unusable: open again
            img.load()   # decode now, so a truncated or corrupt file fails here and not later
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(f"{name}: corrupt or truncated image ({str(exc)[:80]})") from None
    return img


def read_capped(path: Path, max_bytes: int | None, name: str) -> bytes:
    """A local file's bytes, reading at most max_bytes + 1 (a 400 MB file costs nothing to refuse)."""
    try:
        with open(path, "rb") as f:
            data = f.read(-1 if max_bytes is None else max_bytes + 1)
    except (OSError, ValueError):
        raise ImageInputError(f"{name}: file not found or not readable") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageInputError(f"{name}: over the limit of {max_bytes:,} bytes")
    return data


def decode_data_url(url: str, max_bytes: int | None = None, kind: str = "image") -> bytes:
    """The payload of a `data:<kind>/<type>;base64,` URL, refused from its length when over `max_bytes`."""
    m = _DATA_URL.match(url[:512])
    if not m or ";base64," not in url[: m.end() + 1]:
        raise ImageInputError(f"data URL: expected data:{kind}/<type>;base64,<data>")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith(kind + "/"):
        raise ImageInputError(f"data URL: media type {mime[:40]!r} is not {'an' if kind == 'image' else 'a'} {kind}")
    payload = url[m.end():]
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
        raise ImageInputError(f"data URL: {len(payload) * 3 // 4:,} bytes is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("data URL: the base64 payload is not valid") from None


def read_image_header(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None,
                      name: str | None = None) -> ImageHeader:
    """Any accepted image input -> its bytes (read with a cap) and its checked header, nothing decoded.
    `name` (e.g. "image 2") prefixes what the input is called in messages."""
    if isinstance(source, ImageHeader):
        return source

    def label(what: str) -> str:
        return f"{name} ({what})" if name else what
    if isinstance(source, Image.Image):
        w, h = source.size
        if w < 1 or h < 1 or w * h > max_pixels:
            raise ImageInputError(f"{label('PIL image')}: {w}x{h} is outside 1..{max_pixels:,} pixels")
        return ImageHeader(None, source, source.size, label("PIL image"))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), label("image bytes")
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageInputError(f"{where}: {len(data):,} bytes is over the limit of {max_bytes:,} bytes")
    elif isinstance(source, str) and source.startswith("data:"):
        data, where = decode_data_url(source, max_bytes), label("data URL image")
    elif isinstance(source, str) and _URL_SCHEME.match(source) and not source.lower().startswith("file://"):
        raise ImageInputError(f"{source[:80]}: remote URLs are not fetched by the runtime; pass the bytes or a "
                              "data URL")
    elif isinstance(source, (str, Path)):
        path = Path(str(source)[7:] if str(source).lower().startswith("file://") else source)
        where = label(str(path))
        data = read_capped(path, max_bytes, where)
    else:
        raise ImageInputError(f"{label('image')}: unsupported image input of type {type(source).__name__}")
    img = open_header(data, where, max_pixels)
    return ImageHeader(data, None, img.size, where)


def _is_path(source: Any) -> bool:
    return isinstance(source, Path) or (isinstance(source, str) and not source.startswith("data:") and (
        not _URL_SCHEME.match(source) or source.lower().startswith("file://")))


def load_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, allow_paths: bool = True,
               max_bytes: int | None = None) -> LoadedImage:
    """Any accepted image input (or an ImageHeader already read) -> the decoded image and its cache key."""
    if not allow_paths and _is_path(source):
        raise ImageInputError("local file paths are not allowed here")
    head = read_image_header(source, max_pixels=max_pixels, max_bytes=max_bytes)
    if head.image is not None:
        img = head.image
        digest = hashlib.sha256(img.mode.encode() + str(img.size).encode() + img.tobytes()).hexdigest()
        return LoadedImage(img, digest, head.source)
    return LoadedImage(_open_bytes(head.data, head.source, max_pixels), hashlib.sha256(head.data).hexdigest(),
                       head.source)
