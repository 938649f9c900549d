"""`minicpmv-edge imatrix`: an importance matrix from image+text prompts, in llama.cpp's imatrix format.

    minicpmv-edge imatrix CHECKPOINT_OR_BUNDLE --calib builtin [--calib DIR] --out imatrix.gguf [--text-only]

llama.cpp's `llama-imatrix` only sees text, so the activations a VLM's LLM gets from image embeddings never
reach its statistics. Here the calibration prompts run through the runtime's own path (vision encoder,
resampler, embedding rows injected into llama.cpp), and llama.cpp's eval callback hands us every matrix
multiplication's input as it is computed. The statistic is llama.cpp's (tools/imatrix): for each weight
`blk.N.*.weight`, the sum over all tokens of each input column's squared activation, and the number of tokens.
`quantize_gguf(..., imatrix=...)` (and `export --imatrix FILE`) hands `sum / count` to llama.cpp's quantizer,
which weighs each column's rounding error by it.

File format (GGUF, as llama.cpp's imatrix tool writes and its `common/imatrix-loader` reads): per weight two F32
tensors `<name>.in_sum2` [n_mat, ne0] and `<name>.counts` [n_mat, 1]; keys `general.type = "imatrix"`,
`imatrix.datasets` (names of the calibration sets), `imatrix.chunk_count` (here: prompts run) and
`imatrix.chunk_size` (here: positions in the longest prompt).
"""
from __future__ import annotations

import ctypes
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_CALIB_FILES = 1000          # a calibration folder is read whole: bound it
MAX_TEXT_BYTES = 1 << 20        # per sidecar / text file
MAX_QUESTIONS_PER_IMAGE = 16
MAX_IMATRIX_ENTRIES = 100_000   # a loaded imatrix: weights listed
MAX_IMATRIX_VALUES = 1 << 28    # ... and float values in all (1 GiB)
DEFAULT_ANSWER_TOKENS = 16


