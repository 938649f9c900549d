"""The bundle contract: one folder, one `manifest.json`, and this module, the only code that knows its shape.

The manifest is the runtime's only source of truth about a model: version, preprocessing, prompt format and
every file with its kind, precision, size and sha256 (docs/bundle.md describes every field). Everything about
it is declared here, once:

* `FileKind` and `FILE_KINDS`: each kind of file, the name it is written under and which vision backend runs it
  (a table, as gguf-py's constants.py keeps every on-disk name in one place);
* the typed sections `Manifest` = `ModelSection` + `PreprocessSection` + `PromptSection` + `FileEntry`s, each
  field with its type and the range the model facts allow. `from_dict` checks every field before anything
  uses it and raises `BundleError` naming the field (`preprocess.slice_size: must be between ...`);
  `to_dict` is what the exporter (`export/bundle.py`) writes;
* reading: a bundle is hostile until checked. The manifest must be a regular file of bounded size, JSON of
  bounded depth with bounded integers; every listed path stays inside the folder after resolving symlinks;
  only regular files are opened; what `load` runs is checked against its sha256 (cached per file by size and
  mtime, so a second start does not hash again); the chat template is rendered once when the bundle opens.

`load` builds a `MiniCPMV` session, picking the vision backend from the bundle's files through
`VISION_BACKENDS` (FileKind -> backend).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from minicpmv_edge.errors import BundleError, MiniCPMVEdgeError
from minicpmv_edge.facts import (MAX_SLICE_NUMS, MODEL_FACTS, SLICING_VARIANTS, SPECIAL_TOKEN_ROLES, SUPPORTED_VERSIONS,
                                ModelFacts)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 2 ** 20     # a real manifest is ~10 KB (the chat template is most of it)
MAX_JSON_DEPTH = 16                   # a real manifest nests 5 deep
MAX_INT_DIGITS = 20                   # any integer the schema allows fits in 64 bits
MAX_FILES = 256                       # files listed; contents of one .mlpackage have their own bound
MAX_CONTENTS = 4096
MAX_FILE_BYTES = 2 ** 40              # 1 TiB: larger than any model file, small enough to add without overflow
REEXPORT = "re-export the bundle with `minicpmv-edge export`"


# =============================================================================================
# File kinds and names
# =============================================================================================

class FileKind:
    """The `kind` of each file a manifest lists."""
    LLM_GGUF = "llm_gguf"
    MMPROJ_GGUF = "mmproj_gguf"
    VISION_ONNX = "vision_onnx"
    VISION_RESAMPLER_ONNX = "vision_resampler_onnx"
    VISION_COREML = "vision_coreml"
    # MiniCPM-V 4.6: tower + window merger + merger in one graph, one per downsample mode (no resampler)
    VISION_MERGER_16X_ONNX = "vision_merger_16x_onnx"
    VISION_MERGER_4X_ONNX = "vision_merger_4x_onnx"
    VISION_MERGER_16X_COREML = "vision_merger_16x_coreml"        # the same graphs as CoreML packages
    VISION_MERGER_4X_COREML = "vision_merger_4x_coreml"
    RESAMPLER_WEIGHTS = "resampler_weights"
    TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class KindInfo:
    """What the code knows about one kind of file: the name exporters give it ({name} = the bundle's name
    stem, {precision} = the file's precision, in that kind's spelling; see docs/glossary.md), the vision graph
    it holds, and the output name that identifies that graph."""
    file_name: str
    graph: str | None = None
    graph_output: str | None = None


FILE_KINDS: dict[str, KindInfo] = {
    FileKind.LLM_GGUF: KindInfo("{name}-{precision}.gguf"),                      # llama.cpp / ollama naming
    FileKind.MMPROJ_GGUF: KindInfo("mmproj-{name}-{precision}.gguf"),
    FileKind.VISION_ONNX: KindInfo("vision-{name}-{precision}.onnx", "vision", "patch_features"),
    FileKind.VISION_RESAMPLER_ONNX: KindInfo("vision-resampler-{name}-{precision}.onnx", "vision_resampler",
                                             "image_embeds"),
    FileKind.VISION_COREML: KindInfo("vision-{name}-{precision}.mlpackage", "vision", "patch_features"),
    FileKind.VISION_MERGER_16X_ONNX: KindInfo("vision-merger-16x-{name}-{precision}.onnx", "vision_merger_16x",
                                              "image_embeds"),
    FileKind.VISION_MERGER_4X_ONNX: KindInfo("vision-merger-4x-{name}-{precision}.onnx", "vision_merger_4x",
                                             "image_embeds"),
    FileKind.VISION_MERGER_16X_COREML: KindInfo("vision-merger-16x-{name}-{precision}.mlpackage",
                                                "vision_merger_16x", "image_embeds"),
    FileKind.VISION_MERGER_4X_COREML: KindInfo("vision-merger-4x-{name}-{precision}.mlpackage", "vision_merger_4x",
                                               "image_embeds"),
    FileKind.RESAMPLER_WEIGHTS: KindInfo("resampler-{name}-{precision}.mvr"),
    FileKind.TOKENIZER: KindInfo("tokenizer.json"),
}
KINDS = tuple(FILE_KINDS)
ONNX_VISION_KINDS = (FileKind.VISION_ONNX, FileKind.VISION_RESAMPLER_ONNX, FileKind.VISION_MERGER_16X_ONNX,
                     FileKind.VISION_MERGER_4X_ONNX)
COREML_VISION_KINDS = (FileKind.VISION_COREML, FileKind.VISION_MERGER_16X_COREML, FileKind.VISION_MERGER_4X_COREML)
VISION_KINDS = ONNX_VISION_KINDS + COREML_VISION_KINDS


def file_name(kind: str, name: str, precision: str | None = None) -> str:
    """The file name exporters write a file of `kind` under, e.g. `file_name(FileKind.LLM_GGUF, "m", "Q4_K_M")`."""
    return FILE_KINDS[kind].file_name.format(name=name, precision=precision)


def graph_of_outputs(output_names) -> str:
    """"vision_resampler" when a 2.6-4.5 vision graph ends in the resampler's output, else "vision". (4.6's merger
    graphs end in the same output name: they carry their graph name in the ONNX metadata, see
    export/onnx_vision.graph_of.)"""
    fused = FILE_KINDS[FileKind.VISION_RESAMPLER_ONNX]
    return fused.graph if fused.graph_output in set(output_names) else "vision"


def kind_of_graph(graph: str, kinds: tuple[str, ...] = ONNX_VISION_KINDS) -> str:
    """The file kind among `kinds` (ONNX by default, or COREML_VISION_KINDS) that holds vision graph `graph`
    ("vision", "vision_resampler", "vision_merger_16x", ...)."""
    for kind in kinds:
        if FILE_KINDS[kind].graph == graph:
            return kind
    raise MiniCPMVEdgeError(f"unknown vision graph {graph!r} (choose from "
                            f"{', '.join(FILE_KINDS[k].graph for k in kinds)})")


# what a session prefers when the caller does not say (smallest good-quality choices first)
LLM_PREFERENCE = ("Q4_K_M", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32")
VISION_PREFERENCE = ("fp32", "fp16", "int8")
RESAMPLER_PREFERENCE = ("f32", "f16")


# =============================================================================================
# The schema: typed sections that check themselves on read
# =============================================================================================

@dataclass(frozen=True)
class Where:
    """The manifest file and the field being read, for error messages (`files[2].external_data[0].sha256`)."""
    path: Path
    field: str = ""

    def __truediv__(self, name: str) -> "Where":
        return Where(self.path, f"{self.field}.{name}" if self.field else name)

    def __getitem__(self, i: int) -> "Where":
        return Where(self.path, f"{self.field}[{i}]")

    def error(self, message: str) -> BundleError:
        return BundleError(self.path, message, self.field or None)


@dataclass(frozen=True)
class Rule:
    """Bounds of one field: numbers in [lo, hi]; strings and lists at most `max_len` long (or exactly `length`);
    strings one of `choices` or matching `pattern`."""
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    length: int | None = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None


def spec(default: Any = MISSING, **rule: Any) -> Any:
    """A section field with its Rule (no default: the field is required)."""
    meta = {"rule": Rule(**rule)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


STR_MAX = 4096
LIST_MAX = 1024
DIM = dict(lo=1, hi=2 ** 20)          # a width, layer or head count: positive, far below anything allocatable
SHA256 = dict(pattern=r"[0-9a-f]{64}")
PRECISION = dict(pattern=r"[A-Za-z0-9_.\-]{1,32}")


def _type_name(t: Any) -> str:
    return {bool: "true/false", int: "integer", float: "number", str: "string", list: "list",
            dict: "object"}.get(t, getattr(t, "__name__", str(t)))


def _num(x: float | None) -> str:
    return "any" if x is None else str(int(x)) if float(x).is_integer() and abs(x) < 2 ** 63 else f"{x:g}"


def _read(value: Any, hint: Any, rule: Rule, where: Where) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.from_dict(value, where)
    base = origin or hint
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), list: isinstance(value, list), dict: isinstance(value, dict),
          Any: True}[base]
    if not ok:
        raise where.error(f"expected {_type_name(base)}, got {json.dumps(value)[:60]}")
    if base in (int, float):
        if base is float and not math.isfinite(value):
            raise where.error(f"must be a finite number, got {value}")
        if (rule.lo is not None and value < rule.lo) or (rule.hi is not None and value > rule.hi):
            raise where.error(f"must be between {_num(rule.lo)} and {_num(rule.hi)}, got {_num(value)}")
        return float(value) if base is float else value
    if base in (str, list, dict):
        limit = rule.max_len or (STR_MAX if base is str else LIST_MAX)
        if len(value) > limit or (rule.length is not None and len(value) != rule.length):
            want = f"exactly {rule.length}" if rule.length is not None else f"at most {limit}"
            raise where.error(f"must hold {want} {'characters' if base is str else 'items'}, got {len(value)}")
    if base is str:
        if rule.choices is not None and value not in rule.choices:
            raise where.error(f"{value[:60]!r} is not one of {', '.join(rule.choices)}")
        if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
            raise where.error(f"{value[:60]!r} is malformed (expected {rule.pattern})")
        if "\x00" in value:
            raise where.error("contains a NUL character")
    if base is list and args:
        return [_read(v, args[0], Rule(), where[i]) for i, v in enumerate(value)]
    if base is dict and args and args[1] is not Any:
        for k in value:
            if not isinstance(k, str) or len(k) > 64:
                raise where.error(f"key {str(k)[:60]!r} must be a short string")
        return {k: _read(v, args[1], Rule(), where / k) for k, v in value.items()}
    return value


class Section:
    """A manifest object: dataclass fields with `spec` rules. Subclasses add cross-field checks in `check`."""

    @classmethod
    def schema(cls) -> list[tuple[str, Any, Rule, bool]]:
        """(name, type, rule, required) of every field, in order: what readers check and tests enumerate."""
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name], f.metadata.get("rule", Rule()),
                 f.default is MISSING and f.default_factory is MISSING) for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Any, where: Where):
        if not isinstance(data, dict):
            raise where.error(f"expected an object, got {json.dumps(data)[:60]}")
        values = {}
        for name, hint, rule, required in cls.schema():
            if name in data:
                values[name] = _read(data[name], hint, rule, where / name)
            elif required:
                raise (where / name).error("missing")
        obj = cls(**values)
        obj.check(where)
        return obj

    def check(self, where: Where) -> None:
        """Cross-field checks (one field against another)."""

    # optional fields left out of the JSON when unset (the others are written as null)
    OMIT_WHEN_NONE: typing.ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)
                if not (getattr(self, f.name) is None and f.name in self.OMIT_WHEN_NONE)}


def _plain(v: Any) -> Any:
    if isinstance(v, Section):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# --- model -----------------------------------------------------------------------------------

@dataclass
class LLMSection(Section):
    hidden_size: int = spec(**DIM)
    num_hidden_layers: int = spec(**DIM)
    num_attention_heads: int = spec(**DIM)
    num_key_value_heads: int = spec(**DIM)
    head_dim: int = spec(**DIM)
    intermediate_size: int = spec(**DIM)
    vocab_size: int = spec(lo=1, hi=2 ** 24)
    max_position_embeddings: int = spec(lo=1, hi=2 ** 24)
    rope_theta: float = spec(lo=1e-3, hi=1e12)
    rms_norm_eps: float = spec(lo=1e-12, hi=1.0)
    tie_word_embeddings: bool = spec()


@dataclass
class VisionSection(Section):
    hidden_size: int = spec(**DIM)
    num_hidden_layers: int = spec(**DIM)
    num_attention_heads: int = spec(**DIM)
    intermediate_size: int = spec(**DIM)
    patch_size: int = spec(lo=1, hi=64)
    num_patches_per_side: int = spec(lo=1, hi=256)
    layer_norm_eps: float = spec(lo=1e-12, hi=1.0)
    hidden_act: str = spec(max_len=64)


@dataclass
class ResamplerSection(Section):
    embed_dim: int = spec(**DIM)
    num_heads: int = spec(**DIM)
    kv_dim: int = spec(**DIM)
    query_num: int = spec(lo=1, hi=1024)     # real models: 64; each query is one LLM position per slice

    def check(self, where: Where) -> None:
        if self.embed_dim % self.num_heads:
            raise (where / "num_heads").error(f"{self.num_heads} does not divide embed_dim {self.embed_dim}")


@dataclass
class SourceSection(Section):
    checkpoint: str = spec(max_len=255)
    config_sha256: str | None = spec(None, **SHA256)


@dataclass
class ModelSection(Section):
    version: str = spec(choices=SUPPORTED_VERSIONS)
    llm: LLMSection = spec()
    vision: VisionSection = spec()
    resampler: ResamplerSection | None = spec(None)    # None: no resampler (4.6's merger graphs end in embeddings)
    hf_repo: str | None = spec(None, max_len=255)
    llm_arch: str | None = spec(None, max_len=64)
    mmproj_version: int | None = spec(None, lo=0, hi=1000)
    video: str | None = spec(None, max_len=64)
    max_temporal_packing: int | None = spec(None, lo=1, hi=64)
    source: SourceSection | None = spec(None)

    @property
    def facts(self) -> ModelFacts:
        return MODEL_FACTS[self.version]

    def check(self, where: Where) -> None:
        merges = bool(self.facts.downsample_modes)     # the version merges patches instead of resampling
        if (self.resampler is None) != merges:
            raise (where / "resampler").error(
                f"MiniCPM-V {self.version} {'has no' if merges else 'needs a'} resampler section ({REEXPORT})")
        if self.resampler is None:
            return
        if self.resampler.kv_dim != self.vision.hidden_size:
            raise (where / "resampler" / "kv_dim").error(
                f"{self.resampler.kv_dim} differs from model.vision.hidden_size {self.vision.hidden_size}")
        if self.resampler.embed_dim != self.llm.hidden_size:
            raise (where / "resampler" / "embed_dim").error(
                f"{self.resampler.embed_dim} differs from model.llm.hidden_size {self.llm.hidden_size}")


# --- preprocess ------------------------------------------------------------------------------

@dataclass
class PreprocessSection(Section):
    slice_size: int = spec(lo=1, hi=16384)       # further bounded by patch_size x num_patches_per_side, below
    patch_size: int = spec(lo=1, hi=64)
    max_slice_nums: int = spec(lo=1, hi=MAX_SLICE_NUMS)
    norm_mean: list[float] = spec(length=3)
    norm_std: list[float] = spec(length=3)
    slicing: str = spec(choices=SLICING_VARIANTS)
    num_patches_per_side: int = spec(lo=1, hi=256)
    slice_mode: bool | None = spec(None)
    resample: str | None = spec(None, max_len=255)
    order: str | None = spec(None, max_len=255)
    position_ids: str | None = spec(None, max_len=255)

    def check(self, where: Where) -> None:
        if self.slice_size % self.patch_size:
            raise (where / "slice_size").error(f"{self.slice_size} is not a multiple of patch_size {self.patch_size}")
        most = self.patch_size * self.num_patches_per_side    # the ViT's position table covers this many pixels
        if self.slice_size > most:
            raise (where / "slice_size").error(f"{self.slice_size} exceeds patch_size x num_patches_per_side = {most}")
        for i, s in enumerate(self.norm_std):
            if not s > 0:
                raise (where / "norm_std")[i].error(f"must be positive, got {s}")

    def config(self):
        """The session's PreprocessConfig."""
        from .session import PreprocessConfig
        return PreprocessConfig(slice_size=self.slice_size, patch_size=self.patch_size,
                                max_slice_nums=self.max_slice_nums, mean=tuple(self.norm_mean),
                                std=tuple(self.norm_std), slicing=self.slicing,
                                num_patches_per_side=self.num_patches_per_side)


