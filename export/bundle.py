"""The self-describing bundle: one folder per exported model, with a `manifest.json` that says everything a
runtime needs and lets anyone check every byte.

    write_manifest("out/", ckpt, {"llm:Q4_K_M": p1, "mmproj:F16": p2}, parity)     # after `export`
    report = verify_bundle("out/", against="MiniCPM-V-4_5")                          # `minicpmv-edge verify`

Key names, the schema version and the file kinds belong to the reader, `minicpmv_edge.runtime.bundle`
(the lower layer); this module writes and checks them. The manifest (schema 1) holds:

* `model` - version, the facts-table fields a runtime needs, and the dims of the LLM, ViT and resampler
  (read from config.json), plus the source checkpoint's name and config.json sha256;
* `preprocess` - slice size, patch, max slices, mean/std, slicing variant, position table side, order;
* `prompt` - the chat template text, special tokens by role, the image-placeholder grammar, use_image_id,
  query count, stop tokens, thinking switch, default system prompt, bos/eos strings;
* `files` - every file: path relative to the bundle, kind, precision, size, sha256, plus per kind
  `quant` (how it was quantized), `graph`/`io` (vision models), `external_data` (ONNX weights stored
  beside the graph) or `contents` (the files inside an .mlpackage folder; its `sha256` hashes the sorted
  list of (path, sha256) of the contents), and `parity`: the cosine per output row against the torch
  reference measured at export time (null where it cannot be measured, e.g. CoreML on Linux).

`verify_bundle` re-checks sizes and hashes (and, given a checkpoint, re-measures the vision parity);
malformed manifests raise `BundleError` naming the file and field; missing or changed files are reported
one line each, naming the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from minicpmv_edge import __version__
from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import MODEL_FACTS
from minicpmv_edge.runtime.bundle import MANIFEST, SCHEMA_VERSION, BundleError, FileKind, read_manifest

__all__ = ["BundleFileSpec", "KINDS", "KEY_KINDS", "write_manifest", "manifest_dict", "verify_bundle",
           "VerifyReport", "measure_vision_parity", "file_entry", "sha256_file", "main"]

KINDS = tuple(v for k, v in vars(FileKind).items() if k.isupper())
# short role names accepted in "role:precision" keys (export/pipeline.py's ExportResult.files keys)
KEY_KINDS = {"llm": FileKind.LLM_GGUF, "mmproj": FileKind.MMPROJ_GGUF, "vision": FileKind.VISION_ONNX,
             "vision_onnx": FileKind.VISION_ONNX, "vision_resampler": FileKind.VISION_RESAMPLER_ONNX,
             "vision_resampler_onnx": FileKind.VISION_RESAMPLER_ONNX, "coreml": FileKind.VISION_COREML,
             "vision_coreml": FileKind.VISION_COREML, "resampler": FileKind.RESAMPLER_WEIGHTS,
             "resampler_weights": FileKind.RESAMPLER_WEIGHTS, "tokenizer": FileKind.TOKENIZER}
VISION_ONNX_KINDS = (FileKind.VISION_ONNX, FileKind.VISION_RESAMPLER_ONNX)
# verify --against: a re-measured min cosine may differ from the recorded one by thread scheduling only
PARITY_TOLERANCE = 1e-4
_HASH_CHUNK = 8 * 2 ** 20


@dataclass
class BundleFileSpec:
    """One file (or .mlpackage folder) to list in the manifest."""
    path: Path
    kind: str
    precision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)     # quant, graph, io, ... (copied into the entry)


# =============================================================================================
# Hashing
# =============================================================================================

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(contents: list[dict[str, Any]], base: str) -> str:
    """sha256 of a folder: over "relpath-inside-folder\\0sha256\\n" lines in sorted order."""
    h = hashlib.sha256()
    for c in sorted(contents, key=lambda c: c["path"]):
        h.update(f"{c['path'][len(base) + 1:]}\0{c['sha256']}\n".encode())
    return h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise BundleError(root, f"{path} is not inside the bundle folder") from None


def _locate(root: Path, path: str | Path) -> Path:
    """A path as given (absolute, or relative to the working directory, as export writes them), else relative to
    the bundle folder."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else root / p


