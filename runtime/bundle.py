"""Reading an exported bundle (one folder, one manifest.json) and loading it into a `MiniCPMV` session.

The manifest is the runtime's only source of truth about the model: version, preprocessing, prompt format
and every file with its kind, precision, size and sha256. `export/bundle.py` writes it; the key names are
defined here, in the runtime (the lower layer), so writer and reader cannot drift apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import ModelFacts, facts_for

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class FileKind:
    """The `kind` of each file a manifest lists."""
    LLM_GGUF = "llm_gguf"
    MMPROJ_GGUF = "mmproj_gguf"
    VISION_ONNX = "vision_onnx"
    VISION_RESAMPLER_ONNX = "vision_resampler_onnx"
    VISION_COREML = "vision_coreml"
    RESAMPLER_WEIGHTS = "resampler_weights"
    TOKENIZER = "tokenizer"


# what a session prefers when the caller does not say (smallest good-quality choices first)
LLM_PREFERENCE = ("Q4_K_M", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32")
VISION_PREFERENCE = ("fp32", "fp16", "int8")


class BundleError(MiniCPMVEdgeError):
    def __init__(self, path: Path, message: str, field: str | None = None):
        super().__init__(f"{path}" + (f": {field}" if field else "") + f": {message}")


def read_manifest(root: Path) -> tuple[Path, dict[str, Any]]:
    """`<root>/manifest.json` parsed, with the checks every reader needs first: a folder, the file, a JSON
    object, the schema version this code reads. Returns (manifest path, manifest). The field-by-field check
    is `export.bundle.load_manifest` (verify); the runtime checks only what it uses."""
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(root, f"not a directory (expected a bundle folder with {MANIFEST}, written by "
                                "`minicpmv-edge export`)")
    if not path.is_file():
        raise BundleError(root, f"no {MANIFEST} (is this an exported bundle? `minicpmv-edge export` makes one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(path, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(path, "top level must be a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(path, f"schema {version!r} is not the one this code reads ({SCHEMA_VERSION})",
                          "schema_version")
    return path, manifest


@dataclass(frozen=True)
class BundleFile:
    path: Path            # absolute
    rel: str
    kind: str
    precision: str | None
    size: int
    sha256: str | None


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    files: list[BundleFile]

    @classmethod
    def open(cls, root: str | Path) -> "Bundle":
        root = Path(root)
        path, manifest = read_manifest(root)
        for key in ("model", "preprocess", "prompt", "files"):
            if key not in manifest:
                raise BundleError(path, "missing", key)
        files = []
        for i, entry in enumerate(manifest["files"]):
            try:
                rel = entry["path"]
                files.append(BundleFile(root / rel, rel, entry["kind"], entry.get("precision"),
                                        int(entry["size"]), entry.get("sha256")))
            except (KeyError, TypeError, ValueError):
                raise BundleError(path, "needs path, kind and size", f"files[{i}]") from None
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(path, f"{rel!r} must be a path inside the bundle", f"files[{i}].path")
        return cls(root, manifest, files)

    @property
    def facts(self) -> ModelFacts:
        return facts_for(self.manifest["model"]["version"])

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

    def check_present(self, f: BundleFile) -> Path:
        if not f.path.exists():
            raise BundleError(self.root, f"{f.rel} is listed in the manifest but missing")
        if f.path.is_file() and f.path.stat().st_size != f.size:
            raise BundleError(self.root, f"{f.rel} is {f.path.stat().st_size} bytes, the manifest says {f.size} "
                              "(truncated copy? run `minicpmv-edge verify`)")
        return f.path


def load(bundle: str | Path, *, llm: str | None = None, vision: str | None = None, resampler: str = "auto",
         threads: int | None = None, n_ctx: int = 4096, exact: bool = False, image_cache_size: int = 32,
         eval_callback=None):
    """Load a bundle into a ready `MiniCPMV`. `llm`/`vision` pick a precision (default: the first of
    LLM_PREFERENCE / VISION_PREFERENCE present); `resampler` is "auto", "native" or "numpy"."""
    from .decoder import Decoder
    from .prompt import PromptFormat
    from .resampler import load_resampler
    from .session import MiniCPMV, PreprocessConfig
    from .vision import OnnxVision

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    m = b.manifest
    facts = b.facts
    llm_file = b.check_present(b.choose(FileKind.LLM_GGUF, llm, LLM_PREFERENCE))
    vis_file = b.check_present(b.choose(FileKind.VISION_ONNX, vision, VISION_PREFERENCE))
    res_file = b.check_present(b.choose(FileKind.RESAMPLER_WEIGHTS, None, ("f32", "f16")))
    p, pre = m["prompt"], m["preprocess"]
    fmt = PromptFormat(chat_template=p["chat_template"], special_tokens=p["special_tokens"],
                       use_image_id=bool(p["use_image_id"]), query_num=int(p["query_num"]),
                       thinking=bool(p["thinking"]), default_system_prompt=p.get("default_system_prompt"),
                       bos_token=p.get("bos_token"), eos_token=p.get("eos_token"))
    cfg = PreprocessConfig(slice_size=int(pre["slice_size"]), patch_size=int(pre["patch_size"]),
                           max_slice_nums=int(pre["max_slice_nums"]), mean=tuple(pre["norm_mean"]),
                           std=tuple(pre["norm_std"]), slicing=pre["slicing"],
                           num_patches_per_side=int(pre.get("num_patches_per_side", 70)))
    decoder = Decoder(llm_file, n_ctx=n_ctx, threads=threads, exact=exact, eval_callback=eval_callback)
    try:
        vis = OnnxVision(vis_file, threads=threads, num_patches_per_side=cfg.num_patches_per_side)
        res = load_resampler(res_file, backend=resampler, threads=threads or 2,
                             expect_embed_dim=decoder.n_embd)
    except Exception:
        decoder.close()
        raise
    model = MiniCPMV(facts=facts, decoder=decoder, vision=vis, resampler=res, prompt_format=fmt, preprocess=cfg,
                     image_cache_size=image_cache_size)
    model.bundle, model.files = b, {"llm": llm_file, "vision": vis_file, "resampler": res_file}
    return model
