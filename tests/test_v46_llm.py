"""MiniCPM-V 4.6, checkpoint and language-model side: facts, reader, synth (written by transformers itself),
LLM GGUF (`qwen35`) checked against transformers' MiniCPMV4_6ForConditionalGeneration and llama.cpp's loader,
tokenizer and quantizer."""
from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from minicpmv_edge.errors import CheckpointError, MiniCPMVEdgeError
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.facts import CHECKPOINT_VERSIONS, facts_for_config, checkpoint_facts

# The public copy of the hub's config.json (openbmb/MiniCPM-V-4.6, transformers 5.7.0), as vendored in
# github.com/moderately-ai/lmbrrr docs/research/models/minicpm-v-4.6/hf-model/config.json: the fields our
# facts and our `full` synth must reproduce.
PUBLIC_CONFIG = {
    "architectures": ["MiniCPMV4_6ForConditionalGeneration"], "model_type": "minicpmv4_6", "bos_token_id": None,
    "drop_vision_last_layer": False, "image_size": 1120, "tie_word_embeddings": True, "insert_layer_id": 6,
    "vision_config": {"hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "image_size": 980,
                      "intermediate_size": 4304, "layer_norm_eps": 1e-06, "model_type": "minicpmv4_6_vision",
                      "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 27, "patch_size": 14},
    "text_config": {
        "attention_bias": False, "attn_output_gate": True, "full_attention_interval": 4, "head_dim": 256,
        "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3584,
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
        "linear_value_head_dim": 128, "max_position_embeddings": 262144, "mtp_num_hidden_layers": 1,
        "num_attention_heads": 8, "num_hidden_layers": 24, "num_key_value_heads": 2, "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06, "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000000,
                                                   "rope_type": "default"},
        "vocab_size": 248094, "model_type": "qwen3_5_text", "tie_word_embeddings": True},
}
# From the public safetensors header of the same checkpoint (same folder, model-safetensors-header.json):
# 779 tensors, a few shapes.
PUBLIC_TENSOR_COUNT = 779
PUBLIC_SHAPES = {
    "model.language_model.embed_tokens.weight": (248094, 1024),
    "model.language_model.layers.0.linear_attn.in_proj_qkv.weight": (6144, 1024),
    "model.language_model.layers.0.linear_attn.conv1d.weight": (6144, 1, 4),
    "model.language_model.layers.0.linear_attn.in_proj_z.weight": (2048, 1024),
    "model.language_model.layers.0.linear_attn.out_proj.weight": (1024, 2048),
    "model.language_model.layers.0.linear_attn.A_log": (16,),
    "model.language_model.layers.0.linear_attn.norm.weight": (128,),
    "model.language_model.layers.11.self_attn.q_proj.weight": (4096, 1024),
    "model.language_model.layers.11.self_attn.k_proj.weight": (512, 1024),
    "model.language_model.layers.11.self_attn.o_proj.weight": (1024, 2048),
    "model.language_model.layers.11.self_attn.q_norm.weight": (256,),
    "model.vision_tower.vit_merger.linear_1.weight": (17216, 4608),
    "model.vision_tower.vit_merger.linear_2.weight": (1152, 17216),
    "model.vision_tower.vit_merger.pre_norm.weight": (4608,),
    "model.vision_tower.encoder.layers.9.self_attn.q_proj.weight": (1152, 1152),
}
PROMPT = ("<|im_start|>user\nDescribe the picture, please. 你好! café naïve 12345 🙂<|im_end|>\n"
          "<|im_start|>assistant\n<think>\n\n</think>\n\n")

transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
from test_gguf_export import _kld, _llama, _llama_logits, _tokenize_both  # noqa: E402  (f32 KV llama.cpp helpers)


@pytest.fixture(scope="module")
def tiny46(tiny_checkpoint) -> Path:
    return tiny_checkpoint("4.6")


@pytest.fixture(scope="module")
def ckpt46(tiny46) -> Checkpoint:
    return Checkpoint.open(tiny46)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, fn) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------------------------- facts

