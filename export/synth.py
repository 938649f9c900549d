"""Synthetic MiniCPM-V checkpoints: real layout, real tokenizer machinery, random weights.

    minicpmv-edge synth --version 4.5 --size tiny --out /tmp/tiny-4.5

Real weights cannot be downloaded here, so tests and benchmarks run on checkpoints that a user
could not tell apart from the hub's by layout: config.json with the real fields, `vpm.*`,
`resampler.*`, `llm.*` bf16 safetensors (sharded with an index when large), a trained byte-level
BPE (or sentencepiece-style for 4.0) tokenizer with the real special tokens, the version's chat
template and preprocessor_config.json. Weights are random with scales that keep activations near
unit variance through every layer.

Sizes: `tiny` (seconds, for tests), `edge-4b` (SigLIP-400M + a 4B-class LLM of the version's
architecture, Qwen3-4B dims), `full` (the real model's dims from the facts table). Tensors are
generated and written one chunk at a time, so even `full` (8B) stays well under 4 GB of RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.facts import CHECKPOINT_VERSIONS, LLMDims, ModelFacts, VisionDims, checkpoint_facts

from .checkpoint import (CONFIG, PREPROCESSOR_CONFIG, SAFETENSORS_INDEX, SINGLE_SAFETENSORS, expected_tensors,
                         parse_config)
from . import synth_native
from .safetensors_io import TensorSpec, write_safetensors

SIZES = ("tiny", "edge-4b", "full")
SHARD_BYTES = 4 * 2 ** 30          # the hub's usual shard size
CHUNK_ELEMENTS = 16 * 2 ** 20      # rows are generated in blocks of about this many values

TINY_VISION = VisionDims(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# hidden 256 keeps two resampler heads of 128 and lets K-quants (256-element blocks) apply to tiny models.
TINY_LLM = LLMDims(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   intermediate_size=512, vocab_size=0, max_position_embeddings=4096)
# Qwen3-4B dimensions (untied here so every version keeps an lm_head, as MiniCPM-V checkpoints do).
EDGE_LLM = LLMDims(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960)
# BPE vocabulary trained for the synthetic tokenizer. Tiny models keep it small (small embedding); the
# benchmark sizes take the most the training corpus supports (~7.9k), so that English chat prompts tokenize
# to about the real (151k-vocab) count: text-token counts are part of every TTFT a benchmark reports.
TINY_BPE_VOCAB = 1024
BENCH_BPE_VOCAB = 8000


@dataclass(frozen=True)
class SynthPlan:
    version: str
    size: str
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]
    shards: list[list[str]]

    @property
    def total_bytes(self) -> int:
        return sum(2 * int(np.prod(s)) for s in self.tensors.values())

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensors.values())


def _dims(facts: ModelFacts, size: str) -> tuple[VisionDims, LLMDims]:
    if size == "tiny":
        return TINY_VISION, TINY_LLM
    if size == "edge-4b":
        return facts.vision_dims, EDGE_LLM
    if size == "full":
        if facts.llm_dims is None:
            raise MiniCPMVEdgeError(f"the facts table has no real dimensions for MiniCPM-V {facts.version}")
        return facts.vision_dims, facts.llm_dims
    raise MiniCPMVEdgeError(f"unknown size {size!r} (choose from {', '.join(SIZES)})")


def _rope_scaling(facts: ModelFacts, llm: LLMDims) -> dict[str, Any] | None:
    if facts.llm_rope_scaling != "longrope":
        return None
    # MiniCPM4-style LongRoPE: one factor per rotary frequency, rising from ~1 to ~31, the same list for
    # short and long context (as in the real 4.0 config).
    n = llm.head_dim // 2
    factors = [round(1.0 + 30.0 * (i / (n - 1)) ** 2, 6) for i in range(n)]
    return {"rope_type": "longrope", "factor": 1.0, "original_max_position_embeddings": llm.max_position_embeddings,
            "long_factor": factors, "short_factor": list(factors)}


def build_config(facts: ModelFacts, vision: VisionDims, llm: LLMDims, vocab_size: int,
                 token_ids: dict[str, int]) -> dict[str, Any]:
    """config.json with the fields the real MiniCPM-V configs carry (LLM fields at the top level)."""
    cfg: dict[str, Any] = {
        "architectures": ["MiniCPMV"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                     "AutoModel": "modeling_minicpmv.MiniCPMV",
                     "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
        "model_type": "minicpmv",
        "version": float(facts.version),
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "head_dim": llm.head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "rope_theta": llm.rope_theta,
        "rope_scaling": _rope_scaling(facts, llm),
        "rms_norm_eps": llm.rms_norm_eps,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "attention_bias": facts.llm_qkv_bias,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids["eos"],
        "query_num": facts.query_num,
        "image_size": 448,
        "patch_size": vision.patch_size,
        "slice_mode": True,
        "slice_config": {"max_slice_nums": facts.max_slice_nums, "model_type": "minicpmv",
                         "patch_size": vision.patch_size, "scale_resolution": 448},
        "use_image_id": facts.use_image_id,
        "batch_vision_input": True,
        "vision_batch_size": 16,
        "drop_vision_last_layer": False,
        "vision_config": {
            "model_type": facts.vision_model_type,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers,
            "patch_size": vision.patch_size,
            "image_size": vision.image_size,
            "hidden_act": vision.hidden_act,
            "layer_norm_eps": vision.layer_norm_eps,
        },
        "transformers_version": "4.51.0",
    }
    if facts.llm_gguf_arch == "qwen2":  # Qwen2 configs carry the sliding-window fields
        cfg.update(use_sliding_window=False, sliding_window=llm.max_position_embeddings,
                   max_window_layers=llm.num_hidden_layers)
    if facts.llm_gguf_arch == "llama":
        cfg.update(mlp_bias=False, pretraining_tp=1, pad_token_id=token_ids.get("pad"))
    return cfg


def build_preprocessor_config(facts: ModelFacts, vision: VisionDims) -> dict[str, Any]:
    t = facts.special_tokens
    return {
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
                     "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor"},
        "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": facts.max_slice_nums,
        "scale_resolution": 448,
        "patch_size": vision.patch_size,
        "use_image_id": facts.use_image_id,
        "image_feature_size": facts.query_num,
        "im_start": t["image_start"], "im_end": t["image_end"],
        "slice_start": t["slice_start"], "slice_end": t["slice_end"],
        "unk": t["image_pad"],
        "im_id_start": t["image_id_start"], "im_id_end": t["image_id_end"],
        "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": float(facts.version),
    }


def _shard(tensors: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def plan(version: str, size: str, vocab_size: int | None = None,
         token_ids: dict[str, int] | None = None, shard_bytes: int | None = None) -> SynthPlan:
    """Everything synth would write, computed without touching the disk (also `--dry-run`)."""
    facts = checkpoint_facts(version)
    if facts.hf_model_type != "minicpmv":   # transformers-native layout (4.6)
        vision, llm, _, _ = synth_native.native_dims(facts, size)
        vocab = vocab_size or llm.vocab_size or 2048
        ids = token_ids or {"eos": 2, "pad": 2, "image_pad": 3, "video_pad": 4}
        config = synth_native.build_native_config(facts, size, vocab, ids)
        pre = synth_native.build_native_preprocessor_config(facts, vision)
    else:
        vision, llm = _dims(facts, size)
        vocab = vocab_size or llm.vocab_size or 2048
        ids = token_ids or {"eos": 2, "bos": 1 if facts.bos_token else None, "pad": 2}
        config = build_config(facts, vision, llm, vocab, ids)
        pre = build_preprocessor_config(facts, vision)
    tensors = expected_tensors(parse_config(config, preprocessor=pre))
    if shard_bytes is None:  # tiny checkpoints are a single file, like small hub models
        shard_bytes = SHARD_BYTES if size != "tiny" else 2 ** 62
    shards = _shard(tensors, shard_bytes)
    return SynthPlan(facts.version, size, config, pre, tensors, shards)


# ---------------------------------------------------------------------------------------------
# Random weights with sane scales

def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) for a tensor, chosen so activations stay near unit variance layer after layer."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name or ".ln_" in name or "layernorm" in name:
        # LayerNorm/RMSNorm gains near 1 (but not exactly, so a mapping mistake shows up), small biases
        return (1.0, 0.1) if leaf == "weight" else (0.0, 0.02)
    if leaf == "bias" or name.endswith("in_proj_bias"):
        return 0.0, 0.02
    if name.endswith("position_embedding.weight"):
        return 0.0, 0.5
    if name.endswith("embed_tokens.weight") or name == "resampler.query":
        return 0.0, 1.0
    if name.endswith("patch_embedding.weight"):
        return 0.0, 1.0 / np.sqrt(np.prod(shape[1:]))
    if name.endswith("lm_head.weight"):
        return 0.0, 2.0 / np.sqrt(shape[1])   # logits with a clear top-1 for greedy parity tests
    if name == "resampler.proj":
        return 0.0, 1.0 / np.sqrt(shape[0])   # used as x @ proj: fan-in is the first axis
    return 0.0, 1.0 / np.sqrt(shape[-1])      # Linear weight [out, in]


def _random_chunks(name: str, shape: tuple[int, ...], seed: int, live_rows: int | None = None
                   ) -> Iterator[np.ndarray]:
    """Random rows; rows from `live_rows` on are zero (vocabulary padding that no token uses, so a
    random model never picks a padding id that the tokenizer cannot decode)."""
    mean, std = _std(name, shape)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row)
    total = shape[0] if shape else 1
    for start in range(0, total, rows_per_chunk):
        n = min(rows_per_chunk, total - start)
        block = rng.standard_normal((n, *shape[1:]), dtype=np.float32)
        block *= np.float32(std)
        block += np.float32(mean)
        if live_rows is not None and start + n > live_rows:
            block[max(live_rows - start, 0):] = 0.0
        yield block


# ---------------------------------------------------------------------------------------------

def synthesize(version: str, size: str, out: str | Path, *, seed: int = 0, overwrite: bool = False,
               progress: bool = False, shard_bytes: int | None = None) -> Path:
    """Write a synthetic checkpoint directory. The folder appears complete or not at all."""
    from .synth_tokenizer import write_tokenizer  # needs `tokenizers` (export extra)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MiniCPMVEdgeError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    facts = checkpoint_facts(version)
    native = facts.hf_model_type != "minicpmv"
    _, llm = synth_native.native_dims(facts, size)[:2] if native else _dims(facts, size)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        n_tokens = write_tokenizer(facts, staging, seed=seed,
                                   bpe_vocab_size=TINY_BPE_VOCAB if size == "tiny" else BENCH_BPE_VOCAB)
        # The LLM's vocab rows: the real count for benchmark sizes (unused rows pad the embedding, as real
        # checkpoints pad to a round number), the tokenizer size rounded up to 64 for tiny.
        vocab = llm.vocab_size if size != "tiny" else -(-n_tokens // 64) * 64
        if vocab < n_tokens:
            raise MiniCPMVEdgeError(f"vocab {vocab} is smaller than the tokenizer ({n_tokens} tokens)")
        ids = _token_ids(facts, staging)
        p = plan(facts.version, size, vocab, ids, shard_bytes)
        (staging / PREPROCESSOR_CONFIG).write_text(json.dumps(p.preprocessor, indent=2) + "\n")
        if native:   # transformers writes config.json and the weights itself
            _write_native_weights(p, staging, seed, progress, n_tokens)
        else:
            (staging / CONFIG).write_text(json.dumps(p.config, indent=2) + "\n")
            _write_weights(p, staging, seed, progress, n_tokens)
        eos = [ids["eos"], ids["im_end"]] if native else ids["eos"]   # 4.6 stops on both
        # the hub file's sampling values where we know them (facts.generation_config), else the recipe's
        sampling = dict(facts.generation_config) or {
            "temperature": facts.sampling.temperature, "top_p": facts.sampling.top_p,
            "top_k": facts.sampling.top_k, "repetition_penalty": facts.sampling.repetition_penalty}
        (staging / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": ids.get("bos"), "eos_token_id": eos, "do_sample": True, **sampling},
            indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _token_ids(facts: ModelFacts, folder: Path) -> dict[str, int]:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    if facts.hf_model_type != "minicpmv":
        return synth_native.native_token_ids(facts, added)
    eos = added[facts.stop_tokens[0]]
    ids = {"eos": eos, "pad": added.get("<|endoftext|>", added.get("</s>", eos))}
    if facts.bos_token:
        ids["bos"] = added[facts.bos_token]
    return ids


_VOCAB_ROWS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


def _write_weights(p: SynthPlan, folder: Path, seed: int, progress: bool, n_tokens: int) -> None:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=p.total_bytes, unit="B", unit_scale=True, desc=f"synth {p.version} {p.size}")
    meta = {"format": "pt"}
    n = len(p.shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(p.shards, 1):
        fname = SINGLE_SAFETENSORS if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        specs = [TensorSpec(name, p.tensors[name], "BF16",
                            (lambda name=name: _random_chunks(name, p.tensors[name], seed,
                                                              n_tokens if name in _VOCAB_ROWS else None)))
                 for name in names]
        write_safetensors(folder / fname, specs, meta,
                          on_tensor=(lambda s: bar.update(s.nbytes)) if bar else None)
        weight_map.update({name: fname for name in names})
    if bar:
        bar.close()
    if n > 1:
        index = {"metadata": {"total_size": p.total_bytes}, "weight_map": weight_map}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_native_weights(p: SynthPlan, folder: Path, seed: int, progress: bool, n_tokens: int) -> None:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=p.total_bytes, unit="B", unit_scale=True, desc=f"synth {p.version} {p.size}")
    synth_native.write_native_checkpoint(
        p.config, folder, seed=seed, n_tokens=n_tokens, chunk_elements=CHUNK_ELEMENTS,
        shard_bytes=SHARD_BYTES if p.size != "tiny" else 2 ** 40,
        on_tensor=(lambda _, nbytes: bar.update(nbytes)) if bar else None)
    if bar:
        bar.close()
    synth_native.check_saved_layout(folder, p.tensors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="minicpmv-edge synth", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--version", required=True, choices=CHECKPOINT_VERSIONS)
    ap.add_argument("--size", default="tiny", choices=SIZES)
    ap.add_argument("--out", type=Path, help="output checkpoint folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    ap.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    args = ap.parse_args(argv)
    if args.dry_run:
        p = plan(args.version, args.size)
        print(json.dumps({"version": p.version, "size": p.size, "parameters": p.parameters,
                          "bytes": p.total_bytes, "shards": len(p.shards),
                          "tensors": {k: list(v) for k, v in p.tensors.items()}}, indent=1))
        return 0
    if args.out is None:
        ap.error("--out is required unless --dry-run")
    t0 = time.perf_counter()
    out = synthesize(args.version, args.size, args.out, seed=args.seed, overwrite=args.overwrite,
                     progress=sys.stderr.isatty() or args.size != "tiny")
    print(f"wrote synthetic MiniCPM-V {args.version} ({args.size}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0