def file_entry(root: Path, spec: BundleFileSpec) -> dict[str, Any]:
    """The manifest entry of one file or folder (hashes computed here)."""
    path = _locate(root, spec.path)
    if spec.kind not in KINDS:
        raise MiniCPMVEdgeError(f"{path}: unknown file kind {spec.kind!r} (known: {', '.join(KINDS)})")
    if not path.exists():
        raise MiniCPMVEdgeError(f"{path}: file not found (cannot list it in the manifest)")
    rel = _rel(path, root)
    entry: dict[str, Any] = {"path": rel, "kind": spec.kind, "precision": spec.precision}
    if path.is_dir():
        contents = [{"path": _rel(p, root), "size": p.stat().st_size, "sha256": sha256_file(p)}
                    for p in sorted(path.rglob("*")) if p.is_file()]
        entry.update(size=sum(c["size"] for c in contents), sha256=_tree_digest(contents, rel), contents=contents)
    else:
        entry.update(size=path.stat().st_size, sha256=sha256_file(path))
    extra = dict(spec.extra)
    ext = extra.pop("external_data", None)
    if ext:
        entry["external_data"] = [{"path": _rel(_locate(root, p), root), "size": _locate(root, p).stat().st_size,
                                   "sha256": sha256_file(_locate(root, p))} for p in ext]
    entry.update(extra)
    return entry


# =============================================================================================
# Writing
# =============================================================================================

def _spec_from_key(key: str, path: Path) -> BundleFileSpec:
    role, _, precision = key.partition(":")
    if role not in KEY_KINDS:
        raise MiniCPMVEdgeError(f"file key {key!r}: unknown role {role!r} (use one of {', '.join(KEY_KINDS)})")
    kind, extra = KEY_KINDS[role], {}
    data = Path(str(path) + ".data")
    if kind in VISION_ONNX_KINDS and data.is_file():        # ONNX weights stored beside the graph
        extra["external_data"] = [str(data)]
    return BundleFileSpec(Path(path), kind, precision or None, extra)


def _spec_from_artifact(obj: Any) -> BundleFileSpec:
    """OnnxArtifact (export/onnx_vision.py) or CoremlArtifact (export/coreml_vision.py)."""
    from .onnx_vision import OnnxArtifact

    if isinstance(obj, OnnxArtifact):
        kind = FileKind.VISION_RESAMPLER_ONNX if obj.graph == "vision_resampler" else FileKind.VISION_ONNX
        extra: dict[str, Any] = {"graph": obj.graph, "format": "onnx", "fused_ops": obj.fused}
        precision = obj.precision
        if obj.quant:
            extra["quant"] = obj.quant
        extra["io"] = _onnx_io(obj.graph)
        if len(obj.files) > 1:
            extra["external_data"] = [str(p) for p in obj.files[1:]]
        return BundleFileSpec(obj.path, kind, precision, extra)
    from .coreml_vision import CoremlArtifact

    if isinstance(obj, CoremlArtifact):
        return BundleFileSpec(obj.path, FileKind.VISION_COREML, obj.precision,
                              {"format": "mlpackage", "graph": "vision", "quant": obj.quant, "io": obj.io,
                               "minimum_deployment_target": obj.target})
    raise MiniCPMVEdgeError(f"cannot list {obj!r} in a manifest (expected a path, BundleFileSpec or artifact)")


def _onnx_io(graph: str) -> dict[str, Any]:
    from .onnx_vision import GRAPHS, IO

    return {"inputs": {IO.PIXEL_VALUES.value: ["float32", [1, 3, "14*h", "14*w"]],
                       IO.POSITION_IDS.value: ["int64", ["h", "w"]]},
            "outputs": {GRAPHS[graph].value: ["float32", [1, "h*w" if graph == "vision" else "query_num",
                                                          "C" if graph == "vision" else "D"]]}}


