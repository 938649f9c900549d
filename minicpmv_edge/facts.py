"""The one table of facts about MiniCPM-V versions.

Everything that differs between MiniCPM-V 2.6, 4.0, 4.5 (and a slot for 4.6) lives here. No other
module branches on a version string: code asks `facts_for(version)` and reads a field.

Numbers that the weights or config.json already hold (widths, layer counts, vocab size) are NOT
facts here; code reads them from the checkpoint. The `reference_dims` of each entry are the real
model's dimensions, used only to synthesize look-alike checkpoints for benchmarks.

Sources are cited per field in ../shared/research/minicpmv-arch.md (tags in brackets). Values we
could not confirm from a public source are listed in `unverified` and in the README.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

# Special tokens by role. Ids are never stored: they are resolved from the shipped tokenizer.
IMAGE_TOKENS = MappingProxyType({
    "image_start": "<image>",
    "image_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "image_id_start": "<image_id>",
    "image_id_end": "</image_id>",
    "image_pad": "<unk>",  # the 64 filler tokens whose embeddings are replaced [T45-proc]
})
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>")
CHATML_TOKENS = MappingProxyType({"im_start": "<|im_start|>", "im_end": "<|im_end|>"})
THINK_TOKENS = MappingProxyType({"think_start": "<think>", "think_end": "</think>"})


@dataclass(frozen=True)
class VisionDims:
    """SigLIP-so400m NaViT tower, identical in 2.6 / 4.0 / 4.5 [arch §1.2]."""
    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    image_size: int = 980  # position table side = 980 // 14 = 70
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class LLMDims:
    """Real LLM dimensions, for synthesizing look-alike checkpoints only."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


@dataclass(frozen=True)
class ModelFacts:
    version: str                      # config.json "version", normalised to "X.Y"
    hf_repo: str                      # where the real checkpoint lives (never fetched here)
    # --- language model
    llm_hf_class: str                 # transformers class the LLM loads as (the test reference)
    llm_gguf_arch: str                # llama.cpp architecture name written to the GGUF
    llm_qkv_bias: bool                # Qwen2 has q/k/v biases
    llm_qk_norm: bool                 # Qwen3 has per-head q_norm/k_norm
    llm_muP_scaling: bool             # MiniCPM scale_emb/scale_depth/dim_model_base applied by runtimes
    # --- tokenizer and prompt
    tokenizer_kind: str               # "byte_bpe" (Qwen) or "spm_bpe" (Llama-style, byte fallback)
    gguf_tokenizer_pre: str           # llama.cpp pre-tokenizer that splits text like the HF tokenizer
    bos_token: str | None             # prepended by the tokenizer, or None (Qwen adds none)
    chat_template: str                # template family: "qwen2" (ChatML + default system), "chatml", "qwen3" (thinking)
    default_system_prompt: str | None
    stop_tokens: tuple[str, ...]
    extra_special_tokens: tuple[str, ...]
    thinking: bool                    # the template has an enable_thinking switch
    sampling: SamplingDefaults
    # --- vision side
    vision_model_type: str            # vision_config.model_type in config.json
    slicing: str                      # "llava_uhd" (first minimum wins) or "llava_uhd_v46" (tie-break)
    use_image_id: bool
    query_num: int
    max_slice_nums: int
    resampler_head_dim: int           # resampler heads = hidden / this
    mmproj_version: int | None        # clip.minicpmv_version for llama.cpp's mmproj
    mmproj_projector_type: str | None
    # --- video
    video: str                        # "temporal_resampler" (4.5) or "frames_as_images"
    max_temporal_packing: int         # frames per 64-token block (1 = no packing)
    temporal_tick_s: float | None     # seconds per temporal id
    max_temporal_size: int | None     # rows of the temporal sincos table
    # --- real dims, for synth only
    llm_rope_scaling: str | None = None  # rope_type in config.json's rope_scaling, if the real model has one
    vision_dims: VisionDims = field(default_factory=VisionDims)
    llm_dims: LLMDims | None = None
    supported: bool = True            # False: a slot for a version we do not export yet
    unverified: tuple[str, ...] = ()  # field names not confirmed from a public source
    # --- vision side, MiniCPM-V 4.6 and later (merger instead of resampler; docs/minicpmv-4.6-vision.md)
    vision_position_ids: str = "bucketize"   # NaViT ids: "bucketize" (arange(0, 1-1e-6, 1/n)) or "nearest" (arange(n)/n)
    image_pad_token: str | None = None       # replaces IMAGE_TOKENS["image_pad"] (e.g. "<|image_pad|>")
    # downsample mode -> patches merged per side by the vision graph (tokens per slice = h*w / side^2; slice
    # sides are multiples of patch_size * side). Empty: a fixed query_num per slice (the resampler).
    downsample_modes: tuple[tuple[str, int], ...] = ()
    default_downsample_mode: str | None = None

    def downsample_side(self, mode: str | None = None) -> int:
        """Patches merged per side in downsample `mode` (None: the default mode). ValueError names the modes."""
        modes = dict(self.downsample_modes)
        mode = mode or self.default_downsample_mode
        if mode not in modes:
            raise ValueError(f"MiniCPM-V {self.version}: downsample mode {mode!r} is not one of "
                             f"{sorted(modes) or 'none (this version has a resampler)'}")
        return modes[mode]

    @property
    def special_tokens(self) -> Mapping[str, str]:
        """Every special token of this version by role (image grammar, chat, thinking)."""
        roles = dict(IMAGE_TOKENS)
        if self.image_pad_token:
            roles["image_pad"] = self.image_pad_token
        roles.update(CHATML_TOKENS)
        if self.thinking:
            roles.update(THINK_TOKENS)
        return MappingProxyType(roles)

    def all_special_tokens(self) -> tuple[str, ...]:
        """Every special token a tokenizer of this version carries, in the order the real one adds them."""
        head = ("<unk>", "<s>", "</s>") if self.tokenizer_kind == "spm_bpe" else ("<|endoftext|>",)
        ordered = [*head, *CHATML_TOKENS.values(), *self.stop_tokens, *IMAGE_TOKENS.values(),
                   *self.extra_special_tokens, *(THINK_TOKENS.values() if self.thinking else ()),
                   *((self.bos_token,) if self.bos_token else ())]
        return tuple(dict.fromkeys(ordered))  # de-duplicate, keep first position