# --- prompt ----------------------------------------------------------------------------------

TOKEN = dict(max_len=64)


@dataclass
class PromptSection(Section):
    chat_template: str = spec(max_len=2 ** 20)
    special_tokens: dict[str, str] = spec(max_len=64)
    use_image_id: bool = spec()
    query_num: int = spec(lo=1, hi=1024)
    stop_tokens: list[str] = spec(max_len=16)
    thinking: bool = spec()
    default_system_prompt: str | None = spec(None, max_len=STR_MAX)
    bos_token: str | None = spec(None, **TOKEN)
    eos_token: str | None = spec(None, **TOKEN)
    template_family: str | None = spec(None, max_len=64)
    placeholder: dict[str, Any] | None = spec(None, max_len=16)

    def check(self, where: Where) -> None:
        for role, text in self.special_tokens.items():
            if role not in SPECIAL_TOKEN_ROLES:
                raise (where / "special_tokens" / role).error(f"unknown role (known: {', '.join(SPECIAL_TOKEN_ROLES)})")
            if not text or len(text) > TOKEN["max_len"]:
                raise (where / "special_tokens" / role).error("must be a token string of 1-64 characters")
        needed = [r for r in ("image_start", "image_end", "slice_start", "slice_end", "image_pad")
                  if r not in self.special_tokens]
        if needed:
            raise (where / "special_tokens" / needed[0]).error("missing")
        if not self.stop_tokens:
            raise (where / "stop_tokens").error("needs at least one token")

    def format(self):
        """The session's PromptFormat."""
        from .prompt import PromptFormat
        return PromptFormat(chat_template=self.chat_template, special_tokens=dict(self.special_tokens),
                            use_image_id=self.use_image_id, query_num=self.query_num, thinking=self.thinking,
                            default_system_prompt=self.default_system_prompt, bos_token=self.bos_token,
                            eos_token=self.eos_token)


