"""LLM GGUF export, quantization ladder and mmproj, checked against code this project did not write:
transformers' LLM classes, HF `tokenizers`, and llama.cpp's own loader, tokenizer and clip path."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from minicpmv_edge.errors import CheckpointError, MiniCPMVEdgeError
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.export.gguf_llm import write_llm_gguf
from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
from minicpmv_edge.runtime.bundle import FileKind
from minicpmv_edge.workflows.pipeline import export_checkpoint
from minicpmv_edge.quantize.gguf_ladder import LADDER, describe_gguf, quantize_gguf
from minicpmv_edge.runtime import llamacpp_log

VERSIONS = ("2.6", "4.0", "4.5")
PROMPT = "<|im_start|>user\nDescribe the picture, please. 你好! 12345 🙂<|im_end|>\n<|im_start|>assistant\n"

llama_cpp = pytest.importorskip("llama_cpp")  # part of the base install; absent only in a broken env
llamacpp_log.install()


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """F32 and F16 GGUFs of every version (written once for this module)."""
    out = {}
    for v in VERSIONS:
        ckpt = Checkpoint.open(tiny_checkpoint(v))
        d = tmp_path_factory.mktemp(f"gguf{v}")
        out[v] = {"ckpt": ckpt, "F32": write_llm_gguf(ckpt, d / "m-F32.gguf", "F32"),
                  "F16": write_llm_gguf(ckpt, d / "m-F16.gguf", "F16"), "dir": d}
    return out


def _llama(path: Path, n_ctx: int = 256):
    # f32 KV cache and no flash attention: otherwise llama.cpp rounds K/V to f16 (docs/toolchain.md #4)
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                           verbose=False, n_threads=2, seed=0)


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _hf_ids(ckpt: Checkpoint, text: str) -> list[int]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt.root / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=ckpt.facts.bos_token is not None).ids


def _torch_logits(ckpt: Checkpoint, ids: list[int]) -> np.ndarray:
    import torch
    from minicpmv_edge.export.reference import build_llm
    model = build_llm(ckpt)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


@pytest.mark.parametrize("version", VERSIONS)
def test_f32_gguf_logits_match_transformers(exported, version):
    e = exported[version]
    ids = _hf_ids(e["ckpt"], PROMPT)
    ref = _torch_logits(e["ckpt"], ids)
    ours = _llama_logits(e["F32"], ids)
    err = np.abs(ours - ref).max()
    tol = 1e-3 * np.abs(ref).max()
    print(f"\n{version} F32 GGUF vs transformers {e['ckpt'].facts.llm_hf_class}: max|Δ| = {err:.3g} "
          f"(tolerance 1e-3 × max|logit| = {tol:.3g}) over {len(ids)} positions")
    assert err <= tol


@pytest.mark.parametrize("version", VERSIONS)
def test_f16_gguf_kld_vs_transformers(exported, version):
    e = exported[version]
    ids = _hf_ids(e["ckpt"], PROMPT)
    kld = _kld(_torch_logits(e["ckpt"], ids), _llama_logits(e["F16"], ids)).mean()
    print(f"\n{version} F16 GGUF vs transformers: mean KLD = {kld:.3g} (tolerance 1e-4)")
    assert kld <= 1e-4


def _tokenize_both(tokenizer_json, gguf_path, lines):
    """(llama.cpp vocab-only model, the lines HF `tokenizers` and llama.cpp tokenize differently)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    return llm, [line for line in lines if tok.encode(line, add_special_tokens=False).ids !=
                 llm.tokenize(line.encode(), add_bos=False, special=True)]


@pytest.mark.parametrize("version", VERSIONS)
def test_llama_cpp_tokenizes_like_hf(exported, version):
    """100% identical ids on a few thousand lines of mixed text, code, emoji and every special token."""
    from minicpmv_edge.export.synth_text import corpus_lines
    e = exported[version]
    specials = list(e["ckpt"].facts.all_special_tokens())
    lines = corpus_lines(3000, seed=9001) + specials + [f"x{t}y {t}\n{t}z" for t in specials]
    llm, mismatches = _tokenize_both(e["ckpt"].root / "tokenizer.json", e["F16"], lines)
    print(f"\n{version}: {len(lines) - len(mismatches)}/{len(lines)} lines tokenized identically")
    assert not mismatches, mismatches[:3]
    # every special token is one id, the same id, and a control token in llama.cpp
    for t in specials:
        ids = llm.tokenize(t.encode(), add_bos=False, special=True)
        assert ids == [e["ckpt"].token_id(t)], t