_QWEN_SAMPLING = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.05)

# 2.6 is written out in full; later versions state only what changes, so the differences are the table.
_V26 = ModelFacts(
    version="2.6",
    hf_repo="openbmb/MiniCPM-V-2_6",
    llm_hf_class="Qwen2ForCausalLM",
    llm_gguf_arch="qwen2",
    llm_qkv_bias=True,
    llm_qk_norm=False,
    llm_muP_scaling=False,
    tokenizer_kind="byte_bpe",
    gguf_tokenizer_pre="qwen2",
    bos_token=None,
    chat_template="qwen2",
    default_system_prompt="You are a helpful assistant.",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    extra_special_tokens=GROUNDING_TOKENS,
    thinking=False,
    sampling=_QWEN_SAMPLING,
    vision_model_type="siglip",
    slicing="llava_uhd",
    use_image_id=True,
    query_num=64,
    max_slice_nums=9,
    resampler_head_dim=128,
    mmproj_version=3,
    mmproj_projector_type="resampler",
    video="frames_as_images",
    max_temporal_packing=1,
    temporal_tick_s=None,
    max_temporal_size=None,
    llm_dims=LLMDims(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     head_dim=128, intermediate_size=18944, vocab_size=151666, max_position_embeddings=32768),
    unverified=("default_system_prompt", "chat_template"),
)

# 4.0's LLM is MiniCPM4-family, but every runtime (vLLM, SGLang, the transformers port, llama.cpp) builds it
# as a plain Llama with LongRoPE and applies no muP scaling (transformers tests/models/minicpm_v_4, "parameters
# EXACTLY from config.json"). Its tokenizer is the sentencepiece-style MiniCPM4 one (<unk>=0, <s>=1, </s>=2).
_V40 = replace(
    _V26,
    version="4.0",
    hf_repo="openbmb/MiniCPM-V-4",
    llm_hf_class="LlamaForCausalLM",
    llm_gguf_arch="llama",
    llm_qkv_bias=False,
    llm_rope_scaling="longrope",
    tokenizer_kind="spm_bpe",
    gguf_tokenizer_pre="default",
    bos_token="<s>",
    chat_template="chatml",
    default_system_prompt=None,
    stop_tokens=("<|im_end|>", "</s>"),
    extra_special_tokens=GROUNDING_TOKENS[:6],
    mmproj_version=5,
    llm_dims=LLMDims(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=2,
                     head_dim=128, intermediate_size=10240, vocab_size=73448, max_position_embeddings=32768,
                     rope_theta=10000.0),
    # num_hidden_layers: 32 fits the published 4.1B total; the public config copy was cut to 2 layers.
    unverified=("llm_dims.num_hidden_layers", "chat_template", "bos_token", "image token ids"),
)