def test_46_is_recognised_by_model_type_and_its_facts_match_the_public_config():
    facts = facts_for_config(PUBLIC_CONFIG)
    assert facts.version == "4.6" and "4.6" in CHECKPOINT_VERSIONS
    tc, vc = PUBLIC_CONFIG["text_config"], PUBLIC_CONFIG["vision_config"]
    d, h = facts.llm_dims, facts.llm_hybrid_dims
    assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.head_dim,
            d.intermediate_size, d.vocab_size, d.max_position_embeddings, d.rope_theta, d.tie_word_embeddings) == \
        (tc["hidden_size"], tc["num_hidden_layers"], tc["num_attention_heads"], tc["num_key_value_heads"],
         tc["head_dim"], tc["intermediate_size"], tc["vocab_size"], tc["max_position_embeddings"],
         tc["rope_parameters"]["rope_theta"], tc["tie_word_embeddings"])
    assert list(h.layer_pattern) * (d.num_hidden_layers // len(h.layer_pattern)) == tc["layer_types"]
    assert (h.linear_conv_kernel_dim, h.linear_key_head_dim, h.linear_value_head_dim, h.linear_num_key_heads,
            h.linear_num_value_heads, h.partial_rotary_factor, h.attn_output_gate, h.mtp_num_hidden_layers) == \
        (tc["linear_conv_kernel_dim"], tc["linear_key_head_dim"], tc["linear_value_head_dim"],
         tc["linear_num_key_heads"], tc["linear_num_value_heads"], tc["partial_rotary_factor"],
         tc["attn_output_gate"], tc["mtp_num_hidden_layers"])
    v = facts.vision_dims
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.image_size, v.hidden_act) == (vc["hidden_size"], vc["num_hidden_layers"], vc["num_attention_heads"],
                                             vc["intermediate_size"], vc["patch_size"], vc["image_size"],
                                             vc["hidden_act"])
    assert facts.insert_layer_id == PUBLIC_CONFIG["insert_layer_id"]
    assert facts.vision_model_type == vc["model_type"]
    # the real tokenizer's 50 added tokens, ids 248044.. in order; the image placeholder is <|image_pad|>
    tokens = facts.all_special_tokens()
    assert len(tokens) == 50 and len(set(tokens)) == 50 and tc["vocab_size"] - 248044 == 50
    assert tokens.index("<|image_pad|>") + 248044 == 248056 and tokens.index("<|video_pad|>") + 248044 == 248057
    assert tokens.index("<|endoftext|>") + 248044 == 248044 and tokens.index("<|im_end|>") + 248044 == 248046
    assert facts.special_tokens["image_pad"] == "<|image_pad|>"


def test_full_synth_plan_is_the_public_checkpoint():
    """`synth --size full` (planned, nothing written): config fields and tensor list as the hub's."""
    from minicpmv_edge.export.synth import plan
    p = plan("4.6", "full", vocab_size=248094)
    cfg = p.config
    for key in ("architectures", "model_type", "bos_token_id", "drop_vision_last_layer", "image_size",
                "tie_word_embeddings", "insert_layer_id"):
        assert cfg[key] == PUBLIC_CONFIG[key], key
    for section in ("vision_config", "text_config"):
        for key, want in PUBLIC_CONFIG[section].items():
            got = cfg[section][key]
            assert got == want, f"{section}.{key}: {got!r} != {want!r}"
    assert len(p.tensors) == PUBLIC_TENSOR_COUNT
    for name, shape in PUBLIC_SHAPES.items():
        assert p.tensors[name] == shape, name
    print(f"\n4.6 full plan: {len(p.tensors)} tensors, {p.parameters / 1e9:.3f} B parameters "
          f"({p.total_bytes / 2 ** 30:.2f} GiB bf16)")


# ----------------------------------------------------------------------------------------------- reader + synth

