"""Grounding spans in an answer -> boxes, points and quads on the image the question was about.

MiniCPM-V writes grounding as `<ref>label</ref><box>x1 y1 x2 y2</box>`: top-left and bottom-right corners as
integers on a 0-1000 scale of the whole image (OpenBMB/MiniCPM-V issues 772 and 982; MiniCPM-V-CookBook issue 39:
"multiply by the original width and height"), plus `<point>x y</point>` and `<quad>x1 y1 x2 y2 x3 y3 x4 y4</quad>`
(OpenBMB/MiniCPM-V issue 185). The scale is the one of the image the model saw: the overview slice is the whole
image resized without padding or cropping, so a coordinate maps linearly onto the upright (EXIF-applied)
original, at any resolution.

Which image: the format names none, and no public recipe says which image of several a box belongs to. We map
onto the LAST image of the conversation (the one a follow-up like "where is the cat?" is about) and say so in
each object's `image` index; the 0-1000 `coords` are always there for a caller who means another image.

Robustness: a span that is malformed (unclosed, nested, wrong count of numbers, a number over 1000, too long)
stays plain text and yields nothing; nothing here raises on model output. Streaming: `GroundingStream` takes the
answer delta by delta and returns each object once its closing tag has arrived, holding back a tag cut by a chunk
boundary; it gives the same objects as `parse` on the whole text, wherever the chunks are cut.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

SCALE = 1000                               # coordinates are 0..SCALE of the image's width and height
NUMBERS_PER_SHAPE = {"box": 4, "point": 2, "quad": 8}
MAX_LABEL_CHARS = 200                      # a longer <ref> body is taken as text, not as a label
MAX_BODY_CHARS = 160                       # room for a few shapes in one tag; longer bodies are text

_OPEN = re.compile(r"<(ref|box|point|quad)>")
_OPEN_TAGS = ("<ref>", "<box>", "<point>", "<quad>")
_LABEL_BODY = re.compile(r"[^<>\n]*")
_SHAPE_BODY = re.compile(r"[0-9\s,()\[\]]*")
_NUMBER = re.compile(r"[0-9]+")
# A label names the shapes right after its </ref>, and further shapes separated from those by a comma or spaces.
_LABEL_GAP = re.compile(r"[\s,;]{0,8}")

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageGeometry:
    """Where pixels are in one image: its stored size and the EXIF orientation a viewer applies to it."""
    width: int                             # the stored pixel grid, as decoded
    height: int
    orientation: int = 1                   # EXIF 1-8; any other value shows the image as stored (as Pillow does)

    @classmethod
    def of(cls, image: Image.Image) -> ImageGeometry:
        try:
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
        except (TypeError, ValueError, OSError, SyntaxError):   # a damaged EXIF block shows the image as stored
            orientation = 1
        return cls(image.width, image.height, orientation if 1 <= orientation <= 8 else 1)

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) as a viewer shows it, i.e. after `ImageOps.exif_transpose` (what the model saw)."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)

    def to_stored(self, x: float, y: float) -> tuple[float, float]:
        """A position in the upright image -> the same spot in the stored pixel grid (EXIF orientation undone).
        Orientations 5-8 swap the axes; the table is checked against Pillow's exif_transpose in the tests."""
        w, h, o = self.width, self.height, self.orientation
        return {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
                5: (y, x), 6: (y, h - x), 7: (w - y, h - x), 8: (w - y, x)}[o]


@dataclass(frozen=True)
class GroundedObject:
    """One box, point or quad the model named."""
    kind: str                              # "box", "point" or "quad"
    label: str | None                      # the <ref> text just before it, if any
    coords: tuple[int, ...]                # 0-1000 as written (a box's corners ordered: x1 <= x2, y1 <= y2)
    start: int                             # text[start:end] is the <box>/<point>/<quad> span in the answer
    end: int
    image: int | None = None               # index of the image (among the images sent) the pixels refer to
    pixels: tuple[float, ...] | None = None          # in that image as viewers show it (EXIF applied), full size
    stored_pixels: tuple[float, ...] | None = None   # in its stored pixel grid (before the EXIF orientation)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("coords", "pixels", "stored_pixels"):
            d[k] = None if d[k] is None else list(d[k])
        return d


def _on_image(obj: GroundedObject, images: Sequence[ImageGeometry]) -> GroundedObject:
    """Add pixel positions on the last image (see the module note); unchanged when no image was sent."""
    if not images:
        return obj
    geo = images[-1]
    w, h = geo.upright_size
    points = [(obj.coords[i] * w / SCALE, obj.coords[i + 1] * h / SCALE) for i in range(0, len(obj.coords), 2)]
    stored = [geo.to_stored(x, y) for x, y in points]
    if obj.kind == "box":   # the flips and quarter turns keep boxes axis-aligned: reorder the corners
        xs, ys = [p[0] for p in stored], [p[1] for p in stored]
        stored = [(min(xs), min(ys)), (max(xs), max(ys))]
    return GroundedObject(obj.kind, obj.label, obj.coords, obj.start, obj.end, len(images) - 1,
                          _flat(points), _flat(stored))


