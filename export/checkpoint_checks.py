"""What a checkpoint from a stranger may say: the value bounds, in one table, and the checks the reader runs
before it sizes anything from those values.

`export/checkpoint.py` calls these on the raw JSON it reads; they only refuse (CheckpointError naming the file
and the field) and never build anything, so the reader's own parsing stays where it is. The bounds are the model
facts (minicpmv_edge/facts.py) with headroom: widths up to twice the largest real model's, counts up to four
times, floats finite and in a range every real config sits well inside. The resampler's width and input width
also fit what libmve accepts (bindings/include/mve.h MVE_MAX_*), so a checkpoint that passes here exports to a
weights file the native kernels load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from minicpmv_edge.errors import CheckpointError
from minicpmv_edge.facts import MODEL_FACTS, ModelFacts
from minicpmv_edge.untrusted import MAX_TEXT_BYTES, read_json, read_text


def _largest_llm(attr: str) -> int:
    return max(getattr(f.llm_dims, attr) for f in MODEL_FACTS.values() if f.llm_dims)


def _largest_vision(attr: str) -> int:
    return max(getattr(f.vision_dims, attr) for f in MODEL_FACTS.values())


@dataclass(frozen=True)
class Bound:
    """An integer or a finite float in [low, high] (low excluded when `open_low`); `high` may depend on the
    version's facts."""
    kind: type                                   # int or float
    low: float
    high: float | Callable[[ModelFacts], float]
    open_low: bool = False

    def top(self, facts: ModelFacts | None) -> float:
        return self.high(facts) if callable(self.high) else self.high


_WIDTH, _COUNT = 2, 4   # headroom over the largest real model: widths x2, counts x4

# config.json, LLM fields (top level; 4.6's text_config holds the same names and is checked with this table too)
LLM_BOUNDS: Mapping[str, Bound] = {
    "hidden_size": Bound(int, 1, _WIDTH * _largest_llm("hidden_size")),            # 8192 = MVE_MAX_EMBED_DIM
    "num_hidden_layers": Bound(int, 1, _COUNT * _largest_llm("num_hidden_layers")),
    "num_attention_heads": Bound(int, 1, _COUNT * _largest_llm("num_attention_heads")),
    "num_key_value_heads": Bound(int, 1, _COUNT * _largest_llm("num_attention_heads")),
    "head_dim": Bound(int, 1, _COUNT * _largest_llm("head_dim")),
    "intermediate_size": Bound(int, 1, _COUNT * _largest_llm("intermediate_size")),
    "vocab_size": Bound(int, 1, _COUNT * _largest_llm("vocab_size")),
    "max_position_embeddings": Bound(int, 1, 1 << 22),
    "rope_theta": Bound(float, 0.0, 1e12, open_low=True),
    "rms_norm_eps": Bound(float, 0.0, 1.0, open_low=True),
    "scale_emb": Bound(float, 0.0, 1e4, open_low=True),
    "query_num": Bound(int, 1, lambda f: _COUNT * f.query_num),                   # 256 = MVE_MAX_QUERY_NUM
    "image_size": Bound(int, 1, 4096),
    "patch_size": Bound(int, 1, 64),
}
# config.json "vision_config"
VISION_BOUNDS: Mapping[str, Bound] = {
    "hidden_size": Bound(int, 1, _WIDTH * _largest_vision("hidden_size")),        # <= MVE_MAX_KV_DIM
    "num_hidden_layers": Bound(int, 1, _COUNT * _largest_vision("num_hidden_layers")),
    "num_attention_heads": Bound(int, 1, _COUNT * _largest_vision("num_attention_heads")),
    "intermediate_size": Bound(int, 1, _COUNT * _largest_vision("intermediate_size")),
    "patch_size": Bound(int, 1, 64),
    "image_size": Bound(int, 1, 4096),
    "layer_norm_eps": Bound(float, 0.0, 1.0, open_low=True),
}
# preprocessor_config.json, and config.json "slice_config"
PREPROCESS_BOUNDS: Mapping[str, Bound] = {
    "scale_resolution": Bound(int, 1, 4096),
    "patch_size": Bound(int, 1, 64),
    "max_slice_nums": Bound(int, 1, lambda f: _COUNT * f.max_slice_nums),
    "image_feature_size": Bound(int, 1, lambda f: _COUNT * f.query_num),
}
_POSITIVE = Bound(float, 0.0, 1e12, open_low=True)   # rope factors and thetas
TOKEN_ID_MAX = 2 ** 31 - 1
ROPE_FACTORS_MAX = 4096

TOKENIZER_JSON_BYTES = 128 * 2 ** 20
CHAT_TEMPLATE_BYTES = MAX_TEXT_BYTES


def _number_ok(value: Any, bound: Bound, facts: ModelFacts | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if bound.kind is int and not isinstance(value, int):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    low_ok = value > bound.low if bound.open_low else value >= bound.low
    return low_ok and value <= bound.top(facts)


def check_fields(obj: Mapping[str, Any], table: Mapping[str, Bound], facts: ModelFacts, path: Path,
                 where: str = "") -> None:
    """Every field of `table` that `obj` holds (not null) is a number of the right kind inside its bound."""
    for key, bound in table.items():
        value = obj.get(key)
        if value is None:
            continue
        if not _number_ok(value, bound, facts):
            low = f"({bound.low}" if bound.open_low else f"[{bound.low}"
            what = "int" if bound.kind is int else "a finite number"
            raise CheckpointError(path, f"expected {what} in {low}, {bound.top(facts)}], got {value!r}", where + key)


def _token_ids_ok(value: Any) -> bool:
    ids = value if isinstance(value, list) else [value]
    return len(ids) <= 64 and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= TOKEN_ID_MAX
                                  for i in ids)