def _specs(files: Any) -> list[BundleFileSpec]:
    if isinstance(files, Mapping):    # "role:precision" -> a path, or the exporter's artifact for it
        return [_spec_from_key(k, Path(v)) if isinstance(v, (str, os.PathLike)) else _spec_from_artifact(v)
                for k, v in files.items()]
    out = []
    for f in files:
        if isinstance(f, BundleFileSpec):
            out.append(f)
        elif isinstance(f, Mapping):
            extra = {k: v for k, v in f.items() if k not in ("path", "kind", "precision")}
            out.append(BundleFileSpec(Path(f["path"]), f["kind"], f.get("precision"), extra))
        else:
            out.append(_spec_from_artifact(f))
    return out


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _config_sha256(ckpt) -> str | None:
    p = ckpt.root / "config.json"
    return sha256_file(p) if p.is_file() else None


def placeholder_grammar(ckpt) -> dict[str, Any]:
    t = ckpt.facts.special_tokens
    q = ckpt.resampler.query_num
    return {
        "image_tag": "(<image>./</image>)",
        "image": (f"[{t['image_id_start']}{{index}}{t['image_id_end']}] {t['image_start']} {t['image_pad']}x{q} "
                  f"{t['image_end']} [{{rows}} rows joined by \"\\n\", each {{cols}} x ({t['slice_start']} "
                  f"{t['image_pad']}x{q} {t['slice_end']})]"),
        "notes": ("image id only when use_image_id; index counts images from 0 over the prompt; no newline between "
                  "the overview and the first slice row, none after the last; each pad run is replaced by one "
                  "slice's query_num embeddings, overview first, then slices row-major; video blocks use the "
                  "image form without id or slices, joined by \"\\n\""),
        "pad_token": t["image_pad"],
    }


def manifest_dict(ckpt, entries: list[dict[str, Any]], *, name: str | None = None) -> dict[str, Any]:
    f, v, llm, r, pre = ckpt.facts, ckpt.vision, ckpt.llm, ckpt.resampler, ckpt.preprocess
    tok = ckpt.tokenizer_config
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name or ckpt.root.name,
        "created_by": f"minicpmv-edge {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "version": f.version,
            "hf_repo": f.hf_repo,
            "llm_arch": f.llm_gguf_arch,
            "mmproj_version": f.mmproj_version,
            "video": f.video,
            "max_temporal_packing": f.max_temporal_packing,
            "llm": {k: getattr(llm, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads", "head_dim", "intermediate_size",
                                                 "vocab_size", "max_position_embeddings", "rope_theta",
                                                 "rms_norm_eps", "tie_word_embeddings")},
            "vision": {"hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
                       "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
                       "patch_size": v.patch_size, "num_patches_per_side": v.num_patches_per_side,
                       "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act},
            "resampler": {"embed_dim": r.embed_dim, "num_heads": r.num_heads, "kv_dim": r.kv_dim,
                          "query_num": r.query_num},
            "source": {"checkpoint": ckpt.root.name, "config_sha256": _config_sha256(ckpt)},
        },
        "preprocess": {
            "slice_size": pre.slice_size, "patch_size": pre.patch_size, "max_slice_nums": pre.max_slice_nums,
            "slice_mode": pre.slice_mode, "norm_mean": list(pre.norm_mean), "norm_std": list(pre.norm_std),
            "slicing": f.slicing, "num_patches_per_side": v.num_patches_per_side, "resample": "PIL bicubic",
            "order": "overview first, then cells row-major",
            "position_ids": "NaViT buckets, runtime.preprocess.position_bucket_ids(h, w, num_patches_per_side)",
        },
        "prompt": {
            "chat_template": ckpt.chat_template,
            "template_family": f.chat_template,
            "special_tokens": dict(f.special_tokens),
            "placeholder": placeholder_grammar(ckpt),
            "use_image_id": pre.use_image_id,
            "query_num": r.query_num,
            "stop_tokens": list(f.stop_tokens),
            "thinking": f.thinking,
            "default_system_prompt": f.default_system_prompt,
            "bos_token": _token_string(tok.get("bos_token")) or f.bos_token,
            "eos_token": _token_string(tok.get("eos_token")),
        },
        "files": entries,
    }