# --- generation config ---------------------------------------------------------------------------

@dataclass
class GenerationConfigSection(Section):
    """The sampling values of the checkpoint's generation_config.json, each as the file states it (absent: not
    stated). The runtime uses them where the version's recipe reads them (facts.sampling_defaults)."""
    temperature: float | None = spec(None, lo=0, hi=100)
    top_p: float | None = spec(None, lo=0, hi=1)
    top_k: int | None = spec(None, lo=0, hi=2 ** 24)
    repetition_penalty: float | None = spec(None, lo=0, hi=100)
    OMIT_WHEN_NONE = frozenset({"temperature", "top_p", "top_k", "repetition_penalty"})

    def check(self, where: Where) -> None:
        for name in ("top_p", "repetition_penalty"):    # 0 would make the sampler refuse every request
            if getattr(self, name) == 0:
                raise (where / name).error("must be greater than 0")


# --- files -----------------------------------------------------------------------------------

REL_PATH = dict(max_len=1024)


def _check_rel(rel: str, where: Where) -> None:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~"):
        raise where.error(f"{rel[:80]!r} must be a relative path inside the bundle")


@dataclass
class FileRecord(Section):
    """One file of a multi-file entry: ONNX external data, or a file inside an .mlpackage folder."""
    path: str = spec(**REL_PATH)
    size: int = spec(lo=0, hi=MAX_FILE_BYTES)
    sha256: str = spec(**SHA256)

    def check(self, where: Where) -> None:
        _check_rel(self.path, where / "path")