def _flat(points: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    return tuple(round(v, 2) for p in points for v in p)


def _shapes(kind: str, body: str) -> list[tuple[int, ...]] | None:
    """The numbers of a <box>/<point>/<quad> body, one tuple per shape, or None if the body is not valid."""
    numbers = [int(n) for n in _NUMBER.findall(body)]
    per = NUMBERS_PER_SHAPE[kind]
    if not numbers or len(numbers) % per or any(n > SCALE for n in numbers):
        return None
    shapes = [tuple(numbers[i:i + per]) for i in range(0, len(numbers), per)]
    if kind == "box":
        shapes = [(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)) for x1, y1, x2, y2 in shapes]
    return shapes


@dataclass
class _ScanState:
    pos: int = 0                           # everything before this is decided
    label: str | None = None               # the last complete <ref> label
    label_end: int = -1                    # end of that </ref>, or of the last shape it named


def _scan(text: str, state: _ScanState, final: bool) -> list[GroundedObject]:
    """Find the complete spans from state.pos on. With final=False, stop at the first tag whose fate depends on
    text not yet seen (a `<bo` at the end, an unclosed `<box>12 3`) and leave state.pos there; every decision
    taken is one the whole text would take too, so chunked scanning equals one scan of the whole."""
    found: list[GroundedObject] = []
    while True:
        lt = text.find("<", state.pos)
        if lt < 0:
            state.pos = len(text)
            return found
        m = _OPEN.match(text, lt)
        if m is None:
            tail = text[lt:]
            if not final and len(tail) < 7 and any(t.startswith(tail) for t in _OPEN_TAGS):
                state.pos = lt   # maybe the start of a tag: wait for more
                return found
            state.pos = lt + 1
            continue
        tag = m.group(1)
        close = f"</{tag}>"
        body_re, limit = (_LABEL_BODY, MAX_LABEL_CHARS) if tag == "ref" else (_SHAPE_BODY, MAX_BODY_CHARS)
        body_end = body_re.match(text, m.end(), m.end() + limit + 1).end()
        body = text[m.end():body_end]
        if len(body) <= limit and text.startswith(close, body_end):
            span_end = body_end + len(close)
            if tag == "ref":
                state.label, state.label_end = body.strip() or None, span_end
                state.pos = span_end
                continue
            shapes = _shapes(tag, body)
            if shapes is not None:
                gap_ok = state.label is not None and _LABEL_GAP.fullmatch(text, state.label_end, lt) is not None
                label = state.label if gap_ok else None
                state.label, state.label_end = label, span_end
                found += [GroundedObject(tag, label, s, lt, span_end) for s in shapes]
                state.pos = span_end
                continue
        elif not final and len(body) <= limit and close.startswith(text[body_end:body_end + len(close)]) \
                and len(text) - body_end < len(close):
            state.pos = lt   # the body or its closing tag is still arriving
            return found
        state.pos = m.end()  # malformed: the opening tag stays text; spans inside it may still be valid


def parse(text: str, images: Sequence[ImageGeometry] = ()) -> list[GroundedObject]:
    """Every complete grounding span of an answer, in order, with pixels on the last of `images`."""
    return [_on_image(o, images) for o in _scan(text, _ScanState(), final=True)]


@dataclass
class GroundingStream:
    """The incremental `parse`: feed answer deltas, get each object once its span is complete."""
    images: Sequence[ImageGeometry] = ()
    text: str = ""
    _state: _ScanState = field(default_factory=_ScanState)

    def feed(self, delta: str) -> list[GroundedObject]:
        self.text += delta
        return [_on_image(o, self.images) for o in _scan(self.text, self._state, final=False)]

    def close(self) -> list[GroundedObject]:
        """The end of the answer: a tag still open is text after all (nothing more to return but for that)."""
        return [_on_image(o, self.images) for o in _scan(self.text, self._state, final=True)]

    @property
    def safe_end(self) -> int:
        """Text before this offset holds no tag that is still arriving (a display may render it now)."""
        return self._state.pos


# ------------------------------------------------------------------------------------------------
# Drawing (`minicpmv-edge run --draw`)

_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60))


def draw(image: Image.Image, objects: Sequence[GroundedObject]) -> Image.Image:
    """The upright image (EXIF applied, full size) with each object outlined and labelled; one colour per label."""
    out = ImageOps.exif_transpose(image).convert("RGB")
    pen = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(out.size) / 30)))
    except (TypeError, ImportError):   # Pillow < 10.1 or without FreeType: the fixed-size bitmap font
        font = ImageFont.load_default()
    colours: dict[str | None, tuple[int, int, int]] = {}
    for obj in objects:
        if obj.pixels is None:
            continue
        colour = colours.setdefault(obj.label, _COLOURS[len(colours) % len(_COLOURS)])
        p = obj.pixels
        if obj.kind == "box":
            pen.rectangle(p, outline=colour, width=width)
            anchor = (p[0], p[1])
        elif obj.kind == "quad":
            pen.polygon(p, outline=colour, width=width)
            anchor = (min(p[0::2]), min(p[1::2]))
        else:
            r = width * 3
            pen.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=colour, outline=(255, 255, 255))
            anchor = (p[0] + r, p[1] - r)
        if obj.label:
            left, top, right, bottom = pen.textbbox((0, 0), obj.label, font=font)
            tw, th = right - left + 4, bottom - top + 4
            x = min(max(anchor[0], 0), max(out.width - tw, 0))
            y = anchor[1] - th if anchor[1] >= th else anchor[1]   # above the shape, or inside at the top edge
            pen.rectangle((x, y, x + tw, y + th), fill=colour)
            pen.text((x + 2 - left, y + 2 - top), obj.label, fill=(255, 255, 255), font=font)
    return out
