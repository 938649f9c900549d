"""Checkpoint reader and synthetic checkpoints: layout, lazy bf16 reads, sharding, and clear errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpmv_edge.errors import CheckpointError
from minicpmv_edge.export import synth
from minicpmv_edge.export.checkpoint import Checkpoint, expected_tensors
from minicpmv_edge.facts import RESAMPLER_VERSIONS, facts_for


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """The session's tiny synthetic checkpoint of every version (read-only: tests copy before editing)."""
    return {v: tiny_checkpoint(v) for v in RESAMPLER_VERSIONS}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("version", RESAMPLER_VERSIONS)
def test_tiny_checkpoint_reads_back(tiny, version):
    ckpt = Checkpoint.open(tiny[version])
    facts = facts_for(version)
    assert ckpt.version == version
    assert ckpt.facts is facts
    assert ckpt.resampler.embed_dim == ckpt.llm.hidden_size
    assert ckpt.resampler.kv_dim == ckpt.vision.hidden_size
    assert ckpt.resampler.num_heads == ckpt.llm.hidden_size // facts.resampler_head_dim
    assert ckpt.vision.num_patches_per_side == 70
    assert ckpt.chat_template, "synthetic checkpoints ship a chat template"
    assert set(ckpt.tensors) == set(expected_tensors(ckpt.config))
    assert {ckpt.tensors[n].dtype for n in ckpt.tensors} == {"BF16"}
    # Qwen2 carries q/k/v biases, Qwen3 per-head q/k norms: the layout follows the facts table.
    names = set(ckpt.tensors)
    assert ("llm.model.layers.0.self_attn.q_proj.bias" in names) == facts.llm_qkv_bias
    assert ("llm.model.layers.0.self_attn.q_norm.weight" in names) == facts.llm_qk_norm
    # every special token of the version resolves to an id of its own
    ids = [ckpt.token_id(t) for t in facts.all_special_tokens()]
    assert len(set(ids)) == len(ids) and max(ids) < ckpt.llm.vocab_size


def test_bf16_values_match_the_safetensors_library(tiny):
    """Our numpy bf16 reader against the safetensors package's own torch loader."""
    from safetensors.torch import load_file
    folder = tiny["4.5"]
    ckpt = Checkpoint.open(folder)
    ref = load_file(str(folder / "model.safetensors"))
    for name in ["resampler.query", "vpm.embeddings.patch_embedding.weight", "llm.model.embed_tokens.weight",
                 "llm.model.layers.1.self_attn.k_norm.weight"]:
        ours = ckpt.tensor(name)
        theirs = ref[name].float().numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs), name


def test_vocab_padding_rows_are_zero(tiny):
    ckpt = Checkpoint.open(tiny["4.5"])
    n_tokens = len(json.loads((tiny["4.5"] / "tokenizer.json").read_text())["model"]["vocab"]) + len(
        json.loads((tiny["4.5"] / "tokenizer.json").read_text())["added_tokens"])
    assert ckpt.llm.vocab_size > n_tokens
    head = ckpt.tensor("llm.lm_head.weight")
    assert not head[n_tokens:].any() and head[n_tokens - 1].any()