@dataclass
class ParityGrid(Section):
    OMIT_WHEN_NONE = frozenset({"max_abs"})
    grid: list[int] = spec(length=2)
    min_cosine: float = spec(lo=-1.0, hi=1.0 + 1e-6)
    mean_cosine: float = spec(lo=-1.0, hi=1.0 + 1e-6)
    max_abs: float | None = spec(None, lo=0, hi=1e30)


@dataclass
class Parity(Section):
    """Cosine per output row against the torch reference, measured at export (export/onnx_vision.parity)."""
    OMIT_WHEN_NONE = frozenset({"runtime"})
    min_cosine: float = spec(lo=-1.0, hi=1.0 + 1e-6)
    mean_cosine: float = spec(lo=-1.0, hi=1.0 + 1e-6)
    grids: list[ParityGrid] = spec(max_len=64)
    reference: str | None = spec(None, max_len=255)
    graph: str | None = spec(None, max_len=64)
    runtime: str | None = spec(None, max_len=255)       # what ran the file, when not the default backend


@dataclass
class FileEntry(Section):
    """One file (or .mlpackage folder) of the bundle. `sha256` of a folder hashes the sorted list of
    (path inside the folder, sha256) of its `contents` (`tree_digest`)."""
    OMIT_WHEN_NONE = frozenset({"external_data", "contents", "parity", "graph", "format", "quant", "fused_ops", "io",
                                "minimum_deployment_target"})
    path: str = spec(**REL_PATH)
    kind: str = spec(choices=KINDS)
    size: int = spec(lo=0, hi=MAX_FILE_BYTES * MAX_CONTENTS)
    sha256: str = spec(**SHA256)
    precision: str | None = spec(None, **PRECISION)
    external_data: list[FileRecord] | None = spec(None, max_len=16)
    contents: list[FileRecord] | None = spec(None, max_len=MAX_CONTENTS)
    parity: Parity | None = spec(None)
    # how the file was made, for people and tools (not read by the runtime)
    graph: str | None = spec(None, max_len=64)
    format: str | None = spec(None, max_len=64)
    quant: dict[str, Any] | None = spec(None, max_len=64)
    fused_ops: dict[str, Any] | None = spec(None, max_len=64)
    io: dict[str, Any] | None = spec(None, max_len=8)
    minimum_deployment_target: str | None = spec(None, max_len=32)

    def check(self, where: Where) -> None:
        _check_rel(self.path, where / "path")
        for i, rec in enumerate(self.contents or []):
            if not rec.path.startswith(self.path.rstrip("/") + "/"):
                raise (where / "contents")[i].error(f"{rec.path!r} is not inside {self.path!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.kind in VISION_KINDS:         # "not measured" is written out for vision files
            out["parity"] = _plain(self.parity)
        return out

    def records(self) -> list[FileRecord]:
        """Every file to hash: the file itself, its external data, or a folder's contents."""
        own = [] if self.contents is not None else [FileRecord(self.path, self.size, self.sha256)]
        return own + list(self.external_data or []) + list(self.contents or [])


@dataclass
class Manifest(Section):
    schema_version: int = spec(lo=SCHEMA_VERSION, hi=SCHEMA_VERSION)
    model: ModelSection = spec()
    preprocess: PreprocessSection = spec()
    prompt: PromptSection = spec()
    files: list[FileEntry] = spec(max_len=MAX_FILES)
    name: str | None = spec(None, max_len=255)
    created_by: str | None = spec(None, max_len=255)
    created: str | None = spec(None, max_len=64)
    generation_config: GenerationConfigSection | None = spec(None)
    OMIT_WHEN_NONE = frozenset({"generation_config"})

    def check(self, where: Where) -> None:
        v, pre, prompt = self.model.vision, self.preprocess, self.prompt
        for f in ("patch_size", "num_patches_per_side"):
            if getattr(pre, f) != getattr(v, f):
                raise (where / "preprocess" / f).error(f"{getattr(pre, f)} differs from model.vision.{f} {getattr(v, f)}")
        if self.model.resampler is not None and prompt.query_num != self.model.resampler.query_num:
            raise (where / "prompt" / "query_num").error(
                f"{prompt.query_num} differs from model.resampler.query_num {self.model.resampler.query_num}")
        if not self.files:
            raise (where / "files").error(f"lists no files ({REEXPORT})")
        seen: set[str] = set()
        for i, e in enumerate(self.files):
            if e.path in seen:
                raise (where / "files")[i].error(f"{e.path} is listed twice")
            seen.add(e.path)

    @classmethod
    def read(cls, root: str | Path) -> tuple[Path, "Manifest", dict[str, Any]]:
        """Parse and check `<root>/manifest.json`: (its path, the typed manifest, the raw JSON object)."""
        path, raw = read_manifest_json(Path(root))
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(path, f"schema {json.dumps(version)[:20]} is not the one this code reads "
                                    f"({SCHEMA_VERSION}); {REEXPORT}", "schema_version")
        return path, cls.from_dict(raw, Where(path)), raw

    def entries(self, kind: str) -> list[FileEntry]:
        return [e for e in self.files if e.kind == kind]


# =============================================================================================
# Reading a hostile folder
# =============================================================================================

def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _parse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(obj: Any) -> int:
    depth, level = 0, [obj]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            break
        level = [v for o in level if isinstance(o, (dict, list)) for v in (o.values() if isinstance(o, dict) else o)]
    return depth


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """stat of `path`, which must be a regular file (a FIFO or device would block or never end)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BundleError(path, f"cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(path, f"expected a regular {what}, found {'a folder' if stat.S_ISDIR(st.st_mode) else 'a special file'}")
    return st


def read_manifest_json(root: Path) -> tuple[Path, dict[str, Any]]:
    """`<root>/manifest.json` parsed with its size, depth and integers bounded; (path, JSON object)."""
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(root, f"not a directory (expected a bundle folder with {MANIFEST}, written by "
                                "`minicpmv-edge export`)")
    if not os.path.lexists(path):
        raise BundleError(root, f"no {MANIFEST} (is this an exported bundle? `minicpmv-edge export` makes one)")
    st = regular_file(inside(root, MANIFEST))
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(path, f"{st.st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8")
        manifest = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except (UnicodeDecodeError, ValueError) as exc:      # JSONDecodeError is a ValueError
        raise BundleError(path, f"not valid JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise BundleError(path, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(manifest, dict):
        raise BundleError(path, "top level must be a JSON object")
    if _depth(manifest) > MAX_JSON_DEPTH:
        raise BundleError(path, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return path, manifest


def inside(root: Path, rel: str) -> Path:
    """`root/rel`, resolved (symlinks followed), which must still lie inside `root`."""
    base = root.resolve()
    p = (base / rel).resolve()
    if p != base and base not in p.parents:
        raise BundleError(root / rel, "resolves outside the bundle folder (symlink or path escape)")
    return p


# --- hashing ---------------------------------------------------------------------------------

_HASH_CHUNK = 8 * 2 ** 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(contents: list[FileRecord], base: str) -> str:
    """sha256 of a folder: over "relpath-inside-folder\\0sha256\\n" lines in sorted order."""
    h = hashlib.sha256()
    for c in sorted(contents, key=lambda c: c.path):
        h.update(f"{c.path[len(base) + 1:]}\0{c.sha256}\n".encode())
    return h.hexdigest()


class HashCache:
    """sha256 of files already hashed, keyed by resolved path and valid while (size, mtime_ns) match, so the
    second start of a bundle does not read gigabytes again. One JSON file under the user's cache folder
    ($MINICPMV_EDGE_CACHE, else $XDG_CACHE_HOME/minicpmv-edge, else ~/.cache/minicpmv-edge); unreadable
    or foreign content is ignored, and it is written atomically."""
    MAX_ENTRIES = 4096

    def __init__(self, path: Path | None = None):
        if path is None:
            base = os.environ.get("MINICPMV_EDGE_CACHE") or \
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpmv-edge"
            path = Path(base) / "sha256.json"
        self.path = path
        self.hashed = 0                   # files actually read by this instance (tests and --verbose use it)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        self.entries = data if isinstance(data, dict) else {}

    def sha256(self, path: Path) -> str:
        st = regular_file(path)
        key = str(path.resolve())
        hit = self.entries.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return str(hit[2])
        digest = sha256_file(path)
        self.hashed += 1
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        keep = dict(list(self.entries.items())[-self.MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
            tmp.write_text(json.dumps(keep), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass                          # a read-only home only costs the next start a re-hash


# =============================================================================================
# An opened bundle
# =============================================================================================

@dataclass(frozen=True)
class BundleFile:
    path: Path            # absolute
    rel: str
    kind: str
    precision: str | None
    size: int
    sha256: str | None
    entry: FileEntry | None = None


@dataclass
class Bundle:
    root: Path
    manifest: Manifest
    files: list[BundleFile]
    manifest_path: Path | None = None

    @classmethod
    def open(cls, root: str | Path, *, check_template: bool = True) -> "Bundle":
        """Read and check the manifest (every field, see `Manifest`) and, unless told not to, render the chat
        template once, so a broken or hostile template fails here and not on the first request."""
        root = Path(root)
        path, manifest, _ = Manifest.read(root)
        files = [BundleFile(root / e.path, e.path, e.kind, e.precision, e.size, e.sha256, e) for e in manifest.files]
        if check_template:
            check_chat_template(manifest.prompt, Where(path) / "prompt" / "chat_template")
        return cls(root, manifest, files, path)

    @property
    def facts(self) -> ModelFacts:
        return self.manifest.model.facts

    @property
    def name(self) -> str | None:
        return self.manifest.name

    def choose(self, kind: str, precision: str | None, preference: tuple[str, ...]) -> BundleFile:
        """The file of `kind` with `precision`, or the first available in `preference` order."""
        candidates = [f for f in self.files if f.kind == kind]
        if not candidates:
            raise BundleError(self.root, f"the bundle has no {kind} file")
        if precision is not None:
            for f in candidates:
                if (f.precision or "").lower() == precision.lower():
                    return f
            have = ", ".join(sorted(str(f.precision) for f in candidates))
            raise BundleError(self.root, f"no {kind} in precision {precision!r} (available: {have})")
        ranked = sorted(candidates, key=lambda f: preference.index(f.precision) if f.precision in preference
                        else len(preference))
        return ranked[0]

    def check_present(self, f: BundleFile, hashes: HashCache | None = None) -> Path:
        """The file's path once it is checked: inside the folder, a regular file (every file of a folder entry),
        of the listed size, and, given `hashes`, of the listed sha256 (external data and contents too)."""
        if f.entry is None:
            return f.path
        for rec in f.entry.records():
            p = inside(self.root, rec.path)
            if not os.path.lexists(self.root / rec.path):
                raise BundleError(self.root, f"{rec.path} is listed in the manifest but missing")
            size = regular_file(p).st_size
            if size != rec.size:
                raise BundleError(self.root, f"{rec.path} is {size} bytes, the manifest says {rec.size} "
                                  "(truncated copy? run `minicpmv-edge verify`)")
            if hashes is not None and hashes.sha256(p) != rec.sha256:
                raise BundleError(self.root, f"{rec.path}: sha256 differs from the manifest (modified or corrupted; "
                                  "`minicpmv-edge verify` lists every file, --no-verify skips this check)")
        return inside(self.root, f.rel)


def check_chat_template(prompt: PromptSection, where: Where) -> None:
    """Render the template once through the runtime's own (sandboxed) path, on a message with an image."""
    from .prompt import IMAGE_TAG, PromptError, render

    try:
        render(prompt.format(), [{"role": "user", "content": f"{IMAGE_TAG}\nWhat is in this image?"}],
               enable_thinking=False)
    except PromptError as exc:
        raise where.error(f"does not render ({str(exc)[:200]}); {REEXPORT}") from None


# =============================================================================================
# Loading a session
# =============================================================================================

def _onnx_backend(f: Path, threads: int | None, cfg) -> Any:
    from .vision import OnnxVision
    return OnnxVision(f, threads=threads, num_patches_per_side=cfg.num_patches_per_side,
                      position_rule=cfg.position_rule)


def _coreml_backend(f: Path, threads: int | None, cfg) -> Any:
    from .vision import CoreMLVision
    return CoreMLVision(f, num_patches_per_side=cfg.num_patches_per_side, position_rule=cfg.position_rule)


@dataclass(frozen=True)
class VisionBackendInfo:
    name: str
    make: Callable[[Path, int | None, Any], Any]
    includes_resampler: bool = False      # the graph ends in LLM embeddings: no resampler weights needed
    platforms: tuple[str, ...] | None = None
    downsample_mode: str | None = None    # 4.6 merger graphs: the mode the graph runs (one file kind per mode)


# FileKind -> the backend that runs it (load picks the first kind present that this machine can run)
VISION_BACKENDS: dict[str, VisionBackendInfo] = {
    FileKind.VISION_ONNX: VisionBackendInfo("onnx", _onnx_backend),
    FileKind.VISION_RESAMPLER_ONNX: VisionBackendInfo("onnx-fused", _onnx_backend, includes_resampler=True),
    FileKind.VISION_COREML: VisionBackendInfo("coreml", _coreml_backend, platforms=("darwin",)),
    FileKind.VISION_MERGER_16X_ONNX: VisionBackendInfo("onnx-merger", _onnx_backend, includes_resampler=True,
                                                       downsample_mode="16x"),
    FileKind.VISION_MERGER_4X_ONNX: VisionBackendInfo("onnx-merger", _onnx_backend, includes_resampler=True,
                                                      downsample_mode="4x"),
    FileKind.VISION_MERGER_16X_COREML: VisionBackendInfo("coreml-merger", _coreml_backend, includes_resampler=True,
                                                         platforms=("darwin",), downsample_mode="16x"),
    FileKind.VISION_MERGER_4X_COREML: VisionBackendInfo("coreml-merger", _coreml_backend, includes_resampler=True,
                                                        platforms=("darwin",), downsample_mode="4x"),
}


def runnable_vision_kinds(platform: str | None = None) -> list[str]:
    """The vision kinds a machine runs (`platform`: a `sys.platform` value, default this machine's)."""
    platform = platform or sys.platform
    return [k for k, b in VISION_BACKENDS.items() if b.platforms is None or platform in b.platforms]


def default_vision_kind(b: Bundle, platform: str | None = None) -> str:
    """The vision kind `load` runs when not told: the first of VISION_BACKENDS (ONNX before CoreML) the bundle has
    and `platform` runs, a 4.6 bundle's default downsample mode first."""
    have = {f.kind for f in b.files}
    default_mode = b.facts.default_downsample_mode
    kinds = sorted((k for k in runnable_vision_kinds(platform) if k in have),
                   key=lambda k: VISION_BACKENDS[k].downsample_mode not in (None, default_mode))
    if not kinds:
        listed = ", ".join(sorted(have & set(VISION_BACKENDS))) or "none"
        raise BundleError(b.root, f"no vision file this machine can run (the bundle has: {listed}; runnable "
                          f"here: {', '.join(runnable_vision_kinds(platform))})")
    return kinds[0]


def other_mode_files(b: Bundle, kind: str, precision: str | None) -> dict[str, tuple[str, BundleFile]]:
    """4.6: downsample mode -> (kind, file) of each other mode's graph that runs on the same backend as `kind`
    (ONNX with ONNX, CoreML with CoreML), in `precision` where the bundle has it."""
    backend = VISION_BACKENDS[kind].name
    out = {}
    for other, info in VISION_BACKENDS.items():
        if (info.name != backend or info.downsample_mode in (None, b.facts.default_downsample_mode)
                or not any(f.kind == other for f in b.files)):
            continue
        same = [f for f in b.files if f.kind == other and f.precision == precision]
        out[info.downsample_mode] = (other, same[0] if same else b.choose(other, None, VISION_PREFERENCE))
    return out


def _other_mode_loaders(b: Bundle, main: BundleFile, threads: int | None, cfg, hashes: HashCache | None
                        ) -> dict[str, Callable[[], Any]]:
    """4.6: a loader for each other downsample mode's graph in the bundle (run on that mode's first request)."""
    return {mode: (lambda f=f, make=VISION_BACKENDS[k].make: make(b.check_present(f, hashes), threads, cfg))
            for mode, (k, f) in other_mode_files(b, main.kind, main.precision).items()}


def load(bundle: str | Path | Bundle, *, llm: str | None = None, vision: str | None = None,
         vision_kind: str | None = None, resampler: str = "auto", threads: int | None = None, n_ctx: int = 4096,
         exact: bool = False, image_cache_size: int = 32, verify: bool = True, hashes: HashCache | None = None,
         eval_callback=None, low_memory: bool = False, load_mode: str | None = None):
    """Load a bundle into a ready `MiniCPMV`. `llm`/`vision` pick a precision (default: the first of
    LLM_PREFERENCE / VISION_PREFERENCE present); `vision_kind` a vision file kind (default: the first of
    VISION_BACKENDS the bundle has and this machine runs); `resampler` is "auto", "native" or "numpy".
    With `verify` (the default) every file loaded is checked against its sha256 first (cached, see HashCache).
    `eval_callback`: llama.cpp's graph callback for the decoder (quantize/imatrix.py collects statistics with it).
    `load_mode` says how the LLM weights are held (runtime/memory.py; default: resident once for this CPU);
    `low_memory` keeps them in evictable file pages and frees the vision session between requests."""
    from .decoder import Decoder
    from .memory import default_threads, low_memory_context, resolve_load_mode
    from .resampler import load_resampler
    from .session import MiniCPMV
    from .vision import ResamplerInGraph

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    m = b.manifest
    hashes = (hashes or HashCache()) if verify else None
    default_mode = b.facts.default_downsample_mode
    if vision_kind is None:
        vision_kind = default_vision_kind(b)
    if vision_kind not in VISION_BACKENDS:
        raise BundleError(b.root, f"{vision_kind!r} is not a vision file kind ({', '.join(VISION_BACKENDS)})")
    backend = VISION_BACKENDS[vision_kind]
    llm_file = b.check_present(b.choose(FileKind.LLM_GGUF, llm, LLM_PREFERENCE), hashes)
    vis_entry = b.choose(vision_kind, vision, VISION_PREFERENCE)
    vis_file = b.check_present(vis_entry, hashes)
    res_file = None if backend.includes_resampler else \
        b.check_present(b.choose(FileKind.RESAMPLER_WEIGHTS, None, RESAMPLER_PREFERENCE), hashes)
    if hashes is not None:
        hashes.save()
    if backend.downsample_mode not in (None, default_mode):
        raise BundleError(b.root, f"{vision_kind}: runs downsample mode {backend.downsample_mode}, but a session's "
                          f"main vision graph must run the default mode {default_mode}")
    cfg = replace(m.preprocess.config(), position_rule=b.facts.vision_position_ids)
    other_modes = _other_mode_loaders(b, vis_entry, threads, cfg, hashes)
    # the vision session first: onnxruntime's load-time peak (it parses the whole model file, then packs the
    # weights) then does not stack on the LLM's weights, KV cache and compute buffer already resident
    vis = backend.make(vis_file, threads, cfg)
    decoder = Decoder(llm_file, n_ctx=n_ctx, threads=threads, exact=exact, eval_callback=eval_callback,
                      load_mode=resolve_load_mode(load_mode, low_memory=low_memory), **low_memory_context(low_memory))
    try:
        embed_dim = m.model.resampler.embed_dim if m.model.resampler is not None else m.model.llm.hidden_size
        res = ResamplerInGraph(embed_dim) if res_file is None else \
            load_resampler(res_file, backend=resampler, threads=threads or default_threads(),
                            expect_embed_dim=decoder.n_embd)
    except Exception:
        decoder.close()
        raise
    model = MiniCPMV(facts=b.facts, decoder=decoder, vision=vis, resampler=res, prompt_format=m.prompt.format(),
                     preprocess=cfg, image_cache_size=image_cache_size, low_memory=low_memory,
                     vision_modes=other_modes,
                     generation_config=m.generation_config.to_dict() if m.generation_config else None)
    model.bundle, model.files = b, {"llm": llm_file, "vision": vis_file, "resampler": res_file}
    model.vision_kind = vision_kind
    return model


__all__ = ["MANIFEST", "SCHEMA_VERSION", "FileKind", "FILE_KINDS", "KINDS", "file_name", "graph_of_outputs",
           "Manifest", "ModelSection", "PreprocessSection", "PromptSection", "FileEntry", "FileRecord", "Parity",
           "Section", "Where", "Bundle", "BundleFile", "BundleError", "HashCache", "VISION_BACKENDS", "load",
           "default_vision_kind", "other_mode_files", "runnable_vision_kinds", "COREML_VISION_KINDS",
           "read_manifest_json", "regular_file", "inside", "sha256_file", "tree_digest"]
