"""Loading a bundle: the vision backend is chosen from the manifest's files (FileKind -> backend table), each
backend this machine has runs the same image to the same embeddings, and what is loaded is checked against its
sha256 once per file version (cached), or not at all with --no-verify."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minicpmv_edge.errors import BundleError
from minicpmv_edge.runtime.bundle import (MANIFEST, VISION_BACKENDS, FileKind, HashCache, load,
                                          runnable_vision_kinds)
from minicpmv_edge.runtime.preprocess import preprocess_image
from minicpmv_edge.workflows.demo import demo_image
from minicpmv_edge.workflows.pipeline import export_checkpoint

QUESTION = "What is in this picture?"
# cosine per embedding row against the fp32 vision graph + resampler weights
MIN_COSINE = {"fp32": 0.99999, "int8": 0.99, "fused fp32": 0.99999}


@pytest.fixture(scope="module")
def multi(tiny_checkpoint, tmp_path_factory) -> Path:
    """A 4.5 bundle with three vision files: fp32 and int8 vision graphs, and the fused vision+resampler graph."""
    out = tmp_path_factory.mktemp("multi-vision")
    export_checkpoint(tiny_checkpoint("4.5"), out, llm_types=["F32"], mmproj_types=[], vision_types=["fp32", "int8"],
                      fused_vision=True, resampler_types=["f32"], name="mv")
    return out


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPMV_EDGE_CACHE", str(tmp_path / "cache"))


def _embeddings(model, image) -> np.ndarray:
    """The [Q, D] blocks of every slice of `image`, through the session's own vision and resampler objects."""
    cfg = model.preprocess_config
    pre = preprocess_image(image, max_slice_nums=cfg.max_slice_nums, slice_size=cfg.slice_size,
                           patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std, slicing=cfg.slicing)
    return np.stack([model.resampler.run(model.vision.encode(s), *s.tgt_size) for s in pre.slices])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_each_vision_backend_from_the_manifest(multi):
    m = json.loads((multi / MANIFEST).read_text())
    kinds = {(e["kind"], e["precision"]) for e in m["files"]}
    assert {(FileKind.VISION_ONNX, "fp32"), (FileKind.VISION_ONNX, "int8"),
            (FileKind.VISION_RESAMPLER_ONNX, "fp32")} <= kinds
    fused = next(e for e in m["files"] if e["kind"] == FileKind.VISION_RESAMPLER_ONNX)
    assert fused["parity"]["min_cosine"] > 0.9999 and fused["graph"] == "vision_resampler"

    image = demo_image(700)            # sliced: overview + cells
    runs = {}
    for kind in runnable_vision_kinds():
        for e in (e for e in m["files"] if e["kind"] == kind):
            label = ("fused " if kind == FileKind.VISION_RESAMPLER_ONNX else "") + e["precision"]
            model = load(multi, vision_kind=kind, vision=e["precision"], exact=True)
            try:
                assert model.vision_kind == kind and model.files["vision"].name == e["path"]
                assert (model.files["resampler"] is None) == VISION_BACKENDS[kind].includes_resampler
                answer = model.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                                  {"type": "text", "text": QUESTION}]}],
                                    greedy=True, max_tokens=6)
                runs[label] = (_embeddings(model, image), answer.token_ids)
            finally:
                model.close()
    assert {"fp32", "int8", "fused fp32"} <= set(runs)
    ref, ref_tokens = runs["fp32"]
    for label, (emb, tokens) in runs.items():
        cos = _cos(emb, ref)
        print(f"\n[backend {label}] {emb.shape[0]} slices, cosine per row vs fp32 + resampler weights: "
              f"min {cos.min():.7f} (tolerance {MIN_COSINE[label]}), greedy tokens {tokens}")
        assert emb.shape == ref.shape and cos.min() >= MIN_COSINE[label]
    assert runs["fused fp32"][1] == ref_tokens


def test_default_backend_follows_the_manifest(multi, tmp_path):
    """No --vision-kind: the first kind of the table the bundle lists; a bundle with only the fused graph runs it."""
    model = load(multi)
    assert model.vision_kind == FileKind.VISION_ONNX
    model.close()
    only_fused = tmp_path / "fused"
    shutil.copytree(multi, only_fused)
    m = json.loads((only_fused / MANIFEST).read_text())
    for e in [e for e in m["files"] if e["kind"] in (FileKind.VISION_ONNX, FileKind.RESAMPLER_WEIGHTS)]:
        m["files"].remove(e)
    (only_fused / MANIFEST).write_text(json.dumps(m))
    model = load(only_fused)
    assert model.vision_kind == FileKind.VISION_RESAMPLER_ONNX and model.files["resampler"] is None
    model.close()
    m["files"] = [e for e in m["files"] if e["kind"] not in VISION_BACKENDS]
    (only_fused / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="no vision file this machine can run"):
        load(only_fused)


def test_sha256_checked_once_per_file_version(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle("4.5"), bundle)
    cache = tmp_path / "hashes.json"
    first = HashCache(cache)
    load(bundle, hashes=first).close()
    assert first.hashed >= 3                       # LLM, vision graph, resampler weights
    second = HashCache(cache)
    load(bundle, hashes=second).close()
    assert second.hashed == 0                      # same size and mtime: nothing read again
    m = json.loads((bundle / MANIFEST).read_text())
    llm = next(e["path"] for e in m["files"] if e["kind"] == FileKind.LLM_GGUF and e["precision"] == "Q4_K_M")
    data = bytearray((bundle / llm).read_bytes())
    data[-100] ^= 0x01                             # inside the tensor data: llama.cpp would load it silently
    (bundle / llm).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 differs") as exc:
        load(bundle, hashes=HashCache(cache))
    assert llm in str(exc.value) and "\n" not in str(exc.value)
    load(bundle, verify=False).close()             # --no-verify: the user's call
