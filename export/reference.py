"""Torch reference of MiniCPM-V 2.6 / 4.0 / 4.5: the oracle later tests (GGUF, ONNX, kernels, runtime) compare against.

    ref = MiniCPMVReference.from_checkpoint("MiniCPM-V-4_5")
    tokens = ref.generate_greedy([{"role": "user", "content": [image, "What is this?"]}], max_new_tokens=16)

Pieces (each written here from the math in docs/model.md §3-§6, float32 throughout):

* `VisionTower` - SigLIP NaViT ViT as in the HF MiniCPM-V code: conv patch embedding, bucketed position ids,
  pre-LN encoder layers, post LayerNorm. Batched slices are padded and masked like HF.
* `Resampler` - the 2D perceiver resampler (one cross-attention of `query_num` learned queries over a slice's
  patches) and the 4.5 temporal ("3D") path that compresses a group of video frames into one block.
  Attention is written by hand; `torch.nn.MultiheadAttention` is the tests' independent reference.
* `build_llm` - the version's transformers causal LM (`facts.llm_hf_class`) built from config.json and the
  checkpoint's `llm.*` tensors (strict: no missing or unexpected keys).
* `MiniCPMVReference` - prompt rendering with image placeholders, embedding splice, logits, greedy generation.

Everything is read through `Checkpoint`; nothing branches on a version string (only on facts fields).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv_edge.facts import IMAGE_TOKENS
from minicpmv_edge.runtime.preprocess import preprocess_image
from minicpmv_edge.runtime.prompt import IMAGE_TAG, image_placeholder, image_spans

from .checkpoint import Checkpoint, ResamplerConfig, VisionConfig



def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _load_role(module: nn.Module, ckpt: Checkpoint, role: str) -> None:
    """Copy a checkpoint role's tensors (prefix stripped) into `module`; any mismatch is an error."""
    state = {name: _t(arr) for name, arr in ckpt.iter_tensors(role, strip_prefix=True)}
    module.load_state_dict(state, strict=True)


# =============================================================================================
# Vision tower (SigLIP NaViT)
# =============================================================================================

def navit_position_ids(h: int, w: int, num_patches_per_side: int) -> torch.Tensor:
    """Position-table rows for an h x w patch grid, exactly as the HF MiniCPM-V code buckets them.

    The grid is mapped onto the side x side (70 x 70) learned table by bucketing fractional coordinates.
    HF takes the step `1 / nb_patches` from an int32 `tgt_sizes` tensor, so the step is a float32 value;
    that differs from `floor(70 * i / h)` by one bucket on some rows (e.g. h = 25: i = 5, 10, 15, 20), so we
    reproduce the HF arithmetic literally instead of the closed form. Returns int64 ids [h*w], row-major.
    """
    side = num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)                      # [side-1] float32
    nb_h = torch.tensor(h, dtype=torch.int32)
    nb_w = torch.tensor(w, dtype=torch.int32)
    frac_h = torch.arange(0, 1 - 1e-6, 1 / nb_h)                           # [h]  ~ i / h
    frac_w = torch.arange(0, 1 - 1e-6, 1 / nb_w)                           # [w]
    if frac_h.numel() != h or frac_w.numel() != w:                          # never seen for h, w <= 1000
        raise ValueError(f"position bucketing produced {frac_h.numel()}x{frac_w.numel()} for a {h}x{w} grid")
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)             # [h]
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)             # [w]
    return (bucket_h[:, None] * side + bucket_w).flatten()                  # [h*w]


