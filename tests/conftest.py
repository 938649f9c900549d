"""Shared fixtures: tiny synthetic checkpoints, written once per test session and version."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: `tiny_checkpoint("4.5")` -> path of a tiny synthetic checkpoint of that version (seed 0).

    One directory per version is written on first use and reused for the rest of the session; treat it as
    read-only (copy it before changing anything)."""
    from minicpmv_edge.export.synth import synthesize

    root = tmp_path_factory.mktemp("tiny-ckpt")
    made: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in made:
            made[version] = synthesize(version, "tiny", root / version.replace(".", "_"), seed=0)
        return made[version]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Callable[[str], Path]:
    """Factory: `tiny_bundle("4.5")` -> an exported bundle of the tiny checkpoint (F32 + Q4_K_M GGUF, F16 mmproj,
    fp32 ONNX vision, f32 resampler weights, manifest.json). Written once per session and version; read-only."""
    from minicpmv_edge.workflows.pipeline import export_checkpoint

    root = tmp_path_factory.mktemp("tiny-bundle")
    made: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in made:
            out = root / version.replace(".", "_")
            export_checkpoint(tiny_checkpoint(version), out, llm_types=["F32", "Q4_K_M"], mmproj_types=["F16"],
                              vision_types=["fp32"], resampler_types=["f32"], name=f"tiny-{version}")
            made[version] = out
        return made[version]

    return get


@pytest.fixture(scope="session")
def v46_reference(tmp_path_factory):
    """(transformers MiniCPMV4_6ForConditionalGeneration, its save_pretrained folder): a small random 4.6,
    the independent reference of the 4.6 vision tests (tests/v46_reference.py). Read-only."""
    pytest.importorskip("transformers.models.minicpmv4_6")
    from v46_reference import build_model

    model = build_model(seed=0)
    folder = tmp_path_factory.mktemp("v46-ckpt")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def serve_on_loopback() -> Callable:
    """Factory: `with serve_on_loopback(app) as base_url:` runs an ASGI app (the server's FastAPI app) with
    uvicorn on a free loopback port until the block ends."""
    from loopback import serve_app
    return serve_app
