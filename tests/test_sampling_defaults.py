"""Default sampling per mode (issue 13): the version's recipe from the facts table, with the values the recipe
leaves to generation_config.json taken from the checkpoint's own file, which the export copies into the bundle
manifest (`generation_config`)."""
from __future__ import annotations

import json
import shutil

import pytest

import minicpmv_edge
from minicpmv_edge.errors import BundleError
from minicpmv_edge.facts import MODEL_FACTS, SamplingDefaults


def _as_tuple(d: SamplingDefaults) -> tuple:
    return d.temperature, d.top_p, d.top_k, d.repetition_penalty


def test_recipe_per_mode_and_what_the_checkpoint_may_change():
    own = {"temperature": 0.2, "top_p": 0.9, "top_k": 30, "repetition_penalty": 1.1}
    f45 = MODEL_FACTS["4.5"]
    # 4.5's chat(): without thinking it sets all four; with thinking only the temperature (0.7), the rest is the
    # hub generation_config.json's (top_p 0.95, top_k 20) and transformers' repetition_penalty 1.0
    assert _as_tuple(f45.sampling_defaults(False)) == _as_tuple(f45.sampling_defaults(False, own)) == \
        (0.7, 0.8, 100, 1.03)
    assert _as_tuple(f45.sampling_defaults(True)) == (0.7, 0.95, 20, 1.0)
    assert _as_tuple(f45.sampling_defaults(True, own)) == (0.7, 0.9, 30, 1.1)
    assert _as_tuple(f45.sampling_defaults(True, {"top_k": 5})) == (0.7, 0.95, 5, 1.0)
    # 4.6 has no chat(): every value is generation_config.json's, in both modes
    f46 = MODEL_FACTS["4.6"]
    assert _as_tuple(f46.sampling_defaults(True)) == _as_tuple(f46.sampling_defaults(False)) == (0.7, 1.0, 0, 1.0)
    assert _as_tuple(f46.sampling_defaults(True, own)) == _as_tuple(f46.sampling_defaults(False, own)) == \
        (0.2, 0.9, 30, 1.1)
    for v in ("2.6", "4.0"):   # chat() sets all four in their one mode
        assert _as_tuple(MODEL_FACTS[v].sampling_defaults(False, own)) == (0.7, 0.8, 100, 1.05)


def test_export_carries_the_checkpoints_generation_config(tiny_checkpoint, tmp_path):
    from minicpmv_edge.export.bundle import generation_config_section
    from minicpmv_edge.export.checkpoint import Checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("4.5"), ckpt)
    written = json.loads((ckpt / "generation_config.json").read_text())
    assert {k: written[k] for k in ("temperature", "top_p", "top_k")} == {"temperature": 0.6, "top_p": 0.95,
                                                                          "top_k": 20}   # synth: the hub file's
    section = generation_config_section(Checkpoint.open(ckpt))
    assert section.to_dict() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (ckpt / "generation_config.json").write_text(json.dumps({**written, "top_k": 7, "repetition_penalty": None,
                                                             "max_new_tokens": 99}))
    assert generation_config_section(Checkpoint.open(ckpt)).to_dict() == {"temperature": 0.6, "top_p": 0.95,
                                                                          "top_k": 7}
    (ckpt / "generation_config.json").write_text(json.dumps({**written, "top_p": 0}))
    with pytest.raises(BundleError, match=r"generation_config.json.*top_p.*greater than 0"):
        generation_config_section(Checkpoint.open(ckpt))
    (ckpt / "generation_config.json").unlink()
    assert generation_config_section(Checkpoint.open(ckpt)) is None


def test_runtime_defaults_follow_the_bundles_generation_config(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle("4.5"), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["generation_config"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    manifest["generation_config"] = {"temperature": 0.3, "top_p": 0.5, "top_k": 7}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    model = minicpmv_edge.load(bundle, llm="Q4_K_M")
    try:
        assert _as_tuple(model.sampling_defaults(thinking=True)) == (0.7, 0.5, 7, 1.0)
        assert _as_tuple(model.sampling_defaults(thinking=False)) == (0.7, 0.8, 100, 1.03)
        # what a request leaves unset gets the mode's defaults; what it sets wins
        params = model._sampling(None, None, None, None, 1, False, True)
        assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.5, 7, 1.0)
        params = model._sampling(0.1, None, 3, None, 1, False, False)
        assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.1, 0.8, 3, 1.03)
    finally:
        model.close()
    del manifest["generation_config"]          # a bundle written before the field: the facts' values
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    model = minicpmv_edge.load(bundle, llm="Q4_K_M")
    try:
        assert _as_tuple(model.sampling_defaults(thinking=True)) == (0.7, 0.95, 20, 1.0)
    finally:
        model.close()