def write_manifest(bundle_dir: str | Path, ckpt, files: Any, parity: Mapping[Any, Any] | None = None, *,
                   name: str | None = None) -> Path:
    """Write `<bundle_dir>/manifest.json` listing `files`, all of which must lie inside `bundle_dir`.

    files: a mapping "role:precision" -> path or artifact (roles: KEY_KINDS, e.g. "llm:Q4_K_M", "mmproj:F16",
    "resampler:f16"), or an iterable of OnnxArtifact / CoremlArtifact / BundleFileSpec / dicts
    {"path", "kind", "precision", ...}. parity: path (absolute or bundle-relative) -> the dict
    `onnx_vision.parity` returns (see `measure_vision_parity`); vision files without one get `null`.
    `ckpt` is a Checkpoint or its folder. Written to a temporary name and renamed."""
    from .checkpoint import Checkpoint

    root = Path(bundle_dir)
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
    if not ckpt.chat_template:
        raise MiniCPMVEdgeError(f"{ckpt.root / 'tokenizer_config.json'}: chat_template: missing (nor chat_template.jinja); "
                                "a bundle must carry the template the runtime renders prompts with")
    parity_by_rel = {_rel(_locate(root, k), root): v for k, v in (parity or {}).items()}
    entries = []
    for spec in _specs(files):
        entry = file_entry(root, spec)
        if entry["kind"] in (*VISION_ONNX_KINDS, FileKind.VISION_COREML) or entry["path"] in parity_by_rel:
            entry["parity"] = parity_by_rel.get(entry["path"])
        entries.append(entry)
    seen: set[str] = set()
    for e in entries:
        if e["path"] in seen:
            raise MiniCPMVEdgeError(f"{root / e['path']}: listed twice")
        seen.add(e["path"])
    manifest = manifest_dict(ckpt, entries, name=name)
    out = root / MANIFEST
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def measure_vision_parity(paths: Iterable[str | Path], ckpt, grids=None) -> dict[str, dict[str, Any]]:
    """Parity of each ONNX vision file against the torch reference (onnx_vision.parity); key = str(path)."""
    from .onnx_vision import EXPORT_PARITY_GRIDS, parity, reference_modules

    modules = reference_modules(ckpt)
    return {str(p): parity(p, ckpt, grids or EXPORT_PARITY_GRIDS, modules=modules) for p in paths}


# =============================================================================================
# Reading and checking
# =============================================================================================

