"""The GGUF quantization ladder, through llama.cpp's own quantizer (`llama_model_quantize`).

One F16 GGUF in, one file per type out, named the llama.cpp/ollama way (`<name>-Q4_K_M.gguf`).
After each file is written we read it back and report which ggml type every tensor got: llama.cpp
silently falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, ...) when a row is not a multiple of the K-quant
block (256), which is exactly what happens on tiny test models, so the report shows it.

Two knobs on top of the plain types: an importance matrix (quantize/imatrix.py; llama.cpp weighs each column's
rounding error by it) and named mixed recipes (`RECIPES`): a base type with per-tensor overrides, e.g. the
embeddings, the output head and the first/last blocks kept at a higher type. Both go through the quantizer's
C parameters (`imatrix`, `output_tensor_type`, `token_embedding_type`, `tt_overrides`).
"""
from __future__ import annotations

import ctypes
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from minicpmv_edge.errors import MiniCPMVEdgeError

# The sizes users pick from, smallest first. F16/BF16/F32 are written by the exporter directly.
LADDER = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "IQ4_NL", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class Recipe:
    """A base llama.cpp type plus per-tensor type overrides. `ends` applies to the first and last `n_ends`
    transformer blocks; `output` / `token_embd` to the head and the embedding table."""
    name: str
    base: str
    output: str | None = None
    token_embd: str | None = None
    ends: str | None = None
    n_ends: int = 2
    note: str = ""

    def overrides(self, n_layer: int) -> list[tuple[str, str]]:
        """(regex on tensor names, ggml type) pairs for llama.cpp's `tt_overrides`."""
        if not self.ends or n_layer <= 0:
            return []
        blocks = sorted(set(range(min(self.n_ends, n_layer))) | set(range(max(n_layer - self.n_ends, 0), n_layer)))
        return [(rf"^blk\.({'|'.join(map(str, blocks))})\.", self.ends)]

    @property
    def types(self) -> set[str]:
        return {t for t in (self.output, self.token_embd, self.ends) if t}


# Named mixed recipes, usable wherever a ladder type is (`export --llm Q4_K_HI`). The ends of the stack and the
# embeddings are where low-bit error hurts most (llama.cpp's own K_M mixes already bump some of them).
RECIPES = {r.name: r for r in (
    Recipe("Q2_K_HI", "Q2_K", output="Q6_K", token_embd="Q4_K", ends="Q4_K",
           note="Q2_K; head Q6_K, embeddings and first/last 2 blocks Q4_K"),
    Recipe("Q3_K_HI", "Q3_K_M", output="Q6_K", token_embd="Q5_K", ends="Q5_K",
           note="Q3_K_M; head Q6_K, embeddings and first/last 2 blocks Q5_K"),
    Recipe("Q4_K_HI", "Q4_K_M", output="Q8_0", token_embd="Q6_K", ends="Q6_K",
           note="Q4_K_M; head Q8_0, embeddings and first/last 2 blocks Q6_K"),
)}


def _ggml_type(name: str) -> int:
    try:
        return int(gguf.GGMLQuantizationType[name])
    except KeyError:
        raise MiniCPMVEdgeError(f"unknown ggml tensor type {name!r}") from None


def llama_ftype(qtype: str) -> int:
    import llama_cpp
    qtype = RECIPES[qtype].base if qtype in RECIPES else qtype
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if value is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise MiniCPMVEdgeError(f"unknown quantization type {qtype!r}; llama.cpp knows: {', '.join(known)}")
    return int(value)


@dataclass
class QuantReport:
    qtype: str
    path: Path
    file_bytes: int
    n_params: int
    tensor_types: dict[str, int] = field(default_factory=dict)   # ggml type -> number of tensors
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    imatrix_entries: int = 0                                      # weights the importance matrix covered
    recipe: Recipe | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * sum(self.bytes_by_type.values()) / max(self.n_params, 1)

    @property
    def fallback_types(self) -> dict[str, int]:
        """Tensor types llama.cpp used that the requested type does not call for. K-quants need rows that
        are a multiple of 256; otherwise llama.cpp picks Q5_0 / Q5_1 / Q8_0 / IQ4_NL for those tensors."""
        recipe = self.recipe
        base = recipe.base if recipe else self.qtype
        expected = set(_K_FAMILY) if "_K" in base else {base, "Q6_K", "Q8_0"}
        expected |= {"F32", "F16", "BF16"} | (recipe.types if recipe else set())
        return {t: n for t, n in self.tensor_types.items() if t not in expected}


_K_FAMILY = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def describe_gguf(path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """(tensor count by ggml type, bytes by type, parameter count) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    params = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] += 1
        sizes[name] += int(t.n_bytes)
        params += int(t.n_elements)
    return dict(counts), dict(sizes), params


def _block_count(path: Path) -> int:
    reader = gguf.GGUFReader(str(path))
    for key, f in reader.fields.items():
        if key.endswith(".block_count"):
            return int(f.contents())
    raise MiniCPMVEdgeError(f"{path}: no <arch>.block_count key")


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str | Recipe, *, nthread: int | None = None,
                  imatrix=None) -> QuantReport:
    """Quantize `src` (F16/BF16/F32 GGUF) to `qtype` (a llama.cpp type or a `RECIPES` name) at `dst`; temporary
    name until complete. `imatrix`: an `Imatrix` or the path of an imatrix GGUF (quantize/imatrix.py)."""
    import llama_cpp

    from minicpmv_edge.runtime import llamacpp_log
    llamacpp_log.install()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MiniCPMVEdgeError(f"{src}: file not found")
    recipe = qtype if isinstance(qtype, Recipe) else RECIPES.get(qtype)
    qtype = recipe.name if recipe else qtype
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(recipe.base if recipe else qtype)
    params.nthread = nthread or os.cpu_count() or 1
    keep = []   # ctypes arrays the C call points into: alive until it returns
    if recipe is not None:
        if recipe.output:
            params.output_tensor_type = _ggml_type(recipe.output)
        if recipe.token_embd:
            params.token_embedding_type = _ggml_type(recipe.token_embd)
        pairs = recipe.overrides(_block_count(src))
        if pairs:
            tt = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
            for i, (pattern, t) in enumerate(pairs):
                tt[i].pattern, tt[i].type = pattern.encode(), _ggml_type(t)
            params.tt_overrides, keep = tt, keep + [tt]
    entries = 0
    if imatrix is not None:
        from minicpmv_edge.quantize.imatrix import Imatrix
        im = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
        values = im.importance()
        arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()   # NULL-name terminated
        for i, (name, v) in enumerate(values.items()):
            arr[i].name, arr[i].data, arr[i].size = name.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        params.imatrix, keep, entries = arr, keep + [arr, values], len(values)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise MiniCPMVEdgeError(llamacpp_log.explain(
                f"llama.cpp could not quantize {src.name} to {qtype} (code {rc})"))
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    del keep
    counts, sizes, n_params = describe_gguf(dst)
    return QuantReport(qtype, dst, dst.stat().st_size, n_params, counts, sizes, entries, recipe)


def ladder_name(stem: str, qtype: str) -> str:
    """llama.cpp / ollama file naming: `<name>-Q4_K_M.gguf`."""
    return f"{stem}-{qtype}.gguf"