def _finite_list(value: Any, low: float = -math.inf) -> bool:
    return (isinstance(value, list) and len(value) <= ROPE_FACTORS_MAX
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                    for v in value))


def check_rope(raw: Mapping[str, Any], path: Path, where: str = "") -> None:
    for key in ("rope_scaling", "rope_parameters"):
        scaling = raw.get(key)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            raise CheckpointError(path, "must be a JSON object or null", where + key)
        for name in ("rope_theta", "factor", "attention_factor"):
            value = scaling.get(name)
            if value is not None and not _number_ok(value, _POSITIVE, None):
                raise CheckpointError(path, f"{value!r} is not a finite positive number", f"{where}{key}.{name}")
        for name in ("short_factor", "long_factor"):
            value = scaling.get(name)
            if value is not None and not _finite_list(value, 0.0):
                raise CheckpointError(path, f"must be a list of at most {ROPE_FACTORS_MAX} finite positive "
                                      f"numbers", f"{where}{key}.{name}")
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype is not None and not isinstance(rtype, str):
            raise CheckpointError(path, f"{rtype!r} is not a string", f"{where}{key}.rope_type")


def check_config(raw: Mapping[str, Any], facts: ModelFacts, path: Path) -> None:
    """config.json: every number the reader sizes anything from, before it does."""
    check_fields(raw, LLM_BOUNDS, facts, path)
    check_rope(raw, path)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(key) is not None and not _token_ids_ok(raw[key]):
            raise CheckpointError(path, f"{raw[key]!r} is not a token id (or list of ids) in [0, {TOKEN_ID_MAX}]",
                                  key)
    text = raw.get("text_config")
    if isinstance(text, dict):
        check_fields(text, LLM_BOUNDS, facts, path, "text_config.")
        check_rope(text, path, "text_config.")
    vision = raw.get("vision_config")
    if isinstance(vision, dict):
        check_fields(vision, VISION_BOUNDS, facts, path, "vision_config.")
        size, patch = vision.get("image_size"), vision.get("patch_size")
        if isinstance(size, int) and isinstance(patch, int) and size < patch:
            raise CheckpointError(path, f"{size} is smaller than patch_size {patch} (no position table)",
                                  "vision_config.image_size")
    slices = raw.get("slice_config")
    if isinstance(slices, dict):
        check_fields(slices, PREPROCESS_BOUNDS, facts, path, "slice_config.")


def check_preprocessor(pre: Mapping[str, Any] | None, facts: ModelFacts, path: Path) -> None:
    """preprocessor_config.json: slice bounds and the normalisation constants."""
    if pre is None:
        return
    check_fields(pre, PREPROCESS_BOUNDS, facts, path)
    for key, low in (("norm_mean", -math.inf), ("norm_std", 0.0)):
        value = pre.get(key)
        if value is not None and not (_finite_list(value, low) and len(value) == 3):
            rule = "positive" if low == 0.0 else "finite"
            raise CheckpointError(path, f"must be a list of 3 {rule} numbers", key)


def check_weight_map(index: Mapping[str, Any], root: Path, index_path: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map: tensor name -> a plain .safetensors file name in the folder."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index_path, "missing or empty", "weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard \
                or shard in (".", "..") or "\\" in shard:
            raise CheckpointError(index_path, f"{str(shard)[:80]!r} is not a .safetensors file name in the "
                                  f"checkpoint folder", f"weight_map[{name[:80]!r}]")
    return weight_map


def _id_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKEN_ID_MAX


def read_tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json, bounded, with the parts the exporters use checked: model.vocab (token -> id), model.merges
    (strings or pairs of strings), added_tokens (objects with an integer id and a string content)."""
    data = read_json(path, error=CheckpointError, limit=TOKENIZER_JSON_BYTES)
    model = data.get("model")
    if model is None:
        model = data["model"] = {}
    if not isinstance(model, dict):
        raise CheckpointError(path, "must be a JSON object", "model")
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and not all(_id_ok(i) for i in vocab.values()):
        raise CheckpointError(path, f"every id must be an integer in [0, {TOKEN_ID_MAX}]", "model.vocab")
    merges = model.get("merges")
    if merges is not None and not (isinstance(merges, list) and all(
            isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m))
            for m in merges)):
        raise CheckpointError(path, "must be a list of \"a b\" strings or [a, b] pairs", "model.merges")
    added = data.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(e, dict) and _id_ok(e.get("id"))
                                              and isinstance(e.get("content"), str) for e in added):
        raise CheckpointError(path, "must be a list of objects with an integer id and a string content",
                              "added_tokens")
    return data


def check_tokenizer_config(cfg: Mapping[str, Any], path: Path) -> None:
    """tokenizer_config.json: added_tokens_decoder keys are ids, chat_template a string or named templates."""
    decoder = cfg.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict) or not all(
                k.isdigit() and len(k) <= 10 and isinstance(v, dict) and isinstance(v.get("content", ""), str)
                for k, v in decoder.items()):
            raise CheckpointError(path, "must map id strings to objects with a string content",
                                  "added_tokens_decoder")
    template = cfg.get("chat_template")
    if template is None or isinstance(template, str):
        return
    if not (isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template", ""), str)
                                               for t in template)):
        raise CheckpointError(path, "must be a string or a list of {name, template} objects", "chat_template")


def read_chat_template(path: Path) -> str:
    return read_text(path, CHAT_TEMPLATE_BYTES, error=CheckpointError)


__all__ = ["Bound", "LLM_BOUNDS", "VISION_BOUNDS", "PREPROCESS_BOUNDS", "check_fields", "check_config",
           "check_preprocessor", "check_rope", "check_weight_map", "read_tokenizer_json", "check_tokenizer_config",
           "read_chat_template"]