# ----------------------------------------------------------------------------------------------- the file
@dataclass
class Imatrix:
    """Per weight: summed squared input activations [n_mat, ne0] (float64 while collecting) and token counts."""
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0       # calibration prompts run
    chunk_size: int = 0        # positions in the longest prompt

    def importance(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer wants: sum / count per column (all ones where nothing was seen)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].reshape(-1, 1).astype(np.float64)
            v = np.where(c > 0, s / np.maximum(c, 1), 1.0)
            out[name] = np.ascontiguousarray(v.reshape(-1), dtype=np.float32)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the GGUF imatrix (temporary name, renamed when complete)."""
        import gguf
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        # GGUFWriter always adds general.architecture; llama.cpp's imatrix files carry general.type instead
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(self.datasets) or ["unnamed"])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, self.chunk_count)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.chunk_size)
        for name in sorted(self.sums):
            s = np.asarray(self.sums[name], dtype=np.float32)
            w.add_tensor(f"{name}.in_sum2", s.reshape(-1, s.shape[-1]))
            w.add_tensor(f"{name}.counts", np.asarray(self.counts[name], dtype=np.float32).reshape(-1, 1))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Imatrix":
        """Read a GGUF imatrix (ours or llama.cpp's), checking what llama.cpp's loader checks."""
        import gguf
        path = Path(path)
        if not path.is_file():
            raise MiniCPMVEdgeError(f"{path}: file not found")
        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError) as exc:
            raise MiniCPMVEdgeError(f"{path}: not a GGUF imatrix file ({exc})") from None
        kind = reader.get_field(gguf.Keys.General.TYPE)
        if kind is None or kind.contents() != gguf.GGUFType.IMATRIX:
            raise MiniCPMVEdgeError(f"{path}: general.type is not 'imatrix' (a model GGUF, or the legacy .dat "
                                    "format? convert it with llama.cpp's llama-imatrix)")
        if len(reader.tensors) > 2 * MAX_IMATRIX_ENTRIES:
            raise MiniCPMVEdgeError(f"{path}: {len(reader.tensors)} tensors, more than any model has")
        im = cls()
        ds = reader.get_field(gguf.Keys.IMatrix.DATASETS)
        im.datasets = list(ds.contents()) if ds is not None else []
        for key, attr in ((gguf.Keys.IMatrix.CHUNK_COUNT, "chunk_count"), (gguf.Keys.IMatrix.CHUNK_SIZE, "chunk_size")):
            f = reader.get_field(key)
            setattr(im, attr, int(f.contents()) if f is not None else 0)
        pairs: dict[str, dict[str, Any]] = {}
        total = 0
        for t in reader.tensors:
            for suffix in (".in_sum2", ".counts"):
                if t.name.endswith(suffix):
                    if t.tensor_type != gguf.GGMLQuantizationType.F32:
                        raise MiniCPMVEdgeError(f"{path}: tensor {t.name} is {t.tensor_type.name}, expected F32")
                    total += int(t.n_elements)
                    if total > MAX_IMATRIX_VALUES:
                        raise MiniCPMVEdgeError(f"{path}: more than {MAX_IMATRIX_VALUES} values")
                    # GGUF lists dims innermost first: in_sum2 is [ne0, n_mat] there, [n_mat, ne0] in numpy
                    arr = np.array(t.data, dtype=np.float32).reshape(int(np.prod(t.shape[1:], dtype=np.int64)) or 1,
                                                                      int(t.shape[0]))
                    pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = arr
        for name, p in pairs.items():
            if set(p) != {".in_sum2", ".counts"}:
                raise MiniCPMVEdgeError(f"{path}: {name} has {', '.join(p)} but not both .in_sum2 and .counts")
            s, c = p[".in_sum2"], p[".counts"].reshape(-1)
            if s.shape[0] != c.size:
                raise MiniCPMVEdgeError(f"{path}: {name}: {s.shape[0]} matrices in .in_sum2 but {c.size} counts")
            if not (np.isfinite(s).all() and np.isfinite(c).all()) or (s < 0).any() or (c < 0).any():
                raise MiniCPMVEdgeError(f"{path}: {name} holds negative or non-finite values")
            im.sums[name], im.counts[name] = s.astype(np.float64), np.rint(c).astype(np.int64)
        if not im.sums:
            raise MiniCPMVEdgeError(f"{path}: no <name>.in_sum2 / <name>.counts tensors")
        return im


# ----------------------------------------------------------------------------------------------- collection
GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 64, 10, 64
GGML_TYPE_F32 = 0


class _GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of the ggml that llama-cpp-python 0.3.36 vendors (ggml/include/ggml.h). The layout
    is checked against ggml's own accessors on the first tensors seen (`_check_layout`)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * GGML_MAX_SRC),
                ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * GGML_MAX_NAME), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _check_layout(ptr: int, t: _GgmlTensor) -> None:
    from minicpmv_edge.export import ggml_lib
    if ggml_lib.lib().ggml_get_name(ptr) != t.name or ggml_lib.lib().ggml_nelements(ptr) != math.prod(t.ne):
        raise MiniCPMVEdgeError("struct ggml_tensor differs from the layout quantize/imatrix.py expects "
                                "(a llama-cpp-python other than 0.3.36?)")


def weight_name(tensor_name: bytes) -> str:
    """llama.cpp's imatrix naming: a name with `#` keeps the part between the first two (split weights)."""
    name = tensor_name.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


class ImatrixCollector:
    """llama.cpp eval callback that accumulates, for every `blk.*` weight matmul, the squared input activations
    per column and the number of input rows. Pass `collector.callback` as the Decoder's `eval_callback`."""

    def __init__(self, *, include_output: bool = False):
        import llama_cpp

        from minicpmv_edge.export import ggml_lib
        self.ggml = ggml_lib.lib()
        self.mul_mat = ggml_lib.op_id("MUL_MAT")
        if self.mul_mat < 0:
            raise MiniCPMVEdgeError("this ggml has no MUL_MAT op")
        self.include_output = include_output
        self.active = True           # off while generating the answer tokens that are then replayed
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self._checked = 0
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.include_output and name == "output.weight")

    def _on_eval(self, ptr: int, ask: bool, _user: Any) -> bool:
        # an exception must not cross into C: keep it, skip the rest, and raise after the decode returns
        try:
            if self.error is not None:
                return not ask
            t = _GgmlTensor.from_address(ptr)
            if self._checked < 8:
                _check_layout(ptr, t)
                self._checked += 1
            if ask:
                if not self.active or t.op != self.mul_mat or not t.src[0] or not t.src[1]:
                    return False
                src0, src1 = _GgmlTensor.from_address(t.src[0]), _GgmlTensor.from_address(t.src[1])
                return src1.type == GGML_TYPE_F32 and self._wanted(weight_name(src0.name))
            self._collect(t)
        except BaseException as exc:   # noqa: BLE001 - re-raised by raise_if_failed
            self.error = exc
        return True

    def _collect(self, t: _GgmlTensor) -> None:
        src0, src1 = _GgmlTensor.from_address(t.src[0]), _GgmlTensor.from_address(t.src[1])
        name = weight_name(src0.name)
        if src0.ne[2] * src0.ne[3] != 1:
            raise MiniCPMVEdgeError(f"{name}: 3-D (expert) weights are not supported by this collector")
        ne, nb = list(src1.ne), list(src1.nb)
        if nb[0] != 4:
            raise MiniCPMVEdgeError(f"{name}: activation rows are not packed float32")
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
        if self.ggml.ggml_backend_buffer_is_host(src1.buffer):
            buf = (ctypes.c_char * span).from_address(src1.data)
        else:                          # offloaded (GPU) activations: copy them out first
            buf = ctypes.create_string_buffer(self.ggml.ggml_nbytes(t.src[1]))
            self.ggml.ggml_backend_tensor_get(t.src[1], buf, 0, len(buf))
        x = np.ndarray(shape=tuple(reversed(ne)), dtype=np.float32, buffer=buf, strides=tuple(reversed(nb)))
        x = x.reshape(-1, ne[0])
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if not np.isfinite(sq).all():
            raise MiniCPMVEdgeError(f"{name}: non-finite activations")
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = sq
            self.counts[name] = x.shape[0]
        elif acc.shape != sq.shape:
            raise MiniCPMVEdgeError(f"{name}: input width changed from {acc.shape[0]} to {sq.shape[0]}")
        else:
            acc += sq
            self.counts[name] += x.shape[0]

    def raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, MiniCPMVEdgeError):
                raise err
            raise MiniCPMVEdgeError(f"imatrix collection failed: {err!r}") from err

    def result(self, datasets: Sequence[str], chunk_count: int, chunk_size: int) -> Imatrix:
        if not self.sums:
            raise MiniCPMVEdgeError("no matrix multiplication was seen: nothing to write")
        return Imatrix({k: v.reshape(1, -1) for k, v in self.sums.items()},
                       {k: np.array([c], dtype=np.int64) for k, c in self.counts.items()},
                       list(datasets), chunk_count, chunk_size)


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class CalibPrompt:
    """One calibration conversation turn: an image (or None), a question, and a caption that stands in for
    the image in text-only calibration."""
    image: Any
    question: str
    caption: str = ""
    source: str = "builtin"

    def messages(self, text_only: bool) -> list[dict[str, Any]]:
        if text_only or self.image is None:
            text = f"{self.caption}\n{self.question}" if self.caption else self.question
            return [{"role": "user", "content": text}]
        return [{"role": "user", "content": [{"type": "image", "image": self.image},
                                             {"type": "text", "text": self.question}]}]


