"""Writing and verifying the self-describing bundle: one folder per exported model, with a `manifest.json` that
says everything a runtime needs and lets anyone check every byte.

    write_manifest("out/", ckpt, [llm_record, mmproj_record, onnx_artifact, ...], parity)   # after `export`
    report = verify_bundle("out/", against="MiniCPM-V-4_5")                                # `minicpmv-edge verify`

The schema (every field, its type and range) is `minicpmv_edge.runtime.bundle`, the lower layer, and
docs/bundle.md describes it; this module fills the typed sections from a checkpoint and the exporters' file
records, and checks a bundle against them. Every file an exporter writes comes here as a `BundleFileSpec`
(path, kind, precision, how it was made): no names are parsed back.

`verify_bundle` checks the whole manifest schema, then re-checks sizes and hashes (and, given a checkpoint,
re-measures the vision parity); malformed manifests raise `BundleError` naming the file and field; missing or
changed files are reported one line each, naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from minicpmv_edge import __version__
from minicpmv_edge.errors import BundleError, CheckpointError, MiniCPMVEdgeError
from minicpmv_edge.runtime.bundle import (COREML_VISION_KINDS, KINDS, MANIFEST, ONNX_VISION_KINDS, SCHEMA_VERSION,
                                          FileEntry, FileRecord, GenerationConfigSection, LLMSection,
                                          Manifest, ModelSection, Parity, PreprocessSection, PromptSection,
                                          ResamplerSection, SourceSection, VisionSection, Where, inside,
                                          regular_file, sha256_file, tree_digest)
from minicpmv_edge.runtime.prompt import IMAGE_TAG
from minicpmv_edge import untrusted

__all__ = ["BundleFileSpec", "write_manifest", "manifest_for", "model_section", "preprocess_section",
           "prompt_section", "verify_bundle", "VerifyReport", "measure_vision_parity", "file_entry", "sha256_file",
           "load_manifest", "main"]

# verify --against: a re-measured min cosine may differ from the recorded one by thread scheduling only
PARITY_TOLERANCE = 1e-4


@dataclass
class BundleFileSpec:
    """One file (or .mlpackage folder) an exporter wrote, as the manifest will list it."""
    path: Path
    kind: str
    precision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)     # how it was made: FileEntry's optional fields by name
    external_data: list[Path] = field(default_factory=list)  # ONNX weights stored beside the graph


# =============================================================================================
# Writing
# =============================================================================================

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


def _record(root: Path, path: Path) -> FileRecord:
    return FileRecord(_rel(path, root), regular_file(path).st_size, sha256_file(path))


def file_entry(root: Path, spec: BundleFileSpec) -> FileEntry:
    """The manifest entry of one file or folder (hashes computed here)."""
    path = _locate(root, spec.path)
    if spec.kind not in KINDS:
        raise MiniCPMVEdgeError(f"{path}: unknown file kind {spec.kind!r} (known: {', '.join(KINDS)})")
    if not path.exists():
        raise MiniCPMVEdgeError(f"{path}: file not found (cannot list it in the manifest)")
    unknown = set(spec.extra) - {name for name, *_ in FileEntry.schema()}
    if unknown:
        raise MiniCPMVEdgeError(f"{path}: {', '.join(sorted(unknown))}: not manifest fields (docs/bundle.md)")
    rel = _rel(path, root)
    external = [_record(root, _locate(root, p)) for p in spec.external_data] or None
    if path.is_dir():
        contents = [_record(root, p) for p in sorted(path.rglob("*")) if p.is_file()]
        entry = FileEntry(rel, spec.kind, sum(c.size for c in contents), tree_digest(contents, rel), spec.precision,
                          external, contents)
    else:
        entry = FileEntry(rel, spec.kind, path.stat().st_size, sha256_file(path), spec.precision, external)
    # the exporter's description goes through the schema's own check, like everything the reader will see
    return FileEntry.from_dict({**entry.to_dict(), **spec.extra}, Where(path))


def records_of(files: Iterable[Any]) -> list[BundleFileSpec]:
    """BundleFileSpecs, exporters' artifacts (anything with a `record()`), or mappings of BundleFileSpec's fields."""
    out = []
    for f in files:
        if isinstance(f, BundleFileSpec):
            out.append(f)
        elif hasattr(f, "record"):
            out.append(f.record())
        elif isinstance(f, Mapping):
            out.append(BundleFileSpec(**f))
        else:
            raise MiniCPMVEdgeError(f"cannot list {f!r} in a manifest (expected a BundleFileSpec or an artifact)")
    return out


def onnx_io(graph: str) -> dict[str, Any]:
    """The `io` description of an ONNX vision graph (names from runtime/vision.py's VisionIO)."""
    from minicpmv_edge.runtime.vision import VisionIO as IO

    out = IO.PATCH_FEATURES if graph == "vision" else IO.IMAGE_EMBEDS
    return {"inputs": {IO.PIXEL_VALUES.value: ["float32", [1, 3, "14*h", "14*w"]],
                       IO.POSITION_IDS.value: ["int64", ["h", "w"]]},
            "outputs": {out.value: ["float32", [1, "h*w" if graph == "vision" else "query_num",
                                                "C" if graph == "vision" else "D"]]}}


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _config_sha256(ckpt) -> str | None:
    p = ckpt.root / "config.json"
    return sha256_file(p) if p.is_file() else None


def tokens_per_slice(ckpt) -> int:
    """LLM positions of one full slice: the resampler's query_num (2.6-4.5); for 4.6, which has no resampler, a
    slice_size x slice_size slice in the default downsample mode (the count then varies with each slice's size)."""
    if ckpt.resampler is not None:
        return ckpt.resampler.query_num
    side = ckpt.preprocess.slice_size // ckpt.preprocess.patch_size
    return side * side // ckpt.facts.downsample_side() ** 2


def placeholder_grammar(ckpt) -> dict[str, Any]:
    t = ckpt.facts.special_tokens
    q = "{tokens}" if ckpt.resampler is None else ckpt.resampler.query_num
    notes = ("image id only when use_image_id; index counts images from 0 over the prompt; no newline between "
             "the overview and the first slice row, none after the last; each pad run is replaced by one "
             "slice's embeddings, overview first, then slices row-major; ")
    if ckpt.resampler is None:
        modes = ", ".join(f"{m}: h*w/{s * s}" for m, s in ckpt.facts.downsample_modes)
        notes += (f"{{tokens}} = that slice's h x w patches merged by the downsample mode ({modes}); video frames "
                  "use the image form without id")
    else:
        notes += "video blocks use the image form without id or slices, joined by \"\\n\""
    return {
        "image_tag": IMAGE_TAG,
        "image": (f"[{t['image_id_start']}{{index}}{t['image_id_end']}] {t['image_start']} {t['image_pad']}x{q} "
                  f"{t['image_end']} [{{rows}} rows joined by \"\\n\", each {{cols}} x ({t['slice_start']} "
                  f"{t['image_pad']}x{q} {t['slice_end']})]"),
        "notes": notes,
        "pad_token": t["image_pad"],
    }


def model_section(ckpt) -> ModelSection:
    f, v, llm, r = ckpt.facts, ckpt.vision, ckpt.llm, ckpt.resampler
    return ModelSection(
        version=f.version, hf_repo=f.hf_repo, llm_arch=f.llm_gguf_arch, mmproj_version=f.mmproj_version,
        video=f.video, max_temporal_packing=f.max_temporal_packing,
        llm=LLMSection(llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads,
                       llm.head_dim, llm.intermediate_size, llm.vocab_size, llm.max_position_embeddings,
                       llm.rope_theta, llm.rms_norm_eps, llm.tie_word_embeddings),
        vision=VisionSection(v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
                             v.patch_size, v.num_patches_per_side, v.layer_norm_eps, v.hidden_act),
        resampler=ResamplerSection(r.embed_dim, r.num_heads, r.kv_dim, r.query_num) if r is not None else None,
        source=SourceSection(ckpt.root.name, _config_sha256(ckpt)))


def preprocess_section(ckpt) -> PreprocessSection:
    pre = ckpt.preprocess
    return PreprocessSection(
        slice_size=pre.slice_size, patch_size=pre.patch_size, max_slice_nums=pre.max_slice_nums,
        slice_mode=pre.slice_mode, norm_mean=list(pre.norm_mean), norm_std=list(pre.norm_std),
        slicing=ckpt.facts.slicing, num_patches_per_side=ckpt.vision.num_patches_per_side, resample="PIL bicubic",
        order="overview first, then cells row-major",
        position_ids=("nearest ids, runtime.preprocess.position_nearest_ids(h, w, num_patches_per_side)"
                      if ckpt.facts.vision_position_ids == "nearest" else
                      "NaViT buckets, runtime.preprocess.position_bucket_ids(h, w, num_patches_per_side)"))


def prompt_section(ckpt) -> PromptSection:
    f, tok = ckpt.facts, ckpt.tokenizer_config
    if not ckpt.chat_template:
        raise MiniCPMVEdgeError(f"{ckpt.root / 'tokenizer_config.json'}: chat_template: missing (nor chat_template.jinja); "
                                "a bundle must carry the template the runtime renders prompts with")
    return PromptSection(
        chat_template=ckpt.chat_template, template_family=f.chat_template, special_tokens=dict(f.special_tokens),
        placeholder=placeholder_grammar(ckpt), use_image_id=ckpt.preprocess.use_image_id,
        query_num=tokens_per_slice(ckpt), stop_tokens=list(f.stop_tokens), thinking=f.thinking,
        default_system_prompt=f.default_system_prompt,
        bos_token=_token_string(tok.get("bos_token")) or f.bos_token, eos_token=_token_string(tok.get("eos_token")))


GENERATION_CONFIG = "generation_config.json"


def generation_config_section(ckpt) -> GenerationConfigSection | None:
    """The sampling values of the checkpoint's generation_config.json (None when it has none). Only the four the
    runtime can use are kept; each is checked (BundleError naming the file and field)."""
    path = ckpt.root / GENERATION_CONFIG
    if not path.exists() and not path.is_symlink():
        return None
    raw = untrusted.read_json(untrusted.inside(ckpt.root, GENERATION_CONFIG, error=CheckpointError),
                              error=CheckpointError)
    names = [n for n, *_ in GenerationConfigSection.schema()]
    return GenerationConfigSection.from_dict({n: raw[n] for n in names if raw.get(n) is not None}, Where(path))


def manifest_for(ckpt, entries: list[FileEntry], *, name: str | None = None) -> Manifest:
    return Manifest(schema_version=SCHEMA_VERSION, name=name or ckpt.root.name,
                    created_by=f"minicpmv-edge {__version__}", created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    model=model_section(ckpt), preprocess=preprocess_section(ckpt), prompt=prompt_section(ckpt),
                    files=entries, generation_config=generation_config_section(ckpt))


def write_manifest(bundle_dir: str | Path, ckpt, files: Iterable[Any], parity: Mapping[Any, Any] | None = None, *,
                   name: str | None = None) -> Path:
    """Write `<bundle_dir>/manifest.json` listing `files`, all of which must lie inside `bundle_dir`.

    files: BundleFileSpecs, exporters' artifacts (OnnxArtifact, CoremlArtifact: their `record()`), or mappings
    {"path", "kind", "precision", ...}. parity: path (absolute or bundle-relative) -> the dict
    `onnx_vision.parity` returns (see `measure_vision_parity`); vision files without one get `null`.
    `ckpt` is a Checkpoint or its folder. The manifest is checked by the reader's own schema before it is
    written (to a temporary name, then renamed)."""
    from .checkpoint import Checkpoint

    root = Path(bundle_dir)
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
    prompt_section(ckpt)                   # a missing chat template fails before any hashing
    parity_by_rel = {_rel(_locate(root, k), root): v for k, v in (parity or {}).items()}
    entries = []
    for spec in records_of(files):
        entry = file_entry(root, spec)
        if entry.path in parity_by_rel and parity_by_rel[entry.path] is not None:
            entry.parity = Parity.from_dict(parity_by_rel[entry.path], Where(root / entry.path) / "parity")
        entries.append(entry)
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise MiniCPMVEdgeError(f"{root / e.path}: listed twice")
        seen.add(e.path)
    out = root / MANIFEST
    data = manifest_for(ckpt, entries, name=name).to_dict()
    Manifest.from_dict(data, Where(out))   # what we write, the reader accepts
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def measure_vision_parity(paths: Iterable[str | Path], ckpt, grids=None) -> dict[str, dict[str, Any]]:
    """Parity of each ONNX vision file against the torch reference (onnx_vision.parity); key = str(path).
    4.6 merger graphs are measured against the merger reader's module, on the grids snapped to whole merge
    blocks (multiples of 4 patches, which both downsample modes accept)."""
    from .merger_tower import MergerCheckpoint
    from .onnx_vision import EXPORT_PARITY_GRIDS, merger_parity_grids, open_vision_checkpoint, parity, reference_modules

    ckpt = open_vision_checkpoint(ckpt)
    grids = grids or EXPORT_PARITY_GRIDS
    if isinstance(ckpt, MergerCheckpoint):
        side = max(s for _, s in ckpt.facts.downsample_modes)
        return {str(p): parity(p, ckpt, merger_parity_grids(side, grids)) for p in paths}
    modules = reference_modules(ckpt)
    return {str(p): parity(p, ckpt, grids, modules=modules) for p in paths}


# =============================================================================================
# Reading and checking
# =============================================================================================

def load_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read manifest.json and check it against the whole schema (runtime/bundle.py's `Manifest`, chat template
    rendered once); returns it as a JSON object. Raises BundleError naming the field."""
    from minicpmv_edge.runtime.bundle import Bundle

    return Bundle.open(bundle_dir).manifest.to_dict()


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


def _check_one(root: Path, rec: FileRecord, report: VerifyReport) -> bool:
    rel = rec.path
    p = root / rel
    if not os.path.lexists(p):
        report.problems.append(Problem(rel, "listed in manifest.json but missing"))
        return False
    try:
        size = regular_file(inside(root, rel)).st_size
    except BundleError as exc:           # a folder, a FIFO, a symlink out of the bundle
        report.problems.append(Problem(rel, str(exc).split(": ", 1)[-1]))
        return False
    if size != rec.size:
        report.problems.append(Problem(rel, f"size {size} bytes, manifest.json says {rec.size} "
                                       "(truncated or replaced)"))
        return False
    digest = sha256_file(p)
    report.files_checked += 1
    report.bytes_checked += size
    if digest != rec.sha256:
        report.problems.append(Problem(rel, f"sha256 mismatch: file {digest[:16]}..., manifest.json "
                                       f"{rec.sha256[:16]}... (the file was modified or corrupted)"))
        return False
    return True


def verify_bundle(bundle_dir: str | Path, against: str | Path | None = None, *,
                  grids=None) -> VerifyReport:
    """Check the whole manifest schema, then re-check every listed file (existence, size, sha256; folders file
    by file). With `against` (a checkpoint folder or Checkpoint), also re-measure the parity of each ONNX vision
    file against the torch reference and compare with the recorded value. Schema errors raise BundleError."""
    from minicpmv_edge.runtime.bundle import Bundle

    root = Path(bundle_dir)
    m = Bundle.open(root).manifest
    report = VerifyReport(str(root))
    for entry in m.files:
        p = root / entry.path
        if entry.contents is not None:
            if not p.is_dir() or p.is_symlink():
                report.problems.append(Problem(entry.path, "listed in manifest.json but missing" if not p.exists()
                                               else "a symlink (a package must be a folder inside the bundle)"
                                               if p.is_symlink() else "expected a folder (.mlpackage), found a file"))
                continue
            good = all([_check_one(root, rec, report) for rec in entry.contents])
            listed = {rec.path for rec in entry.contents}
            extra = sorted(_rel(f, root) for f in p.rglob("*") if f.is_file() and _rel(f, root) not in listed)
            for rel in extra:
                report.problems.append(Problem(rel, f"inside {entry.path} but not listed in manifest.json"))
            if good and not extra and tree_digest(entry.contents, entry.path) != entry.sha256:
                report.problems.append(Problem(entry.path, "folder sha256 does not match its contents list"))
        else:
            _check_one(root, FileRecord(entry.path, entry.size, entry.sha256), report)
        for rec in entry.external_data or []:
            _check_one(root, rec, report)
    if against is not None:
        _reparity(root, m, against, report, grids)
    return report


def _reparity(root: Path, m: Manifest, against, report: VerifyReport, grids) -> None:
    from .checkpoint import Checkpoint
    from .onnx_vision import parity, reference_modules

    ckpt = against if isinstance(against, Checkpoint) else Checkpoint.open(against)
    model = m.model
    if ckpt.version != model.version:
        report.problems.append(Problem(MANIFEST, f"bundle is MiniCPM-V {model.version}, --against checkpoint "
                                       f"is {ckpt.version}"))
        return
    dims = {"vision.hidden_size": (ckpt.vision.hidden_size, model.vision.hidden_size),
            "vision.num_hidden_layers": (ckpt.vision.num_hidden_layers, model.vision.num_hidden_layers),
            "llm.hidden_size": (ckpt.llm.hidden_size, model.llm.hidden_size)}
    bad = [f"{k}: checkpoint {a}, bundle {b}" for k, (a, b) in dims.items() if a != b]
    if bad:
        report.problems.append(Problem(MANIFEST, "--against checkpoint has other dims (" + "; ".join(bad) + ")"))
        return
    src = model.source.config_sha256 if model.source else None
    if src and _config_sha256(ckpt) != src:
        report.notes.append("the --against checkpoint's config.json differs from the one the bundle was exported "
                            "from (same dims; parity will tell whether the weights are the same)")
    broken = {p.path for p in report.problems}
    modules = None
    for entry in m.files:
        rel = entry.path
        if entry.kind in COREML_VISION_KINDS:
            if sys.platform == "darwin":
                from .coreml_vision import parity_coreml
                measured = parity_coreml(root / rel, ckpt, grids=grids)
                _compare_parity(rel, entry.parity, measured, report)
            else:
                report.notes.append(f"{rel}: parity not re-measured (CoreML prediction needs macOS)")
            continue
        if entry.kind not in ONNX_VISION_KINDS:
            continue
        if rel in broken or any(r.path in broken for r in entry.external_data or []):
            report.notes.append(f"{rel}: parity not re-measured (file failed its hash check)")
            continue
        recorded = entry.parity
        use_grids = grids or (tuple(tuple(g.grid) for g in recorded.grids) if recorded else None)
        if ckpt.resampler is None:      # 4.6: its merger graphs against the merger reader's module
            measured = measure_vision_parity([root / rel], ckpt, use_grids)[str(root / rel)]
        else:
            modules = modules or reference_modules(ckpt)
            measured = parity(root / rel, ckpt, use_grids or ((32, 32),), modules=modules)
        _compare_parity(rel, recorded, measured, report)


def _compare_parity(rel: str, recorded: Parity | None, measured_dict: dict, report: VerifyReport) -> None:
    measured = Parity.from_dict(measured_dict, Where(Path(rel)) / "parity")
    ok = True
    if recorded is not None:
        diff = abs(measured.min_cosine - recorded.min_cosine)
        ok = diff <= PARITY_TOLERANCE or measured.min_cosine >= recorded.min_cosine
        if not ok:
            report.problems.append(Problem(rel, f"parity changed: min cosine {measured.min_cosine:.6f} now, "
                                           f"{recorded.min_cosine:.6f} at export (tolerance {PARITY_TOLERANCE})"))
    report.parity[rel] = {"recorded_min_cosine": recorded.min_cosine if recorded else None,
                          "measured_min_cosine": measured.min_cosine,
                          "measured_mean_cosine": measured.mean_cosine, "ok": ok}


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
