"""Read a Hugging Face MiniCPM-V checkpoint directory into a typed, validated description.

    ckpt = Checkpoint.open("MiniCPM-V-4_5")
    ckpt.facts.llm_gguf_arch, ckpt.llm.hidden_size, ckpt.tensor("resampler.query")

Reads config.json, preprocessor_config.json, tokenizer files and safetensors headers; tensor data
is memory-mapped only when asked for. Every problem is a CheckpointError naming the file and field.
The expected tensor list (`expected_tensors`) is the single description of the checkpoint layout:
the synthesizer writes exactly it and the reader checks against it.
"""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from minicpmv_edge.errors import CheckpointError
from minicpmv_edge.facts import ModelFacts, UnknownVersionError, facts_for_config
from minicpmv_edge.untrusted import inside, read_json

from .checkpoint_checks import (check_config, check_preprocessor, check_tokenizer_config, check_weight_map,
                                read_chat_template, read_tokenizer_json)
from .safetensors_io import SafetensorsFormatError, TensorInfo, load_tensor, read_header

if TYPE_CHECKING:
    from .checkpoint_native import LinearAttentionConfig

CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"

# Tensor-name prefixes by role come from the facts table (`facts.tensor_prefixes`); anything else (e.g.
# MiniCPM-o's apm./tts., 4.6's mtp.* head) is reported as ignored.


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    scale_emb: float | None = None        # MiniCPM muP: text embeddings are multiplied by this
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rotary_dim: int | None = None         # rotated share of head_dim when RoPE is partial (4.6); None = all
    linear_attention: "LinearAttentionConfig | None" = None   # gated-delta-net hybrid layers (4.6)