_WORDS = ("total", "invoice", "exit", "open", "closed", "north", "station", "coffee", "price", "sale", "room",
          "floor", "warning", "report", "march", "delivery", "order", "ticket", "gate", "platform")
_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "orange": (240, 150, 30),
           "purple": (140, 60, 180), "black": (20, 20, 20)}


def builtin_calibration(n: int = 12, seed: int = 1234) -> list[CalibPrompt]:
    """Generated images with printed text, bar and line charts, and shapes, with questions and captions.
    Deterministic; different images and questions from the sweep's held-out evaluation set."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    sizes = [(448, 448), (640, 480), (800, 400), (480, 640)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        img = Image.new("RGB", (w, h), (250 - rng.randrange(30), 250 - rng.randrange(30), 245))
        d = ImageDraw.Draw(img)
        kind = ("text", "bars", "line", "shapes")[i % 4]
        if kind == "text":
            lines = [" ".join(rng.choice(_WORDS) for _ in range(3)) + f" {rng.randrange(100)}.{rng.randrange(100):02d}"
                     for _ in range(rng.randrange(3, 7))]
            for k, line in enumerate(lines):
                d.text((20, 20 + k * (h - 40) // len(lines)), line.upper(), fill=(10, 10, 10))
            q = rng.choice(("What does the text say?", "Read the numbers in the image.", "What is the first line?"))
            cap = "A printed card that reads: " + "; ".join(lines) + "."
        elif kind == "bars":
            vals = [rng.randrange(10, 100) for _ in range(rng.randrange(3, 7))]
            bw = (w - 40) // len(vals)
            for k, v in enumerate(vals):
                x0 = 20 + k * bw
                d.rectangle((x0 + 4, h - 30 - v * (h - 60) // 100, x0 + bw - 4, h - 30), fill=list(_COLORS.values())[k])
                d.text((x0 + bw // 3, h - 24), chr(65 + k), fill=(0, 0, 0))
            d.line((16, h - 30, w - 16, h - 30), fill=(0, 0, 0), width=2)
            q = rng.choice(("Which bar is the tallest?", "Compare the bars.", "What does this chart show?"))
            cap = "A bar chart: " + ", ".join(f"{chr(65 + k)} = {v}" for k, v in enumerate(vals)) + "."
        elif kind == "line":
            pts = [(20 + k * (w - 40) // 7, 30 + rng.randrange(h - 60)) for k in range(8)]
            d.line(pts, fill=_COLORS["blue"], width=3)
            for p in pts:
                d.ellipse((p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4), fill=_COLORS["red"])
            trend = "rises" if pts[-1][1] < pts[0][1] else "falls"
            q = rng.choice(("Does the line go up or down?", "Describe the trend.", "Where is the highest point?"))
            cap = f"A line chart with 8 points; overall the line {trend}."
        else:
            counts: dict[str, int] = {}
            for _ in range(rng.randrange(3, 9)):
                cname = rng.choice(list(_COLORS))
                shape = rng.choice(("circle", "square", "triangle"))
                x, y, s = rng.randrange(w - 90), rng.randrange(h - 90), rng.randrange(30, 90)
                fill = _COLORS[cname]
                if shape == "circle":
                    d.ellipse((x, y, x + s, y + s), fill=fill)
                elif shape == "square":
                    d.rectangle((x, y, x + s, y + s), fill=fill)
                else:
                    d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
                counts[f"{cname} {shape}"] = counts.get(f"{cname} {shape}", 0) + 1
            q = rng.choice(("How many circles are there?", "What colours are the shapes?", "List the shapes."))
            cap = "Shapes: " + ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in sorted(counts.items())) + "."
        out.append(CalibPrompt(img, q, cap))
    return out


def folder_calibration(folder: str | Path) -> list[CalibPrompt]:
    """A user folder: each image (png/jpg/webp/bmp/gif), with questions from `<stem>.txt` next to it (one per
    line; "Describe this image." if none); every other `.txt` file is a text-only prompt. Only regular files
    directly inside the folder are read."""
    root = Path(folder)
    if not root.is_dir():
        raise MiniCPMVEdgeError(f"{root}: calibration folder not found")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink())
    if len(files) > MAX_CALIB_FILES:
        raise MiniCPMVEdgeError(f"{root}: {len(files)} files, more than the {MAX_CALIB_FILES} read for calibration")

    def read_text(p: Path) -> str:
        if p.stat().st_size > MAX_TEXT_BYTES:
            raise MiniCPMVEdgeError(f"{p}: larger than {MAX_TEXT_BYTES} bytes")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MiniCPMVEdgeError(f"{p}: not UTF-8 text") from None

    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.stem for p in images}
    out = []
    for p in images:
        side = p.with_suffix(".txt")
        qs = [line.strip() for line in read_text(side).splitlines() if line.strip()] if side.is_file() else []
        for q in (qs or ["Describe this image."])[:MAX_QUESTIONS_PER_IMAGE]:
            out.append(CalibPrompt(p, q, source=str(root)))
    for p in files:
        if p.suffix.lower() == ".txt" and p.stem not in stems:
            text = read_text(p).strip()
            if text:
                out.append(CalibPrompt(None, text, source=str(root)))
    if not out:
        raise MiniCPMVEdgeError(f"{root}: no images or .txt prompts to calibrate on")
    return out


def calibration_set(specs: Sequence[str]) -> list[CalibPrompt]:
    """`builtin` and/or folder paths, in order."""
    out: list[CalibPrompt] = []
    for s in specs:
        out += builtin_calibration() if s == "builtin" else folder_calibration(s)
    return out


# ----------------------------------------------------------------------------------------------- running it
def collect(model, prompts: Sequence[CalibPrompt], *, text_only: bool, collector: ImatrixCollector,
            max_slices: int = 4, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
            progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Run every prompt, plus its greedy answer, through `model` (a MiniCPMV whose decoder reports to
    `collector`): the answer is generated with collection paused, then prompt + answer are prefilled once with
    collection on, so each position counts once. Returns (prompts run, longest prompt in positions)."""
    dec = model.decoder
    longest = 0
    for i, p in enumerate(prompts):
        segments = model.prepare(p.messages(text_only), max_slices=max_slices)
        collector.active = False
        answer = list(dec.generate(segments, max_tokens=answer_tokens, stop_ids=model.stop_ids)) \
            if answer_tokens > 0 else []
        collector.active = True
        dec.reset()
        full = list(segments) + ([answer] if answer else [])
        dec.prefill(full, all_outputs=True)   # like llama-imatrix: every position through the last layer
        collector.raise_if_failed()
        longest = max(longest, dec.n_past)
        dec.reset()
        if progress:
            progress(i + 1, len(prompts))
    return len(prompts), longest


