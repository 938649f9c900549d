"""The torch reference (export/reference.py) against references this project did not write.

ViT -> transformers SiglipVisionModel; resampler attention -> torch.nn.MultiheadAttention; LLM -> the
transformers class loaded by `from_pretrained` from a folder of its own. Every parity test prints the
measured error next to its tolerance (run with -s to see them).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minicpmv_edge.export import reference as R
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.facts import RESAMPLER_VERSIONS

torch.manual_seed(0)


def report(name: str, err: float, tol: float) -> None:
    print(f"\n[parity] {name}: {err:.3g} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: {err:.3g} > {tol:.0e}"


@pytest.fixture(scope="module")
def ckpt45(tiny_checkpoint) -> Checkpoint:
    return Checkpoint.open(tiny_checkpoint("4.5"))


@pytest.fixture(scope="module")
def vit(ckpt45) -> R.VisionTower:
    return R.VisionTower.from_checkpoint(ckpt45)


@pytest.fixture(scope="module")
def resampler(ckpt45) -> R.Resampler:
    return R.Resampler.from_checkpoint(ckpt45)


# ---------------------------------------------------------------------------------------------
# Vision tower


def test_position_ids_identity_on_70x70_and_hf_bucketing():
    ids = R.navit_position_ids(70, 70, 70)
    assert torch.equal(ids, torch.arange(4900))
    # grids where HF's float32-step bucketing agrees with floor(70 i / n), and one where it does not
    for n in (32, 16, 46):
        want = torch.tensor([70 * i // n for i in range(n)])
        assert torch.equal(R.navit_position_ids(n, 1, 70) // 70, want)
    rows = R.navit_position_ids(25, 1, 70) // 70
    assert rows[5].item() == 13, "HF buckets row 5 of 25 into 13 (floor(70*5/25) = 14)"


def test_position_ids_match_runtime_preprocess():
    pre = pytest.importorskip("minicpmv_edge.runtime.preprocess")
    fn = getattr(pre, "position_bucket_ids", None)
    if fn is None:
        pytest.skip("runtime.preprocess has no position_bucket_ids")
    for h, w in [(32, 32), (28, 40), (16, 70), (25, 49), (1, 1), (70, 70), (58, 77)]:
        ours = R.navit_position_ids(h, w, 70).numpy()
        theirs = np.asarray(fn(h, w, 70)).reshape(-1)
        assert np.array_equal(ours, theirs), f"bucket ids differ for grid {h}x{w}"


def test_hf_strip_layout_gives_the_same_patch_embeddings(vit):
    px = torch.randn(3, 14 * 5, 14 * 7)
    conv = vit.embeddings.patch_embedding
    natural = conv(px[None]).flatten(2)                       # [1, C, 35]
    strip = conv(R.hf_strip_layout(px, 14)[None]).flatten(2)  # [1, C, 35]
    err = (natural - strip).abs().max().item()
    report("patch embed natural vs HF strip layout", err, 1e-6)


def test_vit_matches_siglip_vision_model_on_70x70(ckpt45, vit):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = ckpt45.vision
    cfg = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                             num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                             image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                             layer_norm_eps=v.layer_norm_eps, vision_use_head=False)
    hf = SiglipVisionModel(cfg).eval()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    state = {prefix + k: torch.from_numpy(a) for k, a in ckpt45.iter_tensors("vision", strip_prefix=True)}
    hf.load_state_dict(state, strict=True)
    px = torch.randn(1, 3, 980, 980)
    with torch.no_grad():
        want = hf(pixel_values=px).last_hidden_state          # [1, 4900, C]
        got, valid = vit([px[0]])
    assert got.shape == want.shape and bool(valid.all())
    err = (got - want).abs().max().item()
    report("ViT vs SiglipVisionModel, 980x980 (70x70 grid)", err, 1e-4)


def test_vit_padded_batch_equals_one_slice_at_a_time(vit):
    slices = [torch.randn(3, 448, 644), torch.randn(3, 448, 448), torch.randn(3, 224, 364), torch.randn(3, 14, 14)]
    with torch.no_grad():
        batched = vit.encode(slices)
        single = [vit.encode([s])[0] for s in slices]
    assert [b.shape[0] for b in batched] == [32 * 46, 32 * 32, 16 * 26, 1]
    err = max((b - s).abs().max().item() for b, s in zip(batched, single))
    report("ViT padded batch vs one slice at a time (448x644, 448x448, 224x364, 14x14)", err, 1e-5)


# ---------------------------------------------------------------------------------------------
# Resampler

GRIDS = [(32, 32), (28, 40), (16, 70), (1, 1)]


def _torch_mha(resampler: R.Resampler) -> nn.MultiheadAttention:
    d = resampler.cfg.embed_dim
    mha = nn.MultiheadAttention(d, resampler.cfg.num_heads)
    with torch.no_grad():
        mha.in_proj_weight.copy_(resampler.attn.in_proj_weight)
        mha.in_proj_bias.copy_(resampler.attn.in_proj_bias)
        mha.out_proj.weight.copy_(resampler.attn.out_proj.weight)
        mha.out_proj.bias.copy_(resampler.attn.out_proj.bias)
    return mha.eval()


def _sincos_2d_independent(d: int, h: int, w: int) -> torch.Tensor:
    """Closed form (docs/model.md §4.1): [sin(x w), cos(x w), sin(y w), cos(y w)], w_k = 10000^(-k/(D/4))."""
    e = d // 4
    omega = 1.0 / 10000 ** (torch.arange(e, dtype=torch.float32) / e)
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def _temporal_independent(d: int, t: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
    return torch.cat([(t * omega).sin(), (t * omega).cos()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_resampler_sincos_matches_closed_form(resampler):
    d = resampler.cfg.embed_dim
    for h, w in GRIDS:
        err = (R.sincos_2d(d, h, w) - _sincos_2d_independent(d, h, w)).abs().max().item()
        assert err < 1e-5, (h, w, err)
    err = (R.temporal_sincos(d, [0, 7, 123])[2] - _temporal_independent(d, 123)).abs().max().item()
    assert err < 1e-4, err


def test_resampler_attention_matches_torch_mha(resampler):
    d = resampler.cfg.embed_dim
    mha = _torch_mha(resampler)
    q = torch.randn(resampler.cfg.query_num, d)
    lmax = max(h * w for h, w in GRIDS)
    keys, values = torch.randn(len(GRIDS), lmax, d), torch.randn(len(GRIDS), lmax, d)
    pad = torch.ones(len(GRIDS), lmax, dtype=torch.bool)
    for i, (h, w) in enumerate(GRIDS):
        pad[i, : h * w] = False
    with torch.no_grad():
        got = resampler.attn(q, keys, values, pad)                                   # [B, Q, D]
        want = mha(q[:, None].repeat(1, len(GRIDS), 1), keys.transpose(0, 1), values.transpose(0, 1),
                   key_padding_mask=pad)[0].transpose(0, 1)                          # [B, Q, D]
        err = _rel(got, want)
        single = max(_rel(resampler.attn(q, keys[i:i + 1, : h * w], values[i:i + 1, : h * w])[0],
                          mha(q, keys[i, : h * w], values[i, : h * w])[0]) for i, (h, w) in enumerate(GRIDS))
    report("resampler attention vs nn.MultiheadAttention, grids 32x32/28x40/16x70/1x1 batched", err, 1e-5)
    report("resampler attention vs nn.MultiheadAttention, one grid at a time", single, 1e-5)


def _resampler_composition(r: R.Resampler, feats: list[torch.Tensor], sizes) -> torch.Tensor:
    """The HF MiniCPMVResampler.forward (2D branch) written with nn.MultiheadAttention, L x B x D layout."""
    d = r.cfg.embed_dim
    x = nn.utils.rnn.pad_sequence(feats, batch_first=True)                           # [B, L, kv]
    x = r.ln_kv(x @ r.kv_proj.weight.T).permute(1, 0, 2)                            # [L, B, D]
    pos = nn.utils.rnn.pad_sequence([_sincos_2d_independent(d, h, w) for h, w in sizes]).to(x.dtype)  # [L, B, D]
    pad = torch.ones(len(sizes), x.shape[0], dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pad[i, : h * w] = False
    q = r.ln_q(r.query)[:, None].repeat(1, len(sizes), 1)                            # [Q, B, D]
    out = _torch_mha(r)(q, x + pos, x, key_padding_mask=pad)[0].permute(1, 0, 2)     # [B, Q, D]
    return r.ln_post(out) @ r.proj


def test_full_resampler_matches_composition_with_torch_mha(resampler):
    kv = resampler.cfg.kv_dim
    feats = [torch.randn(h * w, kv) for h, w in GRIDS]
    with torch.no_grad():
        got = resampler(feats, GRIDS)
        want = _resampler_composition(resampler, feats, GRIDS)
        padded = resampler(nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor(GRIDS))
    assert got.shape == (len(GRIDS), resampler.cfg.query_num, resampler.cfg.embed_dim)
    report("full resampler vs composition with nn.MultiheadAttention", _rel(got, want), 1e-5)
    assert torch.equal(got, padded), "list input and padded-tensor input must agree"


def _temporal_composition(r: R.Resampler, feats, sizes, temporal_ids) -> torch.Tensor:
    """HF forward_padding's temporal branch: pad slices, add pos2d + temporal to keys, merge each group's
    frames (padding kept, masked), pad groups, one nn.MultiheadAttention call."""
    d = r.cfg.embed_dim
    flat = [t for g in temporal_ids for t in g]
    x = r.ln_kv(nn.utils.rnn.pad_sequence(feats, batch_first=True) @ r.kv_proj.weight.T)   # [B, L, D]
    lmax = x.shape[1]
    pos = nn.utils.rnn.pad_sequence([_sincos_2d_independent(d, h, w) for h, w in sizes], batch_first=True)
    temporal = torch.stack([_temporal_independent(d, t) if t >= 0 else torch.zeros(d) for t in flat])
    k = x + pos + temporal[:, None, :]
    pad = torch.ones(len(sizes), lmax, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pad[i, : h * w] = False
    ks, vs, masks, start = [], [], [], 0
    for g in temporal_ids:
        ks.append(k[start:start + len(g)].reshape(-1, d))
        vs.append(x[start:start + len(g)].reshape(-1, d))
        masks.append(pad[start:start + len(g)].reshape(-1))
        start += len(g)
    kk = nn.utils.rnn.pad_sequence(ks)                                                       # [Lg, G, D]
    vv = nn.utils.rnn.pad_sequence(vs)
    mm = nn.utils.rnn.pad_sequence(masks, batch_first=True, padding_value=True)              # [G, Lg]
    q = r.ln_q(r.query)[:, None].repeat(1, len(temporal_ids), 1)
    out = _torch_mha(r)(q, kk, vv, key_padding_mask=mm)[0].permute(1, 0, 2)                 # [G, Q, D]
    return r.ln_post(out) @ r.proj


def test_temporal_resampler_matches_composition(resampler):
    kv = resampler.cfg.kv_dim
    temporal_ids = [[7], [3, 5, 8], [10, 11, 12, 13, 14, 15], [-1]]
    sizes = [(32, 32)] + [(16, 20)] * 3 + [(12, 12), (12, 12), (12, 14), (12, 12), (12, 12), (12, 12)] + [(28, 40)]
    feats = [torch.randn(h * w, kv) for h, w in sizes]
    with torch.no_grad():
        got = resampler.forward_temporal(feats, sizes, temporal_ids)
        want = _temporal_composition(resampler, feats, sizes, temporal_ids)
    assert got.shape == (4, resampler.cfg.query_num, resampler.cfg.embed_dim)
    for g, name in enumerate(["1 frame", "3 frames", "6 frames (mixed sizes)", "1 still image (-1)"]):
        report(f"temporal resampler, group of {name}, vs nn.MultiheadAttention", _rel(got[g], want[g]), 1e-5)


def test_temporal_group_of_one_still_image_equals_2d_path(resampler):
    feats = [torch.randn(28 * 40, resampler.cfg.kv_dim)]
    with torch.no_grad():
        a = resampler.forward_temporal(feats, [(28, 40)], [[-1]])
        b = resampler(feats, [(28, 40)])
    assert torch.equal(a, b)
    # a temporal id changes the result (the temporal term reaches the keys)
    with torch.no_grad():
        c = resampler.forward_temporal(feats, [(28, 40)], [[5]])
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# LLM

_MULTIMODAL_KEYS = ("vision_config", "slice_config", "query_num", "image_size", "patch_size", "slice_mode",
                    "use_image_id", "batch_vision_input", "vision_batch_size", "drop_vision_last_layer", "version",
                    "auto_map")


def _llm_only_folder(ckpt: Checkpoint, out: Path) -> Path:
    """A plain HF folder holding only the LLM: stripped `llm.` tensors + the config's LLM fields, with
    rope_theta/rope_scaling left in their config.json form for transformers to convert itself."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    cls = R.llm_hf_class(ckpt)
    cfg = {k: v for k, v in ckpt.config.raw.items() if k not in _MULTIMODAL_KEYS}
    cfg.update(model_type=cls.config_class.model_type, architectures=[cls.__name__], torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = {n: torch.from_numpy(a).contiguous() for n, a in ckpt.iter_tensors("llm", strip_prefix=True)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("version", RESAMPLER_VERSIONS)
def test_llm_logits_match_from_pretrained(tiny_checkpoint, tmp_path, version):
    ckpt = Checkpoint.open(tiny_checkpoint(version))
    ours = R.build_llm(ckpt)
    cls = R.llm_hf_class(ckpt)
    assert type(ours) is cls
    theirs = cls.from_pretrained(str(_llm_only_folder(ckpt, tmp_path / "llm")), dtype=torch.float32).eval()
    if ckpt.config.raw.get("rope_scaling"):
        assert theirs.config.rope_parameters["rope_type"] == ours.config.rope_parameters["rope_type"]
    assert torch.equal(ours.model.rotary_emb.inv_freq, theirs.model.rotary_emb.inv_freq)
    ids = torch.randint(0, ckpt.llm.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        b = theirs(input_ids=ids).logits
    err = (a - b).abs().max().item() / b.abs().max().item()
    report(f"{version} {cls.__name__} logits vs from_pretrained (relative to max|logit|)", err, 1e-4)


def test_tied_word_embeddings_load(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("2.6")
    dst = shutil.copytree(src, tmp_path / "tied")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    ckpt = Checkpoint.open(dst)        # the stored lm_head becomes an ignored extra
    model = R.build_llm(ckpt)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_rope_parameters_from_config_fields():
    assert R.rope_parameters({"rope_theta": 5e5}) == {"rope_type": "default", "rope_theta": 5e5}
    p = R.rope_parameters({"rope_theta": 1e4, "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                               "long_factor": [2.0]}})
    assert p["rope_type"] == "longrope" and p["rope_theta"] == 1e4 and "type" not in p
    assert R.rope_parameters({"rope_parameters": {"rope_type": "yarn", "rope_theta": 3.0, "factor": 4.0}}) == \
        {"rope_type": "yarn", "rope_theta": 3.0, "factor": 4.0}


# ---------------------------------------------------------------------------------------------
# Prompt grammar and end to end


def _image(seed: int, size=(448, 448)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (1 + seed)) % 256, (yy * 2) % 256, ((xx + yy) * (3 + seed)) % 256], axis=-1)
    noise = rng.integers(0, 64, size=(h, w, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


@pytest.mark.parametrize("version", RESAMPLER_VERSIONS)
def test_end_to_end_greedy(tiny_checkpoint, version):
    pytest.importorskip("minicpmv_edge.runtime.preprocess")
    ref = R.MiniCPMVReference.from_checkpoint(tiny_checkpoint(version))
    msgs = [{"role": "user", "content": [_image(0), "What is in this picture?"]}]
    prompt = ref.build_prompt(msgs)
    assert len(prompt.images) == 1
    spans = ref.image_spans(prompt.input_ids)
    assert len(spans) == len(prompt.images[0].slices) and all(e - s == ref.query_num for s, e in spans)
    if ref.ckpt.preprocess.use_image_id:
        assert "<image_id>0</image_id><image>" in prompt.text
    assert "(<image>./</image>)" not in prompt.text and "\nWhat is in this picture?" in prompt.text

    tokens = ref.generate_greedy(msgs, max_new_tokens=8)
    again = ref.generate_greedy(msgs, max_new_tokens=8)
    print(f"\n[e2e] {version}: prompt {len(prompt.input_ids)} tokens, generated {tokens}")
    assert tokens == again
    assert len(tokens) <= 8
    assert all(0 <= t < ref.ckpt.llm.vocab_size for t in tokens)

    # the image features reach the LLM: another image changes the logits at the last position
    other = ref.build_prompt([{"role": "user", "content": [_image(1), "What is in this picture?"]}])
    assert other.input_ids == prompt.input_ids
    a = ref.logits(prompt.input_ids, ref.prompt_features(prompt))[-1]
    b = ref.logits(other.input_ids, ref.prompt_features(other))[-1]
    delta = (a - b).abs().max().item()
    print(f"[e2e] {version}: max |logit change| for another image: {delta:.3g}")
    assert delta > 1e-3


def test_sliced_and_multi_image_prompt_splice(tiny_checkpoint):
    pytest.importorskip("minicpmv_edge.runtime.preprocess")
    ref = R.MiniCPMVReference.from_checkpoint(tiny_checkpoint("4.5"))
    wide, small = _image(2, size=(1000, 500)), _image(3, size=(200, 150))
    prompt = ref.build_prompt([{"role": "user", "content": [wide, small, "Compare."]}])
    big = prompt.images[0]
    assert big.grid is not None and prompt.images[1].grid is None
    cols, rows = big.grid
    n_slices = 1 + cols * rows
    assert len(big.slices) == n_slices
    spans = ref.image_spans(prompt.input_ids)
    assert len(spans) == n_slices + 1
    assert "<image_id>0</image_id><image>" in prompt.text and "<image_id>1</image_id><image>" in prompt.text
    feats = ref.prompt_features(prompt)
    assert [f.shape[0] for f in feats] == [n_slices, 1]
    emb = ref.embed(prompt.input_ids, feats)
    text_emb = ref.embed_tokens(prompt.input_ids)
    blocks = torch.cat(feats)                                      # [n_slices + 1, Q, D] in prompt order
    inside = torch.zeros(len(prompt.input_ids), dtype=torch.bool)
    for (s, e), block in zip(spans, blocks):
        assert torch.equal(emb[s:e], block)
        inside[s:e] = True
    assert torch.equal(emb[~inside], text_emb[~inside])
    with pytest.raises(ValueError):
        ref.embed(prompt.input_ids, feats[:1])