def test_synthetic_weights_have_sane_scales(tiny):
    ckpt = Checkpoint.open(tiny["2.6"])
    q = ckpt.tensor("llm.model.layers.0.self_attn.q_proj.weight")
    assert abs(q.std() * np.sqrt(q.shape[1]) - 1.0) < 0.05      # fan-in scaled
    ln = ckpt.tensor("vpm.encoder.layers.0.layer_norm1.weight")
    assert abs(ln.mean() - 1.0) < 0.05 and 0.05 < ln.std() < 0.2  # near-unit gains, not exactly 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synth.synthesize("4.5", "tiny", tmp_path / "a", seed=7)
    b = synth.synthesize("4.5", "tiny", tmp_path / "b", seed=7)
    c = synth.synthesize("4.5", "tiny", tmp_path / "c", seed=8)
    for f in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_sharded_checkpoint_with_index(tmp_path, tiny):
    out = synth.synthesize("2.6", "tiny", tmp_path / "sharded", seed=0, shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    sharded, single = Checkpoint.open(out), Checkpoint.open(tiny["2.6"])
    for name in ["llm.lm_head.weight", "vpm.post_layernorm.bias", "resampler.proj"]:
        assert np.array_equal(sharded.tensor(name), single.tensor(name))


def test_full_size_dry_run_lists_the_real_8b_layout(capsys):
    """`synth --size full --dry-run` describes the real MiniCPM-V 4.5 (Qwen3-8B + SigLIP-400M) and writes nothing."""
    from minicpmv_edge.cli import main
    assert main(["synth", "--version", "4.5", "--size", "full", "--dry-run"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["tensors"]
    # Numbers from the published model, not from our facts table (see research/minicpmv-arch.md §1-2).
    assert t["llm.model.embed_tokens.weight"] == [151748, 4096]
    assert t["llm.lm_head.weight"] == [151748, 4096]
    assert t["llm.model.layers.35.self_attn.q_proj.weight"] == [32 * 128, 4096]
    assert t["llm.model.layers.35.self_attn.k_proj.weight"] == [8 * 128, 4096]
    assert t["llm.model.layers.0.self_attn.q_norm.weight"] == [128]
    assert t["llm.model.layers.0.mlp.gate_proj.weight"] == [12288, 4096]
    assert "llm.model.layers.36.mlp.up_proj.weight" not in t
    assert t["vpm.embeddings.position_embedding.weight"] == [4900, 1152]
    assert t["vpm.encoder.layers.26.mlp.fc1.weight"] == [4304, 1152]
    assert "vpm.encoder.layers.27.mlp.fc1.weight" not in t
    assert t["resampler.query"] == [64, 4096]
    assert t["resampler.kv_proj.weight"] == [4096, 1152]
    assert t["resampler.attn.in_proj_weight"] == [3 * 4096, 4096]
    assert t["resampler.proj"] == [4096, 4096]
    assert 8.6e9 < info["parameters"] < 8.8e9
    assert info["shards"] >= 4


# ---- bad input: one clear error naming the file and field ------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint.open(tmp_path / "nope")


def test_error_missing_config(tmp_path, tiny):
    d = _copy(tiny["4.5"], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        Checkpoint.open(d)


def test_error_unknown_version(tmp_path, tiny):
    d = _copy(tiny["4.5"], tmp_path / "c")
    _edit_config(d, version=3.0)
    with pytest.raises(CheckpointError, match=r"config\.json: version: .*3\.0.*not in the model-facts table"):
        Checkpoint.open(d)


def test_error_unsupported_version_slot(tmp_path, tiny):
    d = _copy(tiny["4.5"], tmp_path / "c")
    _edit_config(d, version=4.6)
    with pytest.raises(CheckpointError, match="not supported yet"):
        Checkpoint.open(d)


def test_error_resampler_width_differs_from_llm_hidden(tmp_path, tiny):
    d = _copy(tiny["4.5"], tmp_path / "c")
    _edit_config(d, hidden_size=384, num_attention_heads=6)  # the stored resampler is 256 wide
    with pytest.raises(CheckpointError, match=r"resampler\.query: shape \[64, 256\].*\[64, 384\].*LLM hidden_size"):
        Checkpoint.open(d)


def test_error_missing_tensor(tmp_path, tiny):
    from safetensors.torch import load_file, save_file
    d = _copy(tiny["2.6"], tmp_path / "c")
    # rewrite the file with one tensor dropped (safetensors' own writer, as a third party would)
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k != "resampler.ln_kv.bias"}
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) resampler\.ln_kv\.bias"):
        Checkpoint.open(d)


def test_error_truncated_weights(tmp_path, tiny):
    d = _copy(tiny["2.6"], tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        Checkpoint.open(d)


def test_error_index_names_missing_shard(tmp_path, tiny):
    d = _copy(tiny["2.6"], tmp_path / "c")
    names = list(Checkpoint.open(d).tensors)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map: .*model-00002-of-00002"):
        Checkpoint.open(d)


def test_error_config_not_json_and_bad_field_type(tmp_path, tiny):
    d = _copy(tiny["2.6"], tmp_path / "c")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        Checkpoint.open(d)
    shutil.copy(tiny["2.6"] / "config.json", d / "config.json")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = "27"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"vision_config\.num_hidden_layers: expected int"):
        Checkpoint.open(d)


def test_error_inconsistent_preprocessor(tmp_path, tiny):
    d = _copy(tiny["4.5"], tmp_path / "c")
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["image_feature_size"] = 96
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: image_feature_size: 96 disagrees"):
        Checkpoint.open(d)


def test_cli_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minicpmv_edge", "inspect", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("minicpmv-edge inspect: error:") and "config.json" in proc.stderr


def test_inspect_prints_summary(tiny, capsys):
    from minicpmv_edge.cli import main
    assert main(["inspect", str(tiny["4.0"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "4.0" and info["llm_arch"] == "llama"
    assert info["parameters"]["resampler"] == sum(
        int(np.prod(s)) for n, s in expected_tensors(Checkpoint.open(tiny["4.0"]).config).items()
        if n.startswith("resampler."))


def test_runtime_import_does_not_load_torch():
    code = ("import sys, minicpmv_edge.runtime, minicpmv_edge.cli, minicpmv_edge.facts; "
            "import minicpmv_edge.runtime.preprocess; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'coremltools') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
