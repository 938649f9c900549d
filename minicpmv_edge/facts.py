"""The one table of facts about MiniCPM-V versions.

Everything that differs between MiniCPM-V 2.6, 4.0, 4.5 and 4.6 lives here. No other module branches on a
version string: code asks `facts_for(version)` (or `facts_for_config(config_json)`) and reads a field.

Numbers that the weights or config.json already hold (widths, layer counts, vocab size) are NOT
facts here; code reads them from the checkpoint. The `reference_dims` of each entry are the real
model's dimensions, used only to synthesize look-alike checkpoints for benchmarks.

Sources are cited per field in docs/model.md (tags in brackets, defined in its §0) and, for 4.6, in
docs/minicpmv-4.6.md. Values we could not confirm from a public source are listed in `unverified` and in
the README.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

from minicpmv_edge.errors import UnknownVersionError

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
    """SigLIP-so400m NaViT tower, identical in 2.6 / 4.0 / 4.5 [docs/model.md §1.2]."""
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
class HybridLLMDims:
    """Real Qwen3.5 (4.6) gated-delta-net hybrid dimensions, for synthesizing look-alike checkpoints only."""
    layer_pattern: tuple[str, ...]    # layer kinds, repeated: 3 x "linear_attention" then "full_attention"
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    partial_rotary_factor: float      # share of head_dim that is rotated (the rest passes through)
    attn_output_gate: bool            # full-attention q_proj also yields a sigmoid gate per head
    mtp_num_hidden_layers: int        # the multi-token-prediction head (mtp.*), dropped by every export


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
    # --- checkpoint layout
    hf_model_type: str                # config.json "model_type"; "minicpmv" configs also carry "version"
    tensor_prefixes: Mapping[str, tuple[str, ...]]  # tensor-name prefixes by role in the HF checkpoint
    # LLM tensor names as the standalone causal LM (transformers' XxxForCausalLM, gguf-py's tables) spells them:
    # (checkpoint prefix, causal-LM prefix) pairs
    llm_name_map: tuple[tuple[str, str], ...]
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
    image_tokens: Mapping[str, str]   # image grammar by role (image_pad: the tokens embeddings replace)
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
    video_default_packing: int = 1    # frames per block the recipe picks at most on its own (MAX_NUM_PACKING);
                                      # a request may ask for up to max_temporal_packing
    video_max_slice_nums: int = 1     # slices per video frame in the version's video recipe
    # --- sampling per mode: `sampling` is the default without thinking, `thinking_sampling` with it (None: the
    # same), as the official inference code runs. The names in `sampling_from_generation_config` (without, with
    # thinking) are the values that code leaves to the checkpoint's generation_config.json instead of setting
    # them itself: a bundle that carries the checkpoint's file uses its values for those (`sampling_defaults`).
    # `generation_config`: the sampling values of the public hub file, which synth writes.
    thinking_sampling: SamplingDefaults | None = None
    sampling_from_generation_config: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    generation_config: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # --- real dims, for synth only
    llm_rope_scaling: str | None = None  # rope_type in config.json's rope_scaling, if the real model has one
    vision_dims: VisionDims = field(default_factory=VisionDims)
    llm_dims: LLMDims | None = None
    llm_hybrid_dims: HybridLLMDims | None = None   # Qwen3.5 linear/full attention mix (4.6)
    insert_layer_id: int | None = None  # 4.6: ViT layer after which the window-attention merger runs
    # The real tokenizer's added tokens in id order, when we know them all (4.6); `plain_added_tokens` are
    # the ones it marks special=false (they stay in decoded text).
    added_tokens: tuple[str, ...] = ()
    plain_added_tokens: tuple[str, ...] = ()
    # How the model writes a tool call inside <tool_call></tool_call> (runtime/tools.py): "json" (Qwen2/Qwen3,
    # 2.6-4.5: {"name": ..., "arguments": {...}}) or "xml" (Qwen3.5, 4.6: <function=name> with one
    # <parameter=key> block per argument), as the version's chat template teaches it.
    tool_call_format: str = "json"
    supported: bool = True            # end to end: export (LLM + vision) and runtime
    checkpoint_supported: bool = True  # the checkpoint reader, synth and the LLM GGUF export handle it
    unverified: tuple[str, ...] = ()  # field names not confirmed from a public source
    # --- vision side, MiniCPM-V 4.6 and later (merger instead of resampler; docs/minicpmv-4.6-vision.md)
    vision_position_ids: str = "bucketize"   # NaViT ids: "bucketize" (arange(0, 1-1e-6, 1/n)) or "nearest" (arange(n)/n)
    # downsample mode -> patches merged per side by the vision graph (tokens per slice = h*w / side^2; slice
    # sides are multiples of patch_size * side). Empty: a fixed query_num per slice (the resampler).
    downsample_modes: tuple[tuple[str, int], ...] = ()
    default_downsample_mode: str | None = None

    def sampling_defaults(self, thinking: bool, generation_config: Mapping[str, Any] | None = None
                          ) -> SamplingDefaults:
        """A mode's default sampling, with the values the recipe reads from generation_config.json taken from
        `generation_config` (the checkpoint's own, as the bundle carries it) where it states them."""
        base = self.thinking_sampling if thinking and self.thinking_sampling is not None else self.sampling
        names = self.sampling_from_generation_config[1 if thinking else 0]
        own = {k: generation_config[k] for k in names if generation_config and generation_config.get(k) is not None}
        return replace(base, **own)

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
        roles = dict(self.image_tokens)
        roles.update(CHATML_TOKENS)
        if self.thinking:
            roles.update(THINK_TOKENS)
        return MappingProxyType(roles)

    def all_special_tokens(self) -> tuple[str, ...]:
        """Every special token a tokenizer of this version carries, in the order the real one adds them."""
        if self.added_tokens:
            return self.added_tokens
        head = ("<unk>", "<s>", "</s>") if self.tokenizer_kind == "spm_bpe" else ("<|endoftext|>",)
        ordered = [*head, *CHATML_TOKENS.values(), *self.stop_tokens, *IMAGE_TOKENS.values(),
                   *self.extra_special_tokens, *(THINK_TOKENS.values() if self.thinking else ()),
                   *((self.bos_token,) if self.bos_token else ())]
        return tuple(dict.fromkeys(ordered))  # de-duplicate, keep first position


# 2.6 and 4.0: `chat()` sets all four itself, in the one mode these versions have.
_QWEN_SAMPLING = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.05)
_SAMPLING_NAMES = ("temperature", "top_p", "top_k", "repetition_penalty")