# 4.5: Qwen3-8B with a thinking switch, and the temporal (3D) resampler for video.
_V45 = replace(
    _V26,
    version="4.5",
    hf_repo="openbmb/MiniCPM-V-4_5",
    llm_hf_class="Qwen3ForCausalLM",
    llm_gguf_arch="qwen3",
    llm_qkv_bias=False,
    llm_qk_norm=True,
    chat_template="qwen3",
    default_system_prompt=None,
    extra_special_tokens=GROUNDING_TOKENS[:6],
    thinking=True,
    sampling=SamplingDefaults(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.03),
    vision_model_type="siglip_vision_model",
    mmproj_version=6,
    video="temporal_resampler",
    max_temporal_packing=6,
    temporal_tick_s=0.1,
    max_temporal_size=72000,
    llm_dims=LLMDims(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151748, max_position_embeddings=40960),
    # chat template: the hub jinja was not retrieved; we mirror vLLM's template_minicpmv45.jinja (Qwen3 style,
    # no default system prompt, enable_thinking switch).
    unverified=("llm_dims.vocab_size", "chat_template", "image token ids"),
)

# 4.6 replaces the resampler with a ViT window-attention merger (llama.cpp has its own projector type for it).
# A slot, so the table says so instead of failing with "unknown version".
_V46 = replace(
    _V45,
    version="4.6",
    hf_repo="openbmb/MiniCPM-V-4_6",
    extra_special_tokens=(),
    sampling=_QWEN_SAMPLING,
    slicing="llava_uhd_v46",
    max_slice_nums=36,
    mmproj_version=None,
    mmproj_projector_type="minicpmv4_6",
    video="frames_as_images",
    max_temporal_packing=1,
    temporal_tick_s=None,
    max_temporal_size=None,
    llm_dims=None,
    supported=False,
    unverified=("llm_hf_class", "query_num", "video"),
    # vision side [transformers 5.23 models/minicpmv4_6, vision_utils.get_vision_nearest_position_ids;
    # llama.cpp clip.cpp PROJECTOR_TYPE_MINICPMV4_6]: the ViT window merger (after insert_layer_id) and the
    # final merger each merge 2x2 patches; "4x" skips the window merger.
    vision_position_ids="nearest",
    image_pad_token="<|image_pad|>",
    downsample_modes=(("16x", 4), ("4x", 2)),
    default_downsample_mode="16x",
)

MODEL_FACTS: Mapping[str, ModelFacts] = MappingProxyType({f.version: f for f in (_V26, _V40, _V45, _V46)})

SUPPORTED_VERSIONS = tuple(v for v, f in MODEL_FACTS.items() if f.supported)


class UnknownVersionError(ValueError):
    pass


def normalize_version(raw: object) -> str:
    """config.json stores the version as a float (2.6) or a string ("4.5"); return "X.Y"."""
    if isinstance(raw, bool) or raw is None:
        raise UnknownVersionError(f"version {raw!r} is not a MiniCPM-V version")
    if isinstance(raw, (int, float)):
        return f"{float(raw):.1f}"
    text = str(raw).strip()
    try:
        return f"{float(text):.1f}"
    except ValueError:
        raise UnknownVersionError(f"version {raw!r} is not a MiniCPM-V version") from None


def facts_for(version: object, *, allow_unsupported: bool = False) -> ModelFacts:
    """Facts for a version ("4.5", 4.5, "4.50"). Raises UnknownVersionError naming the known ones."""
    key = normalize_version(version)
    facts = MODEL_FACTS.get(key)
    if facts is None:
        raise UnknownVersionError(
            f"MiniCPM-V version {key} is not in the model-facts table (known: {', '.join(MODEL_FACTS)})")
    if not facts.supported and not allow_unsupported:
        raise UnknownVersionError(
            f"MiniCPM-V {key} is listed but not supported yet (supported: {', '.join(SUPPORTED_VERSIONS)})")
    return facts