def _need(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise BundleError(path, "missing", f"{where}{key}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BundleError(path, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}"[:200],
                          f"{where}{key}")
    return value


def _check_file_record(rec: Any, path: Path, where: str) -> None:
    rel = _need(rec, "path", str, path, where)
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise BundleError(path, f"{rel!r} must be a relative path inside the bundle", f"{where}path")
    size = _need(rec, "size", int, path, where)
    if size < 0:
        raise BundleError(path, f"negative size {size}", f"{where}size")
    digest = _need(rec, "sha256", str, path, where)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BundleError(path, f"{digest!r} is not a sha256 hex digest", f"{where}sha256")


def load_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and schema-check manifest.json; raises BundleError naming the field."""
    path, m = read_manifest(Path(bundle_dir))
    model = _need(m, "model", dict, path, "")
    version = _need(model, "version", str, path, "model.")
    if version not in MODEL_FACTS:
        raise BundleError(path, f"unknown MiniCPM-V version {version!r}", "model.version")
    for part, keys in (("vision", ("hidden_size", "num_hidden_layers", "patch_size", "num_patches_per_side")),
                       ("resampler", ("embed_dim", "query_num")), ("llm", ("hidden_size", "vocab_size"))):
        sub = _need(model, part, dict, path, "model.")
        for k in keys:
            _need(sub, k, int, path, f"model.{part}.")
    pre = _need(m, "preprocess", dict, path, "")
    for k in ("slice_size", "patch_size", "max_slice_nums", "num_patches_per_side"):
        _need(pre, k, int, path, "preprocess.")
    for k in ("norm_mean", "norm_std"):
        vals = _need(pre, k, list, path, "preprocess.")
        if len(vals) != 3 or not all(isinstance(x, (int, float)) for x in vals):
            raise BundleError(path, f"expected 3 numbers, got {vals!r}", f"preprocess.{k}")
    _need(pre, "slicing", str, path, "preprocess.")
    prompt = _need(m, "prompt", dict, path, "")
    _need(prompt, "chat_template", str, path, "prompt.")
    _need(prompt, "special_tokens", dict, path, "prompt.")
    _need(prompt, "use_image_id", bool, path, "prompt.")
    _need(prompt, "query_num", int, path, "prompt.")
    _need(prompt, "stop_tokens", list, path, "prompt.")
    _need(prompt, "thinking", bool, path, "prompt.")
    files = _need(m, "files", list, path, "")
    seen: set[str] = set()
    for i, entry in enumerate(files):
        where = f"files[{i}]."
        _check_file_record(entry, path, where)
        kind = _need(entry, "kind", str, path, where)
        if kind not in KINDS:
            raise BundleError(path, f"unknown kind {kind!r} (known: {', '.join(KINDS)})", f"{where}kind")
        if entry["path"] in seen:
            raise BundleError(path, f"{entry['path']} is listed twice", f"{where}path")
        seen.add(entry["path"])
        for sub in ("contents", "external_data"):
            if sub in entry:
                recs = _need(entry, sub, list, path, where)
                for j, rec in enumerate(recs):
                    _check_file_record(rec, path, f"{where}{sub}[{j}].")
    return m


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class VerifyReport:
    bundle: str
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)     # rel path -> {"recorded", "measured", "ok"}

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "ok": self.ok, "files_checked": self.files_checked,
                "bytes_checked": self.bytes_checked, "problems": [str(p) for p in self.problems],
                "notes": self.notes, "parity": self.parity}


def _check_one(root: Path, rec: dict[str, Any], report: VerifyReport) -> bool:
    rel = rec["path"]
    p = root / rel
    if not p.exists():
        report.problems.append(Problem(rel, "listed in manifest.json but missing"))
        return False
    if not p.is_file():
        report.problems.append(Problem(rel, "expected a file, found a folder"))
        return False
    size = p.stat().st_size
    if size != rec["size"]:
        report.problems.append(Problem(rel, f"size {size} bytes, manifest.json says {rec['size']} "
                                       "(truncated or replaced)"))
        return False
    digest = sha256_file(p)
    report.files_checked += 1
    report.bytes_checked += size
    if digest != rec["sha256"]:
        report.problems.append(Problem(rel, f"sha256 mismatch: file {digest[:16]}..., manifest.json "
                                       f"{rec['sha256'][:16]}... (the file was modified or corrupted)"))
        return False
    return True


def verify_bundle(bundle_dir: str | Path, against: str | Path | None = None, *,
                  grids=None) -> VerifyReport:
    """Re-check every listed file (existence, size, sha256; folders file by file). With `against` (a
    checkpoint folder or Checkpoint), also re-measure the parity of each ONNX vision file against the torch
    reference and compare with the recorded value. Schema errors raise BundleError."""
    root = Path(bundle_dir)
    m = load_manifest(root)
    report = VerifyReport(str(root))
    for entry in m["files"]:
        p = root / entry["path"]
        if "contents" in entry:
            if not p.is_dir():
                report.problems.append(Problem(entry["path"], "listed in manifest.json but missing" if not p.exists()
                                               else "expected a folder (.mlpackage), found a file"))
                continue
            good = all([_check_one(root, rec, report) for rec in entry["contents"]])
            listed = {rec["path"] for rec in entry["contents"]}
            extra = sorted(_rel(f, root) for f in p.rglob("*") if f.is_file() and _rel(f, root) not in listed)
            for rel in extra:
                report.problems.append(Problem(rel, f"inside {entry['path']} but not listed in manifest.json"))
            if good and not extra and _tree_digest(entry["contents"], entry["path"]) != entry["sha256"]:
                report.problems.append(Problem(entry["path"], "folder sha256 does not match its contents list"))
        else:
            _check_one(root, entry, report)
        for rec in entry.get("external_data", []):
            _check_one(root, rec, report)
    if against is not None:
        _reparity(root, m, against, report, grids)
    return report


def _reparity(root: Path, m: dict[str, Any], against, report: VerifyReport, grids) -> None:
    from .checkpoint import Checkpoint
    from .onnx_vision import parity, reference_modules

    ckpt = against if isinstance(against, Checkpoint) else Checkpoint.open(against)
    model = m["model"]
    if ckpt.version != model["version"]:
        report.problems.append(Problem(MANIFEST, f"bundle is MiniCPM-V {model['version']}, --against checkpoint "
                                       f"is {ckpt.version}"))
        return
    dims = {"vision.hidden_size": (ckpt.vision.hidden_size, model["vision"]["hidden_size"]),
            "vision.num_hidden_layers": (ckpt.vision.num_hidden_layers, model["vision"]["num_hidden_layers"]),
            "resampler.embed_dim": (ckpt.resampler.embed_dim, model["resampler"]["embed_dim"])}
    bad = [f"{k}: checkpoint {a}, bundle {b}" for k, (a, b) in dims.items() if a != b]
    if bad:
        report.problems.append(Problem(MANIFEST, "--against checkpoint has other dims (" + "; ".join(bad) + ")"))
        return
    src = model.get("source", {}).get("config_sha256")
    if src and _config_sha256(ckpt) != src:
        report.notes.append("the --against checkpoint's config.json differs from the one the bundle was exported "
                            "from (same dims; parity will tell whether the weights are the same)")
    broken = {p.path for p in report.problems}
    modules = None
    for entry in m["files"]:
        rel = entry["path"]
        if entry["kind"] == FileKind.VISION_COREML:
            if sys.platform == "darwin":
                from .coreml_vision import parity_coreml
                measured = parity_coreml(root / rel, ckpt, grids=grids)
                _compare_parity(rel, entry.get("parity"), measured, report)
            else:
                report.notes.append(f"{rel}: parity not re-measured (CoreML prediction needs macOS)")
            continue
        if entry["kind"] not in VISION_ONNX_KINDS:
            continue
        if rel in broken or any(r["path"] in broken for r in entry.get("external_data", [])):
            report.notes.append(f"{rel}: parity not re-measured (file failed its hash check)")
            continue
        recorded = entry.get("parity")
        use_grids = grids or (tuple(tuple(g["grid"]) for g in recorded["grids"]) if recorded else None)
        modules = modules or reference_modules(ckpt)
        measured = parity(root / rel, ckpt, use_grids or ((32, 32),), modules=modules)
        _compare_parity(rel, recorded, measured, report)


def _compare_parity(rel: str, recorded: dict | None, measured: dict, report: VerifyReport) -> None:
    ok = True
    if recorded is not None:
        diff = abs(measured["min_cosine"] - recorded["min_cosine"])
        ok = diff <= PARITY_TOLERANCE or measured["min_cosine"] >= recorded["min_cosine"]
        if not ok:
            report.problems.append(Problem(rel, f"parity changed: min cosine {measured['min_cosine']:.6f} now, "
                                           f"{recorded['min_cosine']:.6f} at export (tolerance {PARITY_TOLERANCE})"))
    report.parity[rel] = {"recorded_min_cosine": recorded["min_cosine"] if recorded else None,
                          "measured_min_cosine": measured["min_cosine"],
                          "measured_mean_cosine": measured["mean_cosine"], "ok": ok}


# =============================================================================================
# CLI
# =============================================================================================

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge verify",
                                 description="re-check a bundle's files against its manifest.json")
    ap.add_argument("bundle", type=Path, help="bundle folder (holds manifest.json)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--against", type=Path, metavar="CHECKPOINT",
                    help="also re-measure vision parity against this checkpoint's torch reference")
    args = ap.parse_args(argv)
    try:
        report = verify_bundle(args.bundle, against=args.against)
    except MiniCPMVEdgeError as exc:
        if args.json:
            print(json.dumps({"bundle": str(args.bundle), "ok": False, "error": str(exc)}, indent=1))
        else:
            print(f"minicpmv-edge verify: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0 if report.ok else 1
    for rel, p in report.parity.items():
        rec = "n/a" if p["recorded_min_cosine"] is None else f"{p['recorded_min_cosine']:.6f}"
        print(f"  parity {rel}: min cosine {p['measured_min_cosine']:.6f} (export: {rec})"
              f"{'' if p['ok'] else '  CHANGED'}")
    for note in report.notes:
        print(f"  note: {note}")
    for problem in report.problems:
        print(f"minicpmv-edge verify: error: {args.bundle / problem.path}: {problem.message}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    print(f"{args.bundle}: {status}; {report.files_checked} files, {report.bytes_checked / 2**20:.1f} MiB hashed")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