# 2.6 is written out in full; later versions state only what changes, so the differences are the table.
_V26 = ModelFacts(
    version="2.6",
    hf_repo="openbmb/MiniCPM-V-2_6",
    hf_model_type="minicpmv",
    tensor_prefixes=MappingProxyType({"vision": ("vpm.",), "resampler": ("resampler.",), "llm": ("llm.",)}),
    llm_name_map=(("llm.", ""),),
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
    image_tokens=IMAGE_TOKENS,
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
    video_max_slice_nums=2,   # the 2.6 video recipe: params["max_slice_nums"] = 2 (docs/minicpm_v2dot6_en.md)
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
    video_max_slice_nums=1,   # the later recipes (o-2.6, 4.0 READMEs) use max_slice_nums = 1 for video frames
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
    # The 4.5 `chat()` (modeling_minicpmv.py) samples at temperature 0.7 and, without thinking only, sets top_p
    # 0.8, top_k 100 and repetition_penalty 1.03 itself; with thinking those come from the hub's
    # generation_config.json (temperature 0.6, top_p 0.95, top_k 20, Qwen3-8B's; no repetition_penalty:
    # transformers' 1.0). Source: the hub files as vendored in github.com/PcOffeeP/FineTune_MLLM
    # Model/MiniCPM-VL-4.5/ (a ModelScope download of openbmb/MiniCPM-V-4_5).
    sampling=SamplingDefaults(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.03),
    thinking_sampling=SamplingDefaults(temperature=0.7, top_p=0.95, top_k=20, repetition_penalty=1.0),
    sampling_from_generation_config=((), ("top_p", "top_k", "repetition_penalty")),
    generation_config=MappingProxyType({"temperature": 0.6, "top_p": 0.95, "top_k": 20}),
    vision_model_type="siglip_vision_model",
    mmproj_version=6,
    video="temporal_resampler",
    max_temporal_packing=6,
    video_default_packing=3,  # the 4.5 recipe's MAX_NUM_PACKING ("valid range: 1-6")
    video_max_slice_nums=1,
    temporal_tick_s=0.1,
    max_temporal_size=72000,
    llm_dims=LLMDims(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151748, max_position_embeddings=40960),
    # chat template: the hub jinja was not retrieved; we mirror vLLM's template_minicpmv45.jinja (Qwen3 style,
    # no default system prompt, enable_thinking switch).
    unverified=("llm_dims.vocab_size", "chat_template", "image token ids"),
)