@dataclass(frozen=True)
class ResamplerConfig:
    embed_dim: int          # = LLM hidden size
    num_heads: int          # = embed_dim // resampler_head_dim
    kv_dim: int             # = vision hidden size
    query_num: int
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class PreprocessConfig:
    slice_size: int          # "scale_resolution": every slice is resized to about this squared area
    patch_size: int
    max_slice_nums: int
    slice_mode: bool
    use_image_id: bool
    image_feature_size: int
    norm_mean: tuple[float, float, float]
    norm_std: tuple[float, float, float]


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything config.json (+ preprocessor_config.json) says, typed and cross-checked."""
    version: str
    facts: ModelFacts
    vision: VisionConfig
    llm: LLMConfig
    resampler: ResamplerConfig | None     # None: no resampler (4.6 merges patches inside/after the ViT)
    preprocess: PreprocessConfig
    raw: dict[str, Any] = field(repr=False, compare=False)


def _get(cfg: dict, key: str, path: Path, where: str = "", *, default: Any = ..., kind: tuple = (int,)):
    name = f"{where}{key}"
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError(path, "missing required field", name)
        return default
    value = cfg[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and bool not in kind):
        raise CheckpointError(path, f"expected {'/'.join(k.__name__ for k in kind)}, got {value!r}", name)
    return value


def _positive(value: int, path: Path, name: str) -> int:
    if value <= 0:
        raise CheckpointError(path, f"must be positive, got {value}", name)
    return value


def parse_config(raw: dict[str, Any], path: Path = Path(CONFIG),
                 preprocessor: dict[str, Any] | None = None,
                 preprocessor_path: Path = Path(PREPROCESSOR_CONFIG)) -> CheckpointConfig:
    """Validate a MiniCPM-V config.json dict (and optional preprocessor_config.json dict)."""
    if not isinstance(raw, dict):
        raise CheckpointError(path, "top level must be a JSON object")
    try:
        facts = facts_for_config(raw)
    except UnknownVersionError as exc:
        if "version" not in raw and raw.get("model_type") in (None, "minicpmv"):
            raise CheckpointError(path, "missing field (MiniCPM-V configs carry their version, e.g. 4.5; 4.6 "
                                  "configs say model_type minicpmv4_6)", "version") from None
        raise CheckpointError(path, str(exc), "version" if "version" in raw else "model_type") from None
    # bounds first (export/checkpoint_checks.py): nothing below sizes anything from an unchecked number
    check_config(raw, facts, path)
    check_preprocessor(preprocessor, facts, preprocessor_path)
    if facts.hf_model_type != "minicpmv":   # transformers-native layout (4.6): nested text/vision configs
        from .checkpoint_native import parse_native_config
        return parse_native_config(raw, path, facts, preprocessor, preprocessor_path)
    num = (int, float)

    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        raise CheckpointError(path, "missing or not an object", "vision_config")
    vpath = "vision_config."
    vision = VisionConfig(
        hidden_size=_positive(_get(vc, "hidden_size", path, vpath), path, vpath + "hidden_size"),
        num_hidden_layers=_positive(_get(vc, "num_hidden_layers", path, vpath), path, vpath + "num_hidden_layers"),
        num_attention_heads=_positive(_get(vc, "num_attention_heads", path, vpath), path,
                                      vpath + "num_attention_heads"),
        intermediate_size=_positive(_get(vc, "intermediate_size", path, vpath), path, vpath + "intermediate_size"),
        patch_size=_positive(_get(vc, "patch_size", path, vpath, default=14), path, vpath + "patch_size"),
        image_size=_positive(_get(vc, "image_size", path, vpath, default=980), path, vpath + "image_size"),
        layer_norm_eps=float(_get(vc, "layer_norm_eps", path, vpath, default=1e-6, kind=num)),
        hidden_act=_get(vc, "hidden_act", path, vpath, default="gelu_pytorch_tanh", kind=(str,)),
    )
    if vision.hidden_size % vision.num_attention_heads:
        raise CheckpointError(path, f"hidden_size {vision.hidden_size} is not divisible by "
                              f"num_attention_heads {vision.num_attention_heads}", vpath + "num_attention_heads")
    if raw.get("drop_vision_last_layer"):
        raise CheckpointError(path, "true (MiniCPM-V 2.0 style) is not supported: 2.6/4.x use all ViT layers",
                              "drop_vision_last_layer")

    hidden = _positive(_get(raw, "hidden_size", path), path, "hidden_size")
    n_heads = _positive(_get(raw, "num_attention_heads", path), path, "num_attention_heads")
    n_kv = _positive(_get(raw, "num_key_value_heads", path, default=n_heads), path, "num_key_value_heads")
    if n_heads % n_kv:
        raise CheckpointError(path, f"num_attention_heads {n_heads} is not a multiple of {n_kv}",
                              "num_key_value_heads")
    head_dim = _get(raw, "head_dim", path, default=hidden // n_heads)
    rope_params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    rope_theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    if not isinstance(rope_theta, num):
        raise CheckpointError(path, f"expected a number, got {rope_theta!r}", "rope_theta")
    scale_emb = raw.get("scale_emb")
    if facts.llm_muP_scaling and scale_emb is None:
        raise CheckpointError(path, f"MiniCPM-V {facts.version} LLMs carry muP scaling", "scale_emb")
    llm = LLMConfig(
        hidden_size=hidden,
        num_hidden_layers=_positive(_get(raw, "num_hidden_layers", path), path, "num_hidden_layers"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=_positive(head_dim, path, "head_dim"),
        intermediate_size=_positive(_get(raw, "intermediate_size", path), path, "intermediate_size"),
        vocab_size=_positive(_get(raw, "vocab_size", path), path, "vocab_size"),
        max_position_embeddings=_positive(_get(raw, "max_position_embeddings", path, default=32768), path,
                                          "max_position_embeddings"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(_get(raw, "rms_norm_eps", path, default=1e-6, kind=num)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=facts.llm_qkv_bias,
        qk_norm=facts.llm_qk_norm,
        scale_emb=float(scale_emb) if scale_emb is not None else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )

    query_num = _positive(_get(raw, "query_num", path, default=facts.query_num), path, "query_num")
    if hidden % facts.resampler_head_dim:
        raise CheckpointError(path, f"{hidden} is not a multiple of the resampler head size "
                              f"{facts.resampler_head_dim}", "hidden_size")
    resampler = ResamplerConfig(embed_dim=hidden, num_heads=hidden // facts.resampler_head_dim,
                                kv_dim=vision.hidden_size, query_num=query_num)

    slice_cfg = raw.get("slice_config") if isinstance(raw.get("slice_config"), dict) else {}
    pp = preprocessor or {}
    pre = PreprocessConfig(
        slice_size=int(pp.get("scale_resolution", raw.get("image_size", 448))),
        patch_size=int(pp.get("patch_size", raw.get("patch_size", vision.patch_size))),
        max_slice_nums=int(pp.get("max_slice_nums", slice_cfg.get("max_slice_nums", facts.max_slice_nums))),
        slice_mode=bool(pp.get("slice_mode", raw.get("slice_mode", True))),
        use_image_id=bool(pp.get("use_image_id", raw.get("use_image_id", facts.use_image_id))),
        image_feature_size=int(pp.get("image_feature_size", query_num)),
        norm_mean=tuple(float(x) for x in pp.get("norm_mean", (0.5, 0.5, 0.5))),
        norm_std=tuple(float(x) for x in pp.get("norm_std", (0.5, 0.5, 0.5))),
    )
    # The reference model asserts these agree (model.chat in the HF code); a mismatch means a mixed-up folder.
    checks = [("patch_size", pre.patch_size, vision.patch_size), ("image_feature_size", pre.image_feature_size,
              query_num), ("use_image_id", pre.use_image_id, bool(raw.get("use_image_id", pre.use_image_id)))]
    for name, got, want in checks:
        if got != want:
            raise CheckpointError(preprocessor_path, f"{got!r} disagrees with config.json ({want!r})", name)
    if pre.slice_size % pre.patch_size:
        raise CheckpointError(preprocessor_path, f"{pre.slice_size} is not a multiple of patch size "
                              f"{pre.patch_size}", "scale_resolution")
    return CheckpointConfig(facts.version, facts, vision, llm, resampler, pre, raw)


def expected_tensors(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a MiniCPM-V checkpoint of this config holds, with its shape (HF layout)."""
    if cfg.facts.hf_model_type != "minicpmv":
        from .checkpoint_native import native_expected_tensors
        return native_expected_tensors(cfg)
    v, llm, r = cfg.vision, cfg.llm, cfg.resampler
    out: dict[str, tuple[int, ...]] = {
        "vpm.embeddings.patch_embedding.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
        "vpm.embeddings.patch_embedding.bias": (v.hidden_size,),
        "vpm.embeddings.position_embedding.weight": (v.num_patches_per_side ** 2, v.hidden_size),
    }
    for i in range(v.num_hidden_layers):
        p = f"vpm.encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + ln + ".weight"] = out[p + ln + ".bias"] = (v.hidden_size,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}self_attn.{proj}.weight"] = (v.hidden_size, v.hidden_size)
            out[f"{p}self_attn.{proj}.bias"] = (v.hidden_size,)
        out[p + "mlp.fc1.weight"] = (v.intermediate_size, v.hidden_size)
        out[p + "mlp.fc1.bias"] = (v.intermediate_size,)
        out[p + "mlp.fc2.weight"] = (v.hidden_size, v.intermediate_size)
        out[p + "mlp.fc2.bias"] = (v.hidden_size,)
    out["vpm.post_layernorm.weight"] = out["vpm.post_layernorm.bias"] = (v.hidden_size,)

    d = r.embed_dim
    out["resampler.query"] = (r.query_num, d)
    if r.kv_dim != d:  # the HF code uses an identity when the widths agree
        out["resampler.kv_proj.weight"] = (d, r.kv_dim)
    out["resampler.attn.in_proj_weight"] = (3 * d, d)
    out["resampler.attn.in_proj_bias"] = (3 * d,)
    out["resampler.attn.out_proj.weight"] = (d, d)
    out["resampler.attn.out_proj.bias"] = (d,)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        out[f"resampler.{ln}.weight"] = out[f"resampler.{ln}.bias"] = (d,)
    out["resampler.proj"] = (d, d)

    h, hd = llm.hidden_size, llm.head_dim
    out["llm.model.embed_tokens.weight"] = (llm.vocab_size, h)
    for i in range(llm.num_hidden_layers):
        p = f"llm.model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (llm.num_attention_heads * hd, h)
        out[p + "self_attn.k_proj.weight"] = (llm.num_key_value_heads * hd, h)
        out[p + "self_attn.v_proj.weight"] = (llm.num_key_value_heads * hd, h)
        out[p + "self_attn.o_proj.weight"] = (h, llm.num_attention_heads * hd)
        if llm.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (llm.num_attention_heads * hd,)
            out[p + "self_attn.k_proj.bias"] = (llm.num_key_value_heads * hd,)
            out[p + "self_attn.v_proj.bias"] = (llm.num_key_value_heads * hd,)
        if llm.qk_norm:
            out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (llm.intermediate_size, h)
        out[p + "mlp.down_proj.weight"] = (h, llm.intermediate_size)
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (h,)
    out["llm.model.norm.weight"] = (h,)
    if not llm.tie_word_embeddings:
        out["llm.lm_head.weight"] = (llm.vocab_size, h)
    return out