def test_gguf_metadata(exported):
    import gguf
    for v in VERSIONS:
        e = exported[v]
        r = gguf.GGUFReader(str(e["F16"]))
        arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
        assert arch == e["ckpt"].facts.llm_gguf_arch
        assert int(r.fields[f"{arch}.block_count"].parts[-1][0]) == e["ckpt"].llm.num_hidden_layers
        assert int(r.fields[f"{arch}.embedding_length"].parts[-1][0]) == e["ckpt"].llm.hidden_size
        assert "tokenizer.chat_template" in r.fields
        assert bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode() == e["ckpt"].facts.gguf_tokenizer_pre
        eos = int(r.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
        assert eos == e["ckpt"].token_id(e["ckpt"].facts.stop_tokens[0])
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
        if e["ckpt"].facts.llm_rope_scaling == "longrope":
            assert "rope_freqs.weight" in types
    with pytest.raises(MiniCPMVEdgeError, match="unknown GGUF float type"):
        write_llm_gguf(exported["4.5"]["ckpt"], exported["4.5"]["dir"] / "x.gguf", "F8")


def test_bf16_gguf_loads_and_matches_f32(exported):
    e = exported["4.5"]
    path = write_llm_gguf(e["ckpt"], e["dir"] / "m-BF16.gguf", "BF16")
    ids = _hf_ids(e["ckpt"], PROMPT)
    kld = _kld(_llama_logits(e["F32"], ids), _llama_logits(path, ids)).mean()
    print(f"\nBF16 GGUF vs F32 GGUF: mean KLD = {kld:.3g}")
    assert kld < 1e-3   # the synthetic weights are stored in bf16, so only activations round


def test_ladder_every_type_loads_generates_and_reports(exported, tmp_path):
    """Every ladder entry is written by llama.cpp's quantizer, loads, generates, and reports its tensor types."""
    e = exported["4.5"]
    ids = _hf_ids(e["ckpt"], PROMPT)
    base = _llama_logits(e["F16"], ids)
    rows = []
    for q in LADDER:
        rep = quantize_gguf(e["F16"], tmp_path / f"m-{q}.gguf", q)
        assert rep.path.is_file() and not (tmp_path / f"m-{q}.gguf.partial").exists()
        logits = _llama_logits(rep.path, ids)
        kld = _kld(base, logits).mean()
        top1 = (base.argmax(-1) == logits.argmax(-1)).mean()
        rows.append((q, rep.file_bytes, rep.bits_per_weight, kld, top1, rep.fallback_types))
        llm = _llama(rep.path)
        out = llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    print("\n| type | bytes | bpw | mean KLD vs F16 | top-1 | fallback |")
    for q, size, bpw, kld, top1, fb in rows:
        print(f"| {q} | {size} | {bpw:.2f} | {kld:.4f} | {top1:.2f} | {fb or '-'} |")
    sizes = {q: s for q, s, *_ in rows}
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q6_K"] < sizes["Q8_0"]
    klds = {q: k for q, _, _, k, *_ in rows}
    assert klds["Q8_0"] < klds["Q4_K_M"] < klds["Q2_K"]
    # tiny dims are multiples of 256, so K-quants are real K-quants here, not fallbacks
    assert all(not fb for *_, fb in rows)


def test_k_quant_fallback_is_reported(tmp_path, monkeypatch):
    """A model whose rows are not multiples of 256 gets llama.cpp's fallback types, and the report says so."""
    import dataclasses
    from minicpmv_edge.export import synth
    # a 320-wide MLP: ffn_down rows (ne0 = 320) cannot hold 256-value K-quant blocks
    monkeypatch.setattr(synth, "TINY_LLM", dataclasses.replace(synth.TINY_LLM, intermediate_size=320))
    out = synth.synthesize("4.5", "tiny", tmp_path / "odd", seed=0)
    res = export_checkpoint(out, tmp_path / "exp", llm_types=["Q4_K_M"], mmproj_types=[])
    print("\n" + "\n".join(res.notes))
    assert any(n.startswith("Q4_K_M: llama.cpp used") for n in res.notes), res.notes
    counts, _, _ = describe_gguf(res.path(FileKind.LLM_GGUF, "Q4_K_M"))
    assert set(counts) & {"Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}
    assert not (tmp_path / "exp" / "odd-F16.gguf").exists()   # the temporary F16 is removed


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_mmproj_llama_cpp_clip_matches_torch_reference(exported, version, tmp_path):
    """The project's independent check of the whole vision path: llama.cpp's clip on our mmproj vs the torch
    reference, per token row, for a 448×448 image. At 448×448 llama.cpp does not slice or resize, and the 32×32
    grid has identical position buckets in llama.cpp (floor) and HF (bucketize), so no preprocessing
    difference applies."""
    from minicpmv_edge.workflows.demo import demo_image
    from minicpmv_edge.export.reference import MiniCPMVReference
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip
    from minicpmv_edge.runtime.preprocess import position_bucket_ids
    e = exported[version]
    assert np.array_equal(position_bucket_ids(32, 32, 70),
                          [(70 * i // 32) * 70 + 70 * j // 32 for i in range(32) for j in range(32)])
    img = demo_image(448)
    ref_feats, grid = MiniCPMVReference.from_checkpoint(e["ckpt"]).encode_image(img)
    assert grid is None and ref_feats.shape[0] == 1
    ref = ref_feats[0].numpy()
    limits = {"F32": 0.9999, "F16": 0.999, "Q8_0": 0.999}
    for t, limit in limits.items():
        mm = write_mmproj_gguf(e["ckpt"], tmp_path / f"mmproj-{t}.gguf", t)
        with LlamaCppClip(mm, e["F32"]) as clip:
            chunks = clip.encode(img)
        assert len(chunks) == 1 and chunks[0].shape == ref.shape
        ours = chunks[0]
        cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"\n{version} mmproj {t}: llama.cpp clip vs torch reference cosine per row min {cos.min():.7f} "
              f"mean {cos.mean():.7f} (tolerance {limit})")
        assert cos.min() >= limit


def test_mmproj_layout_matches_llama_cpp_expectations(exported, tmp_path):
    import gguf
    e = exported["4.5"]
    mm = write_mmproj_gguf(e["ckpt"], tmp_path / "mmproj.gguf", "F16")
    r = gguf.GGUFReader(str(mm))
    t = {x.name: x for x in r.tensors}
    d, kv = e["ckpt"].resampler.embed_dim, e["ckpt"].vision.hidden_size
    assert int(r.fields["clip.minicpmv_version"].parts[-1][0]) == e["ckpt"].facts.mmproj_version
    assert bytes(r.fields["clip.projector_type"].parts[-1]).decode() == "resampler"
    assert list(t["resampler.pos_embed_k"].shape) == [d, 70 * 70]
    # fc1 (kv -> intermediate) is stored under the legacy name ffn_down
    assert list(t["v.blk.0.ffn_down.weight"].shape) == [kv, e["ckpt"].vision.intermediate_size]
    proj = e["ckpt"].tensor("resampler.proj")
    stored = np.asarray(t["resampler.proj.weight"].data, dtype=np.float32).reshape(d, d)
    assert np.allclose(stored, proj.T, atol=1e-2)   # transposed (and f16-rounded)


# ---- bad input: clear errors and no finished-looking files ------------------------------------------

def test_unknown_quant_type_fails_before_writing(tiny_checkpoint, tmp_path):
    with pytest.raises(MiniCPMVEdgeError, match="unknown quantization type 'Q3_X'"):
        export_checkpoint(tiny_checkpoint("4.5"), tmp_path / "out", llm_types=["F16", "Q3_X"])
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_export_of_bad_checkpoints(tiny_checkpoint, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    bad = shutil.copytree(tiny_checkpoint("2.6"), tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["llm.model.layers.1.mlp.up_proj.weight"] = tensors["llm.model.layers.1.mlp.up_proj.weight"][:, :128].contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"llm\.model\.layers\.1\.mlp\.up_proj\.weight: shape"):
        export_checkpoint(bad, tmp_path / "o1")
    del tensors["llm.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) llm\.model\.layers\.1\.mlp\.up_proj\.weight"):
        export_checkpoint(bad, tmp_path / "o2")
    assert not list(tmp_path.glob("o*/*"))   # validation failed before anything was written


def test_full_disk_leaves_no_finished_looking_file(exported, tmp_path, monkeypatch):
    import gguf
    e = exported["4.5"]
    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def failing(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="No space left"):
        write_llm_gguf(e["ckpt"], tmp_path / "m-F16.gguf", "F16")
    assert list(tmp_path.iterdir()) == []