# 4.6: a transformers-native checkpoint (model_type "minicpmv4_6", no "version" key, nested text_config /
# vision_config; transformers >= 5.7). Qwen3.5-0.8B text model (gguf `qwen35`: 3 of every 4 layers are gated
# delta net linear attention, the 4th full attention with an output gate, partial rotary, tied embeddings);
# SigLIP-400M with a window-attention merger inside the ViT and a 2x2 downsample MLP instead of a resampler
# (llama.cpp has its own projector type for it). Sources: the hub's config.json, generation_config.json,
# preprocessor_config.json and tokenizer.json as copied on GitHub, transformers' models/minicpmv4_6 and
# models/qwen3_5, llama.cpp's conversion/minicpm.py + qwen.py; see docs/minicpmv-4.6.md.
_QWEN35_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
_V46 = replace(
    _V45,
    version="4.6",
    hf_repo="openbmb/MiniCPM-V-4.6",
    hf_model_type="minicpmv4_6",
    tensor_prefixes=MappingProxyType({"vision": ("model.vision_tower.",), "merger": ("model.merger.",),
                                      "llm": ("model.language_model.", "lm_head.")}),
    llm_name_map=(("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    llm_hf_class="Qwen3_5ForCausalLM",
    llm_gguf_arch="qwen35",
    llm_qk_norm=True,
    gguf_tokenizer_pre="qwen35",      # llama.cpp's name for the Qwen3.5 split regex (it adds \p{M})
    chat_template="qwen35",
    tool_call_format="xml",           # the hub chat template's tools section (docs/minicpmv-4.6.md)
    stop_tokens=("<|im_end|>", "<|endoftext|>"),   # generation_config eos_token_id [248044, 248046]
    extra_special_tokens=GROUNDING_TOKENS,
    # 248044.. in the real vocabulary: Qwen3.5's own added tokens, then MiniCPM-V's image grammar
    added_tokens=_QWEN35_ADDED_TOKENS + ("<unk>", "<image>", "</image>", *GROUNDING_TOKENS, "<slice>", "</slice>",
                                         "<image_id>", "</image_id>", "<timestamp>", "</timestamp>"),
    plain_added_tokens=("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                        "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                        "<think>", "</think>"),
    thinking=True,                    # off unless enable_thinking=true (the template closes an empty think block)
    # no chat() of its own: transformers' generate() takes every sampling value from generation_config.json
    sampling=SamplingDefaults(temperature=0.7, top_p=1.0, top_k=0, repetition_penalty=1.0),  # generation_config
    thinking_sampling=None,
    sampling_from_generation_config=(_SAMPLING_NAMES, _SAMPLING_NAMES),
    generation_config=MappingProxyType({"temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}),
    vision_model_type="minicpmv4_6_vision",
    image_tokens=MappingProxyType({**IMAGE_TOKENS, "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>"}),
    slicing="llava_uhd_v46",
    max_slice_nums=9,                 # preprocessor_config.json (the README recommends 36 for images)
    resampler_head_dim=0,             # no resampler
    mmproj_version=None,
    mmproj_projector_type="minicpmv4_6",
    video="frames_as_images",
    max_temporal_packing=1,
    video_default_packing=1,
    temporal_tick_s=None,
    max_temporal_size=None,
    insert_layer_id=6,
    llm_dims=LLMDims(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=256, intermediate_size=3584, vocab_size=248094, max_position_embeddings=262144,
                     rope_theta=10_000_000.0, tie_word_embeddings=True),
    llm_hybrid_dims=HybridLLMDims(layer_pattern=("linear_attention",) * 3 + ("full_attention",),
                                  linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                                  linear_num_key_heads=16, linear_num_value_heads=16, partial_rotary_factor=0.25,
                                  attn_output_gate=True, mtp_num_hidden_layers=1),
    supported=True,
    # chat template: the hub's, as the HF API reports it (tests/reference/minicpmv46_chat_template.json, source
    # cited there); ours renders the same (tests/test_v46_tools.py). video: owned by the vision half.
    unverified=("video", "query_num"),
    # vision side [transformers 5.23 models/minicpmv4_6, vision_utils.get_vision_nearest_position_ids;
    # llama.cpp clip.cpp PROJECTOR_TYPE_MINICPMV4_6]: the ViT window merger (after insert_layer_id) and the
    # final merger each merge 2x2 patches; "4x" skips the window merger.
    vision_position_ids="nearest",
    downsample_modes=(("16x", 4), ("4x", 2)),
    default_downsample_mode="16x",
)

MODEL_FACTS: Mapping[str, ModelFacts] = MappingProxyType({f.version: f for f in (_V26, _V40, _V45, _V46)})

SUPPORTED_VERSIONS = tuple(v for v, f in MODEL_FACTS.items() if f.supported)
# Supported versions of the remote-code layout with a resampler (2.6-4.5); the transformers-native 4.6 has its own
# tests (tests/test_v46_*.py), the tests of that layout run over these.
RESAMPLER_VERSIONS = tuple(v for v in SUPPORTED_VERSIONS if MODEL_FACTS[v].hf_model_type == "minicpmv")
# Versions whose checkpoints can be read and synthesized and whose LLM exports to GGUF (a superset).
CHECKPOINT_VERSIONS = tuple(v for v, f in MODEL_FACTS.items() if f.supported or f.checkpoint_supported)

# Bounds that readers of bundles and requests check against, derived from the table (a new version moves them).
MAX_SLICE_NUMS = max(f.max_slice_nums for f in MODEL_FACTS.values())
SLICING_VARIANTS = tuple(dict.fromkeys(f.slicing for f in MODEL_FACTS.values()))
# every special-token role a version may name (the glossary: docs/glossary.md), e.g. 4.6's video_pad
SPECIAL_TOKEN_ROLES = tuple(dict.fromkeys((*IMAGE_TOKENS, *CHATML_TOKENS, *THINK_TOKENS,
                                          *(r for f in MODEL_FACTS.values() for r in f.special_tokens))))


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


def facts_for_config(config: Mapping) -> ModelFacts:
    """Facts for a config.json object: transformers-native versions by their `model_type` (4.6 has no
    "version" key), the remote-code "minicpmv" ones by their "version". Versions whose checkpoints we can read
    are accepted even before end-to-end support. Raises UnknownVersionError naming what was found."""
    model_type = config.get("model_type")
    native = {f.hf_model_type: f for f in MODEL_FACTS.values() if f.hf_model_type != "minicpmv"}
    if isinstance(model_type, str) and model_type in native:
        facts = native[model_type]
    elif "version" in config:
        facts = facts_for(config["version"], allow_unsupported=True)
        if facts.hf_model_type != "minicpmv":
            raise UnknownVersionError(
                f"MiniCPM-V {facts.version} with a \"version\" field is not supported yet: {facts.version} "
                f"checkpoints are transformers-native (model_type {facts.hf_model_type!r}, no version field)")
    else:
        raise UnknownVersionError(
            f"model_type {model_type!r} has no \"version\" field and is not one of {', '.join(native)} "
            f"(is this a MiniCPM-V checkpoint?)")
    if not (facts.supported or facts.checkpoint_supported):
        raise UnknownVersionError(f"MiniCPM-V {facts.version} is listed but not supported yet "
                                  f"(supported: {', '.join(CHECKPOINT_VERSIONS)})")
    return facts


def checkpoint_facts(version: object) -> ModelFacts:
    """Facts for a version whose checkpoints we read, synthesize and export the LLM of (`CHECKPOINT_VERSIONS`),
    which includes versions not yet supported end to end."""
    facts = facts_for(version, allow_unsupported=True)
    if facts.version not in CHECKPOINT_VERSIONS:
        raise UnknownVersionError(f"MiniCPM-V {facts.version} checkpoints are not supported yet "
                                  f"(supported: {', '.join(CHECKPOINT_VERSIONS)})")
    return facts