def _read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    """A JSON object from the checkpoint folder: a regular file inside it, bounded size, depth and integers."""
    if not path.exists() and not path.is_symlink():
        if required:
            raise CheckpointError(path, "file not found")
        return None
    return read_json(inside(path.parent, path.name, error=CheckpointError), error=CheckpointError)


def _headers(path: Path) -> dict[str, TensorInfo]:
    try:
        return read_header(path)
    except SafetensorsFormatError as exc:
        raise CheckpointError(exc.path, exc.message, exc.field) from None


def _index_tensors(root: Path) -> dict[str, TensorInfo]:
    """Tensor headers from model.safetensors, or from the shards an index names (all checked)."""
    index_path = root / SAFETENSORS_INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = check_weight_map(index, root, index_path)
        shards = sorted(set(weight_map.values()))
        for s in shards:
            inside(root, s, error=CheckpointError, source=index_path, field="weight_map")
        missing = [s for s in shards if not (root / s).exists()]
        if missing:
            raise CheckpointError(index_path, f"names shard file(s) that are not in the folder: {', '.join(missing)}",
                                  "weight_map")
        infos: dict[str, TensorInfo] = {}
        for shard in shards:
            for name, info in _headers(root / shard).items():
                if name in infos:
                    raise CheckpointError(root / shard, f"tensor {name} also stored in {infos[name].file.name}")
                infos[name] = info
        listed_elsewhere = [n for n, s in weight_map.items() if n in infos and infos[n].file.name != s]
        absent = [n for n in weight_map if n not in infos]
        if absent or listed_elsewhere:
            bad = (absent or listed_elsewhere)[:5]
            raise CheckpointError(index_path, f"lists tensors its shards do not hold where it says: {bad}",
                                  "weight_map")
        return infos
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(root, f"no {SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX} (weights must be safetensors)")
    if len(files) > 1:
        raise CheckpointError(root, f"{len(files)} .safetensors files but no {SAFETENSORS_INDEX} to say which is which")
    return _headers(inside(root, files[0].name, error=CheckpointError))