def hf_strip_layout(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The HF processor's pixel layout for one slice: [3, H, W] -> [3, P, N*P] (`reshape_by_patch`).

    Patch n (row-major over the h x w grid) occupies columns n*P .. n*P+P-1 of a P-pixel-high strip, so a
    stride-P conv over the strip yields the patches in the same order as the conv over the natural image:
    `conv(strip).flatten(2) == conv(image).flatten(2)`. VisionTower works on the natural image; this
    function exists so tests (and the ONNX exporter) can check that equivalence.
    """
    c, _, _ = pixels.shape
    p = patch_size
    patches = F.unfold(pixels[None], (p, p), stride=(p, p))                 # [1, 3*P*P, N]
    n = patches.shape[-1]
    return patches.reshape(c, p, p, n).permute(0, 1, 3, 2).reshape(c, p, n * p)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_patches_per_side = cfg.num_patches_per_side
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=True)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side ** 2, cfg.hidden_size)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape                                                   # x: [B, L, C]
        split = lambda t: t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # -> [B, H, L, hd]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale            # [B, H, L, L]
        if mask_bias is not None:                                           # [B, 1, 1, L]: finfo.min on padded keys
            scores = scores + mask_bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, d)       # [B, L, C]
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            self.act = lambda t: F.gelu(t, approximate="tanh")
        elif act == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported vision hidden_act {act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then + mlp(LN2(.))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask_bias)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """SigLIP NaViT vision tower of MiniCPM-V (`vpm.*`): slices of any patch-grid size -> patch features.

    Patch embedding runs on the natural [3, H, W] image (see `hf_strip_layout` for why that equals HF's strip
    layout). Several slices run as one batch padded to the longest like HF: padded patches get the embedding
    of an all-zero patch (= the conv bias) plus position row 0, padded keys are masked with finfo.min, and
    padded output rows are returned but mean nothing (the resampler masks them).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "VisionTower":
        tower = cls(ckpt.vision)
        _load_role(tower, ckpt, "vision")
        return tower.eval()

    def position_ids(self, h: int, w: int) -> torch.Tensor:
        return navit_position_ids(h, w, self.cfg.num_patches_per_side)

    def forward(self, slices: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slices: [3, H_i, W_i] tensors (or one [B, 3, H, W] tensor), H_i, W_i multiples of the patch size.

        Returns (hidden [B, Lmax, C] after post-LN, valid [B, Lmax] bool), L_i = h_i * w_i patches row-major.
        """
        if isinstance(slices, torch.Tensor) and slices.dim() == 4:
            slices = list(slices)
        p = self.cfg.patch_size
        emb = self.embeddings
        sizes = []
        tokens = []
        for px in slices:                                                   # px: [3, H, W]
            _, hh, ww = px.shape
            if hh % p or ww % p:
                raise ValueError(f"slice {hh}x{ww} is not a multiple of the patch size {p}")
            h, w = hh // p, ww // p
            sizes.append((h, w))
            x = emb.patch_embedding(px[None].float())                       # [1, C, h, w]
            tokens.append(x.flatten(2).transpose(1, 2)[0])                  # [h*w, C]
        b = len(tokens)
        lmax = max(h * w for h, w in sizes)
        # padded patches: HF pads pixels with 0, whose conv output is the bias
        hidden = emb.patch_embedding.bias.expand(b, lmax, -1).clone()       # [B, Lmax, C]
        pos = torch.zeros(b, lmax, dtype=torch.long)                        # padded rows keep id 0 (as HF)
        valid = torch.zeros(b, lmax, dtype=torch.bool)
        for i, ((h, w), tok) in enumerate(zip(sizes, tokens)):
            hidden[i, : h * w] = tok
            pos[i, : h * w] = self.position_ids(h, w)
            valid[i, : h * w] = True
        hidden = hidden + emb.position_embedding(pos)                       # [B, Lmax, C]

        mask_bias = None
        if not bool(valid.all()):                                           # HF: no mask when nothing is padded
            mask_bias = torch.zeros(b, 1, 1, lmax, dtype=hidden.dtype)
            mask_bias.masked_fill_(~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
        for layer in self.encoder.layers:
            hidden = layer(hidden, mask_bias)
        return self.post_layernorm(hidden), valid

    def encode(self, slices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Like forward, but returns each slice's own [h_i*w_i, C] features (padding removed)."""
        hidden, valid = self.forward(slices)
        return [hidden[i, valid[i]] for i in range(hidden.shape[0])]


# =============================================================================================
# Resampler
# =============================================================================================

def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """concat(sin(pos*w), cos(pos*w)), w_k = 10000^(-k/(E/2)); float32 numpy exactly like the HF code."""
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega                                            # [E/2]
    out = np.einsum("...,d->...d", pos.astype(np.float32), omega)          # [..., E/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)             # [..., E]


def sincos_2d(embed_dim: int, h: int, w: int) -> torch.Tensor:
    """2D sincos position for an h x w grid: [h*w, D] row-major, x (width) half first then y half.

    Absolute integer patch coordinates, no interpolation (HF slices its 70x70 cache as pos[:h, :w], and every
    entry depends only on its own coordinates, so computing the h x w grid directly gives the same values).
    """
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))  # [h, w] each
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid_w),              # [h, w, D/2]  x coordinate
                          _sincos_1d(embed_dim // 2, grid_h)], axis=-1)    # [h, w, D/2]  y coordinate
    return _t(emb.reshape(h * w, embed_dim))


def temporal_sincos(embed_dim: int, ids: Sequence[int]) -> torch.Tensor:
    """Rows of the 4.5 temporal table (`sincos_1d(D, arange(T))`, ids in 0.1 s ticks): [len(ids), D]."""
    return _t(_sincos_1d(embed_dim, np.asarray(ids, dtype=np.float32)))


class ResamplerAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (packed q|k|v in_proj, out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"resampler width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [Q, D] (shared by the batch), key/value [B, L, D], key_padding_mask [B, L] True = ignore.

        Returns [B, Q, D]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        nq, d = query.shape
        b, n, _ = key.shape
        hd = self.head_dim
        q = F.linear(query, wq, bq).view(nq, self.heads, hd).transpose(0, 1)        # [H, Q, hd]
        k = F.linear(key, wk, bk).view(b, n, self.heads, hd).transpose(1, 2)        # [B, H, L, hd]
        v = F.linear(value, wv, bv).view(b, n, self.heads, hd).transpose(1, 2)      # [B, H, L, hd]
        scores = torch.matmul(q * hd ** -0.5, k.transpose(2, 3))                    # [B, H, Q, L]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, nq, d)              # [B, Q, D]
        return self.out_proj(out)


def _as_sizes(tgt_sizes: Any) -> list[tuple[int, int]]:
    if isinstance(tgt_sizes, torch.Tensor):
        tgt_sizes = tgt_sizes.tolist()
    return [(int(h), int(w)) for h, w in tgt_sizes]


class Resampler(nn.Module):
    """Perceiver resampler (`resampler.*`): one cross-attention of learned queries over a slice's patches.

        x = LN_kv(kv_proj(vit))       k = x + pos2d (+ temporal)       v = x
        y = LN_post(out_proj(MHA(LN_q(query), k, v))) @ proj          -> [query_num, D] per slice / frame group
    """

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.query = nn.Parameter(torch.zeros(cfg.query_num, d))
        self.kv_proj = nn.Linear(cfg.kv_dim, d, bias=False) if cfg.kv_dim != d else nn.Identity()
        self.attn = ResamplerAttention(d, cfg.num_heads)
        self.ln_q = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ln_post = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(torch.zeros(d, d))                         # used as x @ proj ([in, out])
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "Resampler":
        r = cls(ckpt.resampler)
        _load_role(r, ckpt, "resampler")
        return r.eval()

    def pos_2d(self, h: int, w: int) -> torch.Tensor:
        """[h*w, D] 2D sincos position for one slice grid (cached)."""
        if (h, w) not in self._pos_cache:
            self._pos_cache[(h, w)] = sincos_2d(self.cfg.embed_dim, h, w)
        return self._pos_cache[(h, w)]

    def _split(self, features: Sequence[torch.Tensor] | torch.Tensor,
               sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per-slice [h*w, kv_dim] features from a list or from a padded [B, L, kv_dim] batch."""
        if len(features) != len(sizes):
            raise ValueError(f"{len(features)} feature blocks but {len(sizes)} tgt_sizes")
        out = []
        for f, (h, w) in zip(features, sizes):
            if f.shape[0] < h * w:
                raise ValueError(f"slice of {h}x{w} patches has only {f.shape[0]} feature rows")
            out.append(f[: h * w])
        return out

    def keys_values(self, features: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slice's ViT features [h*w, kv_dim] -> (k = x + pos2d, v = x), each [h*w, D]."""
        x = self.ln_kv(self.kv_proj(features))                              # [N, D]
        return x + self.pos_2d(h, w), x

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [..., Q, D] -> LN_post -> @ proj."""
        return self.ln_post(out) @ self.proj

    def forward(self, features: Sequence[torch.Tensor] | torch.Tensor, tgt_sizes: Any) -> torch.Tensor:
        """2D path: per-slice ViT features (list of [h_i*w_i, kv_dim], or padded [B, L, kv_dim]) -> [B, Q, D].

        Slices are batched with zero padding and a key padding mask (like HF)."""
        sizes = _as_sizes(tgt_sizes)
        feats = self._split(features, sizes)
        kv = [self.keys_values(f, h, w) for f, (h, w) in zip(feats, sizes)]
        lmax = max(k.shape[0] for k, _ in kv)
        b, d = len(kv), self.cfg.embed_dim
        keys = torch.zeros(b, lmax, d)                                      # [B, Lmax, D]
        values = torch.zeros(b, lmax, d)
        pad = torch.ones(b, lmax, dtype=torch.bool)                         # True = padded key
        for i, (k, v) in enumerate(kv):
            keys[i, : k.shape[0]], values[i, : v.shape[0]], pad[i, : k.shape[0]] = k, v, False
        q = self.ln_q(self.query)                                           # [Q, D]
        out = self.attn(q, keys, values, pad if bool(pad.any()) else None)  # [B, Q, D]
        return self.finish(out)

    def forward_temporal(self, features_per_slice: Sequence[torch.Tensor], tgt_sizes: Any,
                         temporal_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """4.5 temporal path: frame groups -> one [Q, D] block per group; returns [G, Q, D].

        temporal_ids: one list per group, one id per frame (slice) in order, e.g. [[-1], [3, 5, 8]];
        id -1 = a still image (no temporal term). Each frame's keys get its temporal sincos row (same D-vector
        for all its patches); a group's queries attend over the concatenation of its frames' keys/values.

        This is the math of HF `forward_padding` / `forward_group`. HF's default `forward` flattens a group's
        keys patch-major (`k[:, s:e].reshape(-1, D)` on L x B x D) but its padding mask frame-major, so it
        agrees only when no frame of the batch is padded (all slices the same size, the usual video case).
        """
        sizes = _as_sizes(tgt_sizes)
        flat = list(chain.from_iterable(temporal_ids))
        if len(flat) != len(sizes):
            raise ValueError(f"temporal_ids name {len(flat)} frames but {len(sizes)} slices were given")
        feats = self._split(features_per_slice, sizes)
        q = self.ln_q(self.query)                                           # [Q, D]
        blocks = []
        start = 0
        for group in temporal_ids:
            keys, values = [], []
            for i in range(start, start + len(group)):
                h, w = sizes[i]
                k, v = self.keys_values(feats[i], h, w)                     # [h*w, D] each
                if flat[i] >= 0:
                    k = k + temporal_sincos(self.cfg.embed_dim, [flat[i]])  # [1, D] broadcast over patches
                keys.append(k)
                values.append(v)
            start += len(group)
            k_g, v_g = torch.cat(keys)[None], torch.cat(values)[None]       # [1, sum N, D]
            blocks.append(self.attn(q, k_g, v_g)[0])                        # [Q, D]
        return self.finish(torch.stack(blocks))                             # [G, Q, D]


# =============================================================================================
# LLM
# =============================================================================================

# config.json keys that describe the multimodal wrapper or the file, not the LLM
_NOT_LLM_KEYS = {"_name_or_path", "architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
                 "id2label", "label2id", "auto_map", "rope_parameters", "rope_scaling", "rope_theta",
                 "attn_implementation", "_attn_implementation"}


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers-5 `rope_parameters` from a config.json's `rope_theta` + `rope_scaling` (or a v5 config's
    `rope_parameters`): {"rope_type": ..., "rope_theta": ..., <scaling fields>}."""
    given = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling = raw.get("rope_scaling") if isinstance(raw.get("rope_scaling"), dict) else {}
    params = {**given, **scaling}
    rope_type = params.pop("type", None)
    params["rope_type"] = params.get("rope_type") or rope_type or "default"
    theta = raw.get("rope_theta", given.get("rope_theta", 10000.0))
    params["rope_theta"] = float(theta)
    return params


def llm_hf_class(ckpt: Checkpoint) -> type:
    import transformers
    return getattr(transformers, ckpt.facts.llm_hf_class)


def llm_config(ckpt: Checkpoint, attn_implementation: str = "eager"):
    """The transformers config of the checkpoint's LLM: config.json's top-level LLM fields, float32."""
    cls = llm_hf_class(ckpt)
    cfg_cls = cls.config_class
    raw = ckpt.config.raw
    known = set(cfg_cls().to_dict())
    kwargs = {k: v for k, v in raw.items() if k in known and k not in _NOT_LLM_KEYS}
    head_dim = ckpt.llm.head_dim
    if "head_dim" in known:
        kwargs["head_dim"] = head_dim
    elif head_dim != ckpt.llm.hidden_size // ckpt.llm.num_attention_heads:
        raise ValueError(f"{cls.__name__} derives head_dim = hidden/heads, but config.json says {head_dim}")
    kwargs["num_key_value_heads"] = ckpt.llm.num_key_value_heads
    kwargs["tie_word_embeddings"] = ckpt.llm.tie_word_embeddings
    kwargs["rope_parameters"] = rope_parameters(raw)
    cfg = cfg_cls(**kwargs, attn_implementation=attn_implementation)
    cfg.architectures = [cls.__name__]
    cfg.dtype = torch.float32
    return cfg


def llm_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """`llm.*` tensors with the prefix stripped (float32); lm_head comes from embed_tokens when tied."""
    state = {name: _t(arr) for name, arr in ckpt.iter_tensors("llm", strip_prefix=True)}
    if ckpt.llm.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def build_llm(ckpt: Checkpoint, attn_implementation: str = "eager") -> nn.Module:
    """`transformers.<facts.llm_hf_class>` with the checkpoint's weights, float32, eval mode, strict load."""
    from transformers.initialization import no_init_weights

    cls = llm_hf_class(ckpt)
    cfg = llm_config(ckpt, attn_implementation)
    with no_init_weights():
        model = cls(cfg)
    model = model.float()
    model.load_state_dict(llm_state_dict(ckpt), strict=True)       # raises on missing/unexpected keys
    if ckpt.llm.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


# =============================================================================================
# Prompt grammar
# =============================================================================================

@dataclass
class Prompt:
    """A rendered prompt: the text fed to the tokenizer, its ids, and the images in prompt order."""
    text: str
    input_ids: list[int]
    images: list[Any]          # runtime.preprocess PreprocessedImage, one per image tag, in order


# =============================================================================================
# Whole model
# =============================================================================================

class MiniCPMVReference:
    """Vision tower + resampler + LLM + tokenizer of one checkpoint, float32 on CPU."""

    def __init__(self, ckpt: Checkpoint, vit: VisionTower, resampler: Resampler, llm: nn.Module, tokenizer):
        self.ckpt = ckpt
        self.facts = ckpt.facts
        self.vit = vit
        self.resampler = resampler
        self.llm = llm
        self.tokenizer = tokenizer
        self.query_num = ckpt.resampler.query_num
        tok = lambda t: tokenizer.convert_tokens_to_ids(t)
        self.token_ids = {role: tok(t) for role, t in IMAGE_TOKENS.items()}
        self.stop_ids = sorted({tok(t) for t in self.facts.stop_tokens if tok(t) is not None})

    @classmethod
    def from_checkpoint(cls, path: str | Path | Checkpoint) -> "MiniCPMVReference":
        from transformers import AutoTokenizer

        ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
        llm = build_llm(ckpt)
        # Passing the LLM config keeps AutoTokenizer from reading config.json, whose auto_map points at the
        # hub's remote code (MiniCPMVConfig) that is not here; the class comes from tokenizer_config.json.
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.root), config=llm.config)
        return cls(ckpt, VisionTower.from_checkpoint(ckpt), Resampler.from_checkpoint(ckpt), llm, tokenizer)

    # --- vision
    def preprocess(self, image, max_slice_nums: int | None = None):
        """runtime.preprocess with this checkpoint's preprocessing settings."""

        pp = self.ckpt.preprocess
        return preprocess_image(image, max_slice_nums=pp.max_slice_nums if max_slice_nums is None else max_slice_nums,
                                slice_size=pp.slice_size, patch_size=pp.patch_size,
                                mean=pp.norm_mean, std=pp.norm_std, slicing=self.facts.slicing)

    @torch.no_grad()
    def encode_slices(self, slices: Sequence[Any]) -> torch.Tensor:
        """Preprocessed slices (`.pixels` [3, H, W], `.tgt_size` (h, w)) -> resampler output [n, Q, D]."""
        pixels = [torch.as_tensor(np.asarray(s.pixels, dtype=np.float32)) for s in slices]
        hidden, _ = self.vit(pixels)                                        # [n, Lmax, C]
        return self.resampler(hidden, [tuple(s.tgt_size) for s in slices])      # [n, Q, D]

    def encode_image(self, image, max_slice_nums: int | None = None):
        """A PIL image -> (features [n_slices, Q, D] (source first, then slices row-major), grid or None)."""
        pre = self.preprocess(image, max_slice_nums)
        return self.encode_slices(pre.slices), pre.grid

    @torch.no_grad()
    def encode_frames(self, frames: Sequence[Any], temporal_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """4.5 video hook: frames (PIL, one slice each, max_slice_nums=1) grouped by temporal_ids -> [G, Q, D].

        The prompt for G groups is G placeholders without image ids and without slices
        (`image_placeholder(None, i, use_image_id=False, ...)`), joined by "\\n" (docs/model.md §4.4)."""
        if self.facts.video != "temporal_resampler":
            raise ValueError(f"MiniCPM-V {self.facts.version} has no temporal resampler (video={self.facts.video})")
        if len(frames) != sum(len(g) for g in temporal_ids):
            raise ValueError(f"{len(frames)} frames but temporal_ids name {sum(len(g) for g in temporal_ids)}")
        slices = [self.preprocess(f, max_slice_nums=1).slices[0] for f in frames]
        feats = self.vit.encode([torch.as_tensor(np.asarray(s.pixels, dtype=np.float32)) for s in slices])
        return self.resampler.forward_temporal(feats, [tuple(s.tgt_size) for s in slices], temporal_ids)

    # --- prompt
    def placeholder(self, grid, index: int, use_image_id: bool | None = None) -> str:
        uid = self.ckpt.preprocess.use_image_id if use_image_id is None else use_image_id
        return image_placeholder(grid, index, use_image_id=uid, query_num=self.query_num,
                                 tokens=self.facts.special_tokens)

    def render(self, messages: Sequence[dict], images: Sequence[Any] | None = None,
               enable_thinking: bool | None = None, system_prompt: str | None = None) -> tuple[str, list[Any]]:
        """Chat-template text with one IMAGE_TAG per image (as `model.chat` builds it) and the images in order.

        messages: [{"role", "content"}], content a string or a list of strings and PIL images. `images`, if
        given, are put before the first message's text (like `model.chat(image=...)`). Each message's items
        are joined with "\\n". enable_thinking=None means what `model.chat` does by default: False for
        templates with a thinking switch, not passed otherwise.
        """
        msgs = []
        pil: list[Any] = []
        for i, msg in enumerate(messages):
            content = msg["content"]
            items = [content] if isinstance(content, str) else list(content)
            if i == 0 and images:
                items = [*images, *items]
            parts = []
            for item in items:
                if isinstance(item, str):
                    parts.append(item)
                else:
                    pil.append(item)
                    parts.append(IMAGE_TAG)
            msgs.append({"role": msg["role"], "content": "\n".join(parts)})
        if system_prompt:
            msgs = [{"role": "system", "content": system_prompt}, *msgs]
        extra = {}
        if self.facts.thinking:
            extra["enable_thinking"] = bool(enable_thinking)
        elif enable_thinking:
            raise ValueError(f"MiniCPM-V {self.facts.version}'s chat template has no thinking switch")
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.ckpt.chat_template, **extra)
        return text, pil

    def build_prompt(self, messages: Sequence[dict], images: Sequence[Any] | None = None,
                     enable_thinking: bool | None = None, *, max_slice_nums: int | None = None,
                     use_image_id: bool | None = None, system_prompt: str | None = None) -> Prompt:
        """Render the chat template, replace each IMAGE_TAG by its placeholder, tokenize (HF processor order)."""
        text, pil = self.render(messages, images, enable_thinking, system_prompt)
        chunks = text.split(IMAGE_TAG)
        if len(chunks) - 1 != len(pil):
            raise ValueError(f"the rendered prompt has {len(chunks) - 1} image tags for {len(pil)} images")
        pre = [self.preprocess(im, max_slice_nums) for im in pil]
        out = chunks[0]
        for i, (p, chunk) in enumerate(zip(pre, chunks[1:])):
            out += self.placeholder(p.grid, i, use_image_id) + chunk
        ids = self.tokenizer(out)["input_ids"]                              # = tokenizer.encode(text) in HF
        return Prompt(out, list(ids), pre)

    def image_spans(self, input_ids: Sequence[int]) -> list[tuple[int, int]]:
        """[start, end) of the filler tokens inside every <image>..</image> / <slice>..</slice>, in order."""
        t = self.token_ids
        return image_spans(input_ids, {t["image_start"], t["slice_start"]}, {t["image_end"], t["slice_end"]})

    # --- language model
    def embed_tokens(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, D] (x scale_emb when the LLM config carries one, as the HF code does)."""
        ids = torch.as_tensor(list(input_ids) if not isinstance(input_ids, torch.Tensor) else input_ids,
                              dtype=torch.long)
        emb = self.llm.get_input_embeddings()(ids)
        if self.ckpt.llm.scale_emb is not None:
            emb = emb * self.ckpt.llm.scale_emb
        return emb

    def embed(self, input_ids: Sequence[int], image_features: torch.Tensor | Sequence[torch.Tensor] | None
              ) -> torch.Tensor:
        """Input embeddings [T, D] with every image/slice filler span replaced, in order, by resampler rows.

        image_features: [n, Q, D] or a list of such blocks (one per image); n in total must equal the number
        of <image>/<slice> spans in input_ids."""
        emb = self.embed_tokens(input_ids).clone()
        spans = self.image_spans(input_ids)
        if image_features is None:
            blocks: list[torch.Tensor] = []
        elif isinstance(image_features, torch.Tensor):
            blocks = list(image_features.reshape(-1, self.query_num, emb.shape[-1]))
        else:
            blocks = [b for f in image_features for b in f.reshape(-1, self.query_num, emb.shape[-1])]
        if len(blocks) != len(spans):
            raise ValueError(f"{len(spans)} image/slice spans in the prompt but {len(blocks)} feature blocks")
        for (s, e), block in zip(spans, blocks):
            if e - s != block.shape[0]:
                raise ValueError(f"span [{s}, {e}) holds {e - s} filler tokens, expected {block.shape[0]}")
            emb[s:e] = block.to(emb.dtype)
        return emb

    @torch.no_grad()
    def logits(self, input_ids: Sequence[int], image_features=None) -> torch.Tensor:
        """Next-token logits for every position: [T, V] float32."""
        emb = self.embed(input_ids, image_features)
        return self.llm(inputs_embeds=emb[None], use_cache=False).logits[0].float()

    @torch.no_grad()
    def prompt_features(self, prompt: Prompt) -> list[torch.Tensor]:
        return [self.encode_slices(p.slices) for p in prompt.images]

    @torch.no_grad()
    def generate_greedy(self, messages: Sequence[dict], images: Sequence[Any] | None = None,
                        max_new_tokens: int = 32, enable_thinking: bool | None = None, *,
                        max_slice_nums: int | None = None, prompt: Prompt | None = None) -> list[int]:
        """Greedy decoding with a KV cache. Stops after a stop token (facts.stop_tokens), which is not returned."""
        if prompt is None:
            prompt = self.build_prompt(messages, images, enable_thinking, max_slice_nums=max_slice_nums)
        return self.greedy_from_ids(prompt.input_ids, self.prompt_features(prompt), max_new_tokens)

    @torch.no_grad()
    def greedy_from_ids(self, input_ids: Sequence[int], image_features, max_new_tokens: int) -> list[int]:
        out = self.llm(inputs_embeds=self.embed(input_ids, image_features)[None], use_cache=True)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(out.logits[0, -1].argmax())
            if next_id in self.stop_ids:
                break
            generated.append(next_id)
            out = self.llm(inputs_embeds=self.embed_tokens([next_id])[None], past_key_values=out.past_key_values,
                           use_cache=True)
        return generated


__all__ = ["VisionTower", "Resampler", "ResamplerAttention", "MiniCPMVReference", "Prompt", "IMAGE_TAG",
           "navit_position_ids", "hf_strip_layout", "sincos_2d", "temporal_sincos",
           "rope_parameters", "llm_config", "llm_state_dict", "build_llm"]