def session_from_files(ckpt, llm_path: Path, vision_path: Path, resampler_path: Path | None, threads: int,
                       eval_callback=None, n_ctx: int = 4096, low_memory: bool = False):
    """A MiniCPMV session over explicit files exported from `ckpt` (the sweep and calibration build cells,
    not bundles). `resampler_path` None: the vision graph ends in LLM embeddings (4.6's default-mode merger
    graph). `low_memory` as in `runtime.bundle.load`."""
    from dataclasses import replace

    from minicpmv_edge.export.bundle import preprocess_section, prompt_section
    from minicpmv_edge.runtime.decoder import Decoder
    from minicpmv_edge.runtime.memory import low_memory_context, resolve_load_mode
    from minicpmv_edge.runtime.resampler import load_resampler
    from minicpmv_edge.runtime.session import MiniCPMV
    from minicpmv_edge.runtime.vision import OnnxVision, ResamplerInGraph
    # what a bundle of this checkpoint would carry, and the position rule a bundle's loader takes from the facts
    cfg = replace(preprocess_section(ckpt).config(), position_rule=ckpt.facts.vision_position_ids)
    resampler = (load_resampler(resampler_path, threads=threads) if resampler_path is not None
                 else ResamplerInGraph(ckpt.llm.hidden_size))
    vision = OnnxVision(vision_path, threads=threads, num_patches_per_side=cfg.num_patches_per_side,
                        position_rule=cfg.position_rule)      # first, as runtime.bundle.load does
    decoder = Decoder(llm_path, threads=threads, n_ctx=n_ctx, eval_callback=eval_callback,
                      load_mode=resolve_load_mode(None, low_memory=low_memory), **low_memory_context(low_memory))
    return MiniCPMV(facts=ckpt.facts, decoder=decoder, vision=vision,
                    resampler=resampler, prompt_format=prompt_section(ckpt).format(), preprocess=cfg,
                    low_memory=low_memory)


def compute_imatrix(open_model: Callable[[Any], Any], prompts: Sequence[CalibPrompt], *, text_only: bool,
                    datasets: Sequence[str], max_slices: int = 4, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
                    include_output: bool = False, progress: bool = False) -> Imatrix:
    """`open_model(eval_callback)` -> a MiniCPMV session; returns the importance matrix of `prompts` on it."""
    collector = ImatrixCollector(include_output=include_output)
    model = open_model(collector.callback)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="imatrix " + ("text" if text_only else "image+text"))
    try:
        n, longest = collect(model, prompts, text_only=text_only, collector=collector, max_slices=max_slices,
                             answer_tokens=answer_tokens, progress=(lambda *_: bar.update(1)) if bar else None)
    finally:
        model.close()
        if bar:
            bar.close()
    return collector.result([f"{d}:{'text' if text_only else 'image+text'}" for d in datasets], n, longest)