def test_tiny_46_checkpoint_reads_and_is_exactly_what_transformers_saved(ckpt46):
    """Layout by construction: the reader's tensor list equals the names transformers wrote, both ways."""
    from minicpmv_edge.export.checkpoint import expected_tensors
    expected = expected_tensors(ckpt46.config)
    assert set(expected) == set(ckpt46.tensors)
    assert all(ckpt46.tensors[n].shape == s for n, s in expected.items())
    llm = ckpt46.llm
    lin = llm.linear_attention
    assert ckpt46.version == "4.6" and ckpt46.resampler is None and ckpt46.roles == ("vision", "merger", "llm")
    assert set(lin.layer_types) == {"linear_attention", "full_attention"}   # tiny still has both kinds
    assert llm.tie_word_embeddings and "lm_head.weight" not in ckpt46.tensors
    assert llm.rotary_dim == llm.head_dim // 4
    raw = json.loads((ckpt46.root / "config.json").read_text())
    assert raw["model_type"] == "minicpmv4_6" and "version" not in raw
    assert raw["image_token_id"] == ckpt46.token_id("<|image_pad|>")
    assert raw["video_token_id"] == ckpt46.token_id("<|video_pad|>")
    # transformers loads it back (its own loader reports no missing or unexpected weights)
    model, info = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(
        ckpt46.root, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    summary = ckpt46.summary()
    assert summary["resampler"] is None and summary["parameters"]["merger"] > 0


def test_mtp_head_is_ignored_and_dropped(tiny46, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    d = _copy(tiny46, tmp_path / "c")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["mtp.fc.weight"] = torch.zeros((4, 4), dtype=torch.bfloat16)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ckpt = Checkpoint.open(d)
    assert ckpt.ignored_tensors == ["mtp.fc.weight"]
    assert all(not n.startswith("mtp.") for n in ckpt.names("llm"))


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c["text_config"].pop("linear_num_key_heads"),
     r"config\.json: text_config\.linear_num_key_heads: missing required field"),
    (lambda c: c["text_config"].update(layer_types=["full_attention"]),
     r"config\.json: text_config\.layer_types: expected 4 entries"),
    (lambda c: c["text_config"].update(model_type="qwen3"),
     r"config\.json: text_config\.model_type: expected 'qwen3_5_text'"),
    (lambda c: c["text_config"].update(partial_rotary_factor=0, rope_parameters={"partial_rotary_factor": 1.5}),
     r"text_config\.partial_rotary_factor: expected a number in \(0, 1\]"),
    (lambda c: c.update(insert_layer_id=99), r"config\.json: insert_layer_id: 99 is not a layer"),
    (lambda c: c.update(image_token_id=10 ** 9), r"config\.json: image_token_id: .* below vocab_size"),
    (lambda c: c.pop("text_config"), r"config\.json: text_config: missing or not an object"),
    (lambda c: c.update(model_type="minicpmv4_7"), r"config\.json: model_type: .*minicpmv4_7"),
])
def test_bad_46_config_is_one_clear_line(tiny46, tmp_path, edit, pattern):
    d = _copy(tiny46, tmp_path / "c")
    _edit(d, edit)
    with pytest.raises(CheckpointError, match=pattern) as err:
        Checkpoint.open(d)
    assert "\n" not in str(err.value)


def test_partial_46_checkpoint_missing_merger_tensor(tiny46, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(tiny46, tmp_path / "c")
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items()
               if k != "model.merger.mlp.0.linear_2.weight"}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) "
                                              r"model\.merger\.mlp\.0\.linear_2\.weight") as err:
        Checkpoint.open(d)
    assert "\n" not in str(err.value)


def test_wrong_width_46_tensor(tiny46, tmp_path):
    """A config whose LLM width disagrees with the stored tensors is caught by shape, naming the tensor."""
    d = _copy(tiny46, tmp_path / "c")
    _edit(d, lambda c: c["text_config"].update(linear_num_value_heads=8))
    with pytest.raises(CheckpointError, match=r"linear_attn\..*shape \[.*\], config\.json implies"):
        Checkpoint.open(d)


def test_legacy_layout_claiming_46_is_refused(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("4.5"), tmp_path / "c")
    _edit(d, lambda c: c.update(version=4.6))
    with pytest.raises(CheckpointError, match=r"version: .*transformers-native \(model_type 'minicpmv4_6'"):
        Checkpoint.open(d)