@dataclass
class Checkpoint:
    """A validated MiniCPM-V checkpoint directory. Tensor data stays on disk until `tensor()`."""
    root: Path
    config: CheckpointConfig
    tensors: dict[str, TensorInfo]
    ignored_tensors: list[str]
    tokenizer_config: dict[str, Any]
    chat_template: str | None

    # --- construction
    @classmethod
    def open(cls, root: str | Path) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(root, "not a directory (expected a Hugging Face MiniCPM-V checkpoint folder)")
        raw = _read_json(root / CONFIG)
        pre = _read_json(root / PREPROCESSOR_CONFIG, required=False)
        cfg = parse_config(raw, root / CONFIG, pre, root / PREPROCESSOR_CONFIG)
        if not (root / TOKENIZER_JSON).is_file() and not (root / "vocab.json").is_file():
            raise CheckpointError(root / TOKENIZER_JSON, "file not found (nor vocab.json + merges.txt)")
        tok_cfg = _read_json(root / TOKENIZER_CONFIG)
        check_tokenizer_config(tok_cfg, root / TOKENIZER_CONFIG)
        template = tok_cfg.get("chat_template")
        if (root / CHAT_TEMPLATE_JINJA).exists():
            template = read_chat_template(inside(root, CHAT_TEMPLATE_JINJA, error=CheckpointError))
        if isinstance(template, list):  # list-of-named-templates form
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        infos = _index_tensors(root)
        ckpt = cls(root, cfg, infos, [], tok_cfg, template)
        ckpt._validate_tensors()
        ckpt.tokenizer_json  # read and checked now, so a broken tokenizer fails `inspect`, not an export later
        return ckpt

    def _validate_tensors(self) -> None:
        expected = expected_tensors(self.config)
        where = self.root / (SAFETENSORS_INDEX if (self.root / SAFETENSORS_INDEX).is_file() else SINGLE_SAFETENSORS)
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(where, f"missing tensor(s) {', '.join(missing[:5])}{more}")
        for name, shape in expected.items():
            info = self.tensors[name]
            if info.shape != shape:
                hint = ""
                if name.startswith("resampler.") and info.shape and info.shape[-1] != shape[-1]:
                    hint = " (resampler width must equal the LLM hidden_size in config.json)"
                raise CheckpointError(info.file, f"shape {list(info.shape)}, config.json implies {list(shape)}{hint}",
                                      name)
            if info.dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(info.file, f"dtype {info.dtype} is not a float type", name)
        extra = [n for n in self.tensors if n not in expected]
        unknown_role = [n for n in extra if n.startswith(self._all_prefixes)]
        # The HF code ties lm_head when tie_word_embeddings; a stored copy is harmless, anything else is not.
        unknown_role = [n for n in unknown_role if self.causal_lm_name(n) != "lm_head.weight"]
        if unknown_role:
            raise CheckpointError(where, f"unexpected tensor(s) {', '.join(unknown_role[:5])} for this config "
                                  f"(layer count or version mismatch?)")
        self.ignored_tensors = sorted(extra)

    # --- convenient views
    @property
    def version(self) -> str:
        return self.config.version

    @property
    def facts(self) -> ModelFacts:
        return self.config.facts

    @property
    def vision(self) -> VisionConfig:
        return self.config.vision

    @property
    def llm(self) -> LLMConfig:
        return self.config.llm

    @property
    def resampler(self) -> ResamplerConfig:
        return self.config.resampler

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    @property
    def roles(self) -> tuple[str, ...]:
        """The tensor roles of this version: "vision", "resampler", "llm" (2.6-4.5); "vision", "merger", "llm" (4.6)."""
        return tuple(self.facts.tensor_prefixes)

    @property
    def _all_prefixes(self) -> tuple[str, ...]:
        return tuple(p for prefixes in self.facts.tensor_prefixes.values() for p in prefixes)

    def names(self, role: str) -> list[str]:
        """Tensor names of one role (see `roles`)."""
        prefixes = self.facts.tensor_prefixes.get(role)
        if prefixes is None:
            raise CheckpointError(self.root, f"MiniCPM-V {self.version} has no {role!r} tensors "
                                  f"(roles: {', '.join(self.roles)})")
        return [n for n in expected_tensors(self.config) if n.startswith(prefixes)]

    def causal_lm_name(self, name: str) -> str | None:
        """An LLM tensor's name as the standalone causal LM spells it ("model.layers.0...", "lm_head.weight"),
        which is what gguf-py's name tables expect; None for tensors outside the LLM."""
        for ours, theirs in self.facts.llm_name_map:
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return None

    def tensor(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """One tensor as a numpy array (float32 unless asked otherwise), read on demand."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(self.root, "no such tensor in this checkpoint", name)
        try:
            return load_tensor(info, dtype)
        except SafetensorsFormatError as exc:   # NaN or infinity: refused here, so no exporter writes it out
            raise CheckpointError(exc.path, exc.message, exc.field) from None

    def iter_tensors(self, role: str, strip_prefix: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        prefixes = self.facts.tensor_prefixes[role]
        for name in self.names(role):
            prefix = next(p for p in prefixes if name.startswith(p))
            yield (name[len(prefix):] if strip_prefix else name), self.tensor(name)

    def parameter_count(self, role: str | None = None) -> int:
        names = self.names(role) if role else list(expected_tensors(self.config))
        return sum(self.tensors[n].numel for n in names)

    @functools.cached_property
    def tokenizer_json(self) -> dict[str, Any] | None:
        """tokenizer.json, read once and checked (export/checkpoint_checks.py); None without one."""
        path = self.root / TOKENIZER_JSON
        if not path.exists() and not path.is_symlink():
            return None
        return read_tokenizer_json(inside(self.root, TOKENIZER_JSON, error=CheckpointError))

    @functools.cached_property
    def _token_table(self) -> dict[str, int]:
        """Token string -> id from tokenizer_config.json and tokenizer.json, read once."""
        table: dict[str, int] = {}
        data = self.tokenizer_json
        if data is not None:
            vocab = (data.get("model") or {}).get("vocab") or {}
            if isinstance(vocab, dict):
                table.update({t: int(i) for t, i in vocab.items()})
            table.update({e["content"]: int(e["id"]) for e in data.get("added_tokens", []) if "content" in e})
        for tid, entry in (self.tokenizer_config.get("added_tokens_decoder") or {}).items():
            if "content" in entry:
                table[entry["content"]] = int(tid)
        return table

    def token_id(self, token: str) -> int:
        """Resolve a special token's id from the shipped tokenizer (never from a table of ours)."""
        if token not in self._token_table:
            raise CheckpointError(self.root / TOKENIZER_CONFIG, f"token {token!r} is not in the tokenizer")
        return self._token_table[token]

    def summary(self) -> dict[str, Any]:
        def gib(n: int) -> float:
            return round(n / 2 ** 30, 3)
        sizes = {role: sum(self.tensors[n].nbytes for n in self.names(role)) for role in self.roles}
        return {
            "path": str(self.root),
            "version": self.version,
            "llm_arch": self.facts.llm_gguf_arch,
            "vision": self.vision.__dict__,
            "llm": {k: v for k, v in self.llm.__dict__.items()},
            "resampler": self.resampler.__dict__ if self.resampler else None,
            "preprocess": self.preprocess.__dict__,
            "parameters": {role: self.parameter_count(role) for role in self.roles},
            "size_gib": {role: gib(sizes[role]) for role in sizes},
            "dtypes": sorted({self.tensors[n].dtype for n in expected_tensors(self.config)}),
            "ignored_tensors": len(self.ignored_tensors),
            "chat_template": bool(self.chat_template),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge inspect", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    ckpt = Checkpoint.open(args.checkpoint)
    info = ckpt.summary()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    p = info["parameters"]
    print(f"MiniCPM-V {info['version']} at {info['path']}")
    print(f"  LLM   {info['llm_arch']}: {ckpt.llm.num_hidden_layers} layers, hidden {ckpt.llm.hidden_size}, "
          f"vocab {ckpt.llm.vocab_size}, {p['llm'] / 1e9:.3f} B params")
    print(f"  ViT   {ckpt.vision.num_hidden_layers} layers, hidden {ckpt.vision.hidden_size}, "
          f"{p['vision'] / 1e6:.1f} M params")
    if ckpt.resampler:
        print(f"  resampler {ckpt.resampler.query_num} queries x {ckpt.resampler.embed_dim}, "
              f"{ckpt.resampler.num_heads} heads, {p['resampler'] / 1e6:.1f} M params")
    for role in ckpt.roles:
        if role not in ("llm", "vision", "resampler"):
            print(f"  {role} {p[role] / 1e6:.1f} M params")
    print(f"  dtypes {', '.join(info['dtypes'])}; slices up to {ckpt.preprocess.max_slice_nums} of "
          f"{ckpt.preprocess.slice_size}px; chat template: {'yes' if ckpt.chat_template else 'no'}")
    if ckpt.ignored_tensors:
        print(f"  ignored {len(ckpt.ignored_tensors)} tensor(s) outside {', '.join(ckpt._all_prefixes)}")
    return 0


__all__ = ["Checkpoint", "CheckpointConfig", "VisionConfig", "LLMConfig", "ResamplerConfig", "PreprocessConfig",
           "parse_config", "expected_tensors"]