def test_synth_cli_accepts_46_but_not_an_edge_size(tmp_path):
    from minicpmv_edge.export.synth import main
    assert checkpoint_facts("4.6").version == "4.6"
    with pytest.raises(MiniCPMVEdgeError, match="edge-4b.*not defined for MiniCPM-V 4.6"):
        main(["--version", "4.6", "--size", "edge-4b", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


# ----------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_has_the_real_added_tokens_and_loads_as_qwen35(ckpt46):
    """The real 50 added tokens in the real order and with the real special flags; transformers' AutoTokenizer
    splits exactly like tokenizer.json; the processor's
    image-grammar attributes resolve."""
    from tokenizers import Tokenizer
    from minicpmv_edge.export.synth_text import corpus_lines
    facts = ckpt46.facts
    tok = Tokenizer.from_file(str(ckpt46.root / "tokenizer.json"))
    added = {t.content: (i, t.special) for i, t in tok.get_added_tokens_decoder().items()}
    first = added["<|endoftext|>"][0]
    assert [added[t][0] for t in facts.all_special_tokens()] == list(range(first, first + 50))
    assert [t for t in facts.all_special_tokens() if not added[t][1]] == list(facts.plain_added_tokens)
    assert not added["<think>"][1] and added["<|image_pad|>"][1]
    hf = transformers.AutoTokenizer.from_pretrained(ckpt46.root)
    lines = corpus_lines(300, 7) + [PROMPT, "a\u0301b q\u0303 नमस्ते", "x<|image_pad|>y <think>z</think>"]
    assert all(hf(t)["input_ids"] == tok.encode(t).ids for t in lines)
    assert hf.image_token == "<|image_pad|>" and hf.video_token == "<|video_pad|>"
    assert hf.convert_tokens_to_ids(hf.slice_start_token) == ckpt46.token_id("<slice>")
    # <think> is not special: it survives skip_special_tokens, like the real tokenizer
    ids = tok.encode("<|im_start|><think>hi</think><|im_end|>").ids
    assert hf.decode(ids, skip_special_tokens=True) == "<think>hi</think>"


def test_chat_template_thinking_off_unless_asked(ckpt46):
    hf = transformers.AutoTokenizer.from_pretrained(ckpt46.root)

    def render(messages, **kw):
        return hf.apply_chat_template(messages, tokenize=False, **kw)
    user = [{"role": "user", "content": "Hi"}]
    body, gen = "<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>assistant\n"
    assert render(user, add_generation_prompt=True) == body + gen + "<think>\n\n</think>\n\n"
    assert render(user, add_generation_prompt=True, enable_thinking=False) == body + gen + "<think>\n\n</think>\n\n"
    assert render(user, add_generation_prompt=True, enable_thinking=True) == body + gen + "<think>\n"
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert render(image) == "<|im_start|>user\n<|image_pad|>\nWhat is it?<|im_end|>\n"
    convo = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert render(convo) == ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                             "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                             "A2<|im_end|>\n")


# ----------------------------------------------------------------------------------------------- LLM -> GGUF

@pytest.fixture(scope="module")
def gguf46(ckpt46, tmp_path_factory):
    from minicpmv_edge.export.gguf_llm import write_llm_gguf
    d = tmp_path_factory.mktemp("gguf46")
    return {"F32": write_llm_gguf(ckpt46, d / "m-F32.gguf", "F32"),
            "F16": write_llm_gguf(ckpt46, d / "m-F16.gguf", "F16"), "dir": d}


@pytest.fixture(scope="module")
def hf46(ckpt46):
    """transformers' own model of the same checkpoint, in float32 (the independent reference)."""
    import torch
    model = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(ckpt46.root, dtype=torch.float32)
    return model.eval()


def _ids(ckpt: Checkpoint, text: str) -> list[int]:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(ckpt.root / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def test_f32_gguf_logits_match_transformers(ckpt46, gguf46, hf46):
    """Every position of a mixed prompt, through 3 gated-delta-net layers and a gated full-attention layer."""
    ids = _ids(ckpt46, PROMPT)
    ref = _hf_logits(hf46, ids)
    ours = _llama_logits(gguf46["F32"], ids)
    err = np.abs(ours - ref).max()
    tol = 1e-3 * np.abs(ref).max()
    print(f"\n4.6 F32 GGUF (qwen35) vs transformers MiniCPMV4_6ForConditionalGeneration: max|Δ| = {err:.3g} "
          f"(tolerance 1e-3 × max|logit| = {tol:.3g}) over {len(ids)} positions; "
          f"top-1 agreement {(ours.argmax(-1) == ref.argmax(-1)).mean():.3f}")
    assert err <= tol


def test_f16_gguf_kld_vs_transformers(ckpt46, gguf46, hf46):
    ids = _ids(ckpt46, PROMPT)
    kld = _kld(_hf_logits(hf46, ids), _llama_logits(gguf46["F16"], ids)).mean()
    print(f"\n4.6 F16 GGUF vs transformers: mean KLD = {kld:.3g} (tolerance 1e-4)")
    assert kld <= 1e-4


def test_gguf_metadata(ckpt46, gguf46):
    import gguf
    r = gguf.GGUFReader(str(gguf46["F16"]))

    def field(key):
        return r.fields[key].parts[-1]
    assert bytes(field("general.architecture")).decode() == "qwen35"
    assert bytes(field("tokenizer.ggml.pre")).decode() == "qwen35"
    llm, lin = ckpt46.llm, ckpt46.llm.linear_attention
    assert int(field("qwen35.block_count")[0]) == llm.num_hidden_layers
    assert int(field("qwen35.rope.dimension_count")[0]) == llm.head_dim // 4
    assert int(field("qwen35.ssm.inner_size")[0]) == lin.value_dim
    assert int(field("qwen35.full_attention_interval")[0]) == 4
    assert "tokenizer.chat_template" in r.fields
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types   # tied: llama.cpp reuses token_embd
    assert types["blk.0.ssm_conv1d.weight"] == "F32" and types["blk.0.ssm_a"] == "F32"
    assert types["blk.0.attn_qkv.weight"] == "F16" and types["blk.3.attn_q.weight"] == "F16"
    assert not any(n.startswith(("mtp", "v.", "mm.")) for n in types)


def test_llama_cpp_tokenizes_like_hf(ckpt46, gguf46):
    """Identical ids on the tokenizer test corpus (mixed scripts, combining marks, code, emoji) and every
    added token; llama.cpp's `qwen35` pre-tokenizer is the one that splits like Qwen3.5's regex."""
    from minicpmv_edge.export.synth_text import corpus_lines
    specials = list(ckpt46.facts.all_special_tokens())
    # combining marks that survive NFC (both tokenizers see NFC text: HF normalises, llama.cpp does not)
    marks = [unicodedata.normalize("NFC", t) for t in ("q\u0303 a\u0300b\u0301c Ελλάδα\u0301 नमस्ते कृपया",
                                                       "x\u0300\u0301 \u0301y", "ab\u0301\u0302cd\u0303 \u0300")]
    assert all(any(unicodedata.category(c) == "Mn" for c in t) for t in marks)
    lines = corpus_lines(3000, seed=9001) + specials + [f"x{t}y {t}\n{t}z" for t in specials] + marks
    llm, mismatches = _tokenize_both(ckpt46.root / "tokenizer.json", gguf46["F16"], lines)
    print(f"\n4.6: {len(lines) - len(mismatches)}/{len(lines)} lines tokenized identically by llama.cpp and HF")
    assert not mismatches, mismatches[:3]
    for t in specials:
        assert llm.tokenize(t.encode(), add_bos=False, special=True) == [ckpt46.token_id(t)], t


def test_ladder_every_type_loads_and_generates(ckpt46, gguf46, tmp_path):
    from minicpmv_edge.quantize.gguf_ladder import LADDER, quantize_gguf
    ids = _ids(ckpt46, PROMPT)
    base = _llama_logits(gguf46["F16"], ids)
    rows = []
    for q in LADDER:
        rep = quantize_gguf(gguf46["F16"], tmp_path / f"m-{q}.gguf", q)
        logits = _llama_logits(rep.path, ids)
        assert np.isfinite(logits).all(), q
        rows.append((q, rep.file_bytes, rep.bits_per_weight, _kld(base, logits).mean(), rep.fallback_types))
        out = _llama(rep.path).create_completion(PROMPT, max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    print("\n| type | bytes | bpw | mean KLD vs F16 | fallback |")
    for q, size, bpw, kld, fb in rows:
        print(f"| {q} | {size} | {bpw:.2f} | {kld:.4f} | {fb or '-'} |")
    sizes = {q: s for q, s, *_ in rows}
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"]
    klds = {q: k for q, _, _, k, _ in rows}
    assert klds["Q8_0"] < klds["Q4_K_M"] < klds["Q2_K"]


# ----------------------------------------------------------------------------------------------- runtime decoder

N_NEW = 16


def _hf_greedy(model, embeds, n: int) -> list[int]:
    """transformers' own greedy `generate` from input embeddings (positions: transformers' defaults), `n` tokens
    whatever they are (the decoder stops at end-of-generation tokens; callers pass its count)."""
    import torch
    with torch.no_grad():
        out = model.generate(inputs_embeds=torch.as_tensor(embeds, dtype=torch.float32)[None], max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, -n:].tolist()


def _embeds(model, segments) -> np.ndarray:
    """The input embeddings a segment list stands for: token embeddings, or the injected rows."""
    import torch
    from minicpmv_edge.runtime.decoder import Embeddings
    parts = []
    with torch.no_grad():
        for seg in segments:
            if isinstance(seg, Embeddings):
                parts.append(seg.rows)
            else:
                parts.append(model.get_input_embeddings()(torch.tensor(list(seg))).numpy())
    return np.concatenate(parts).astype(np.float32)


def _greedy(decoder, segments, n: int = N_NEW) -> list[int]:
    from minicpmv_edge.runtime.decoder import SamplingParams
    out = []
    for tok in decoder.generate(segments, max_tokens=n, sampling=SamplingParams(temperature=0.0)):
        out.append(tok)
    return out


def _decoder(path: Path):
    from minicpmv_edge.runtime.decoder import Decoder
    return Decoder(path, n_ctx=512, exact=True)


def _turn(ckpt, text: str) -> list[int]:
    return _ids(ckpt, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_decoder_text_turns_match_transformers_and_fresh_runs(ckpt46, gguf46, hf46):
    """Greedy tokens equal transformers'; a second turn and the same question again give exactly a fresh run's
    tokens although the recurrent state cannot be cut back (resumed from a snapshot, or recomputed)."""
    first = _turn(ckpt46, "What is in the picture? Describe it.")
    with _decoder(gguf46["F32"]) as dec:
        answer = _greedy(dec, [first])
        assert dec.recurrent
        ref = _hf_greedy(hf46, _embeds(hf46, [first]), len(answer))
        print(f"\nturn 1: ours {answer}\n        hf   {ref}")
        assert answer == ref and len(answer) >= 4
        # same question again: resumes from the snapshot before the last prompt position
        again = _greedy(dec, [first])
        assert again == answer and dec.last_prefill_positions == 1
        # second turn: the template drops the first answer's think block, so the cache diverges inside turn 1
        second = first[:-len(_ids(ckpt46, "<think>\n\n</think>\n\n"))] + answer + _ids(ckpt46, "<|im_end|>\n") + \
            _turn(ckpt46, "And the colours?")
        turn2 = _greedy(dec, [second])
    with _decoder(gguf46["F32"]) as fresh:
        assert _greedy(fresh, [second]) == turn2
    assert turn2 == _hf_greedy(hf46, _embeds(hf46, [second]), len(turn2))
    print(f"turn 2 ({len(second)} prompt positions): {turn2} = fresh run = transformers")


def test_decoder_embedding_rows_match_transformers_and_reuse_the_image(ckpt46, gguf46, hf46):
    """Rows injected at consecutive positions (transformers' positions for 4.6 image tokens, not mtmd's 2-D
    ones); a new question about the same image resumes after the image instead of recomputing it."""
    from minicpmv_edge.runtime.decoder import Embeddings
    rng = np.random.default_rng(46)
    rows = Embeddings(rng.standard_normal((40, ckpt46.llm.hidden_size)).astype(np.float32), key="img-46")
    head = _ids(ckpt46, "<|im_start|>user\n<image>")
    q1 = _ids(ckpt46, "</image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    q2 = _ids(ckpt46, "</image>\nWhich colour is it?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with _decoder(gguf46["F32"]) as dec:
        a1 = _greedy(dec, [head, rows, q1])
        assert a1 == _hf_greedy(hf46, _embeds(hf46, [head, rows, q1]), len(a1))
        a2 = _greedy(dec, [head, rows, q2])
        assert dec.last_prefill_positions == len(q2)     # the image rows were not recomputed
    with _decoder(gguf46["F32"]) as fresh:
        assert _greedy(fresh, [head, rows, q2]) == a2
    assert a2 == _hf_greedy(hf46, _embeds(hf46, [head, rows, q2]), len(a2))
    print(f"\nimage rows: q1 {a1}\n            q2 {a2} (resumed after the image) = fresh run = transformers")
