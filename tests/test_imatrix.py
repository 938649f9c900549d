"""Importance matrix from image+text prompts (quantize/imatrix.py) and mixed recipes (quantize/gguf_ladder.py),
on a tiny synthetic model: the statistic checked against an independent numpy computation, the file format
round trip, and llama.cpp's quantizer really using it."""
from __future__ import annotations

import re

import gguf
import numpy as np
import pytest

from minicpmv_edge.runtime.bundle import FileKind

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.quantize.gguf_ladder import RECIPES, Recipe, quantize_gguf
from minicpmv_edge.quantize.imatrix import (Imatrix, ImatrixCollector, builtin_calibration, compute_imatrix,
                                            folder_calibration, session_from_files)

MATMUL_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.workflows.pipeline import export_checkpoint
    out = tmp_path_factory.mktemp("imatrix")
    res = export_checkpoint(tiny_checkpoint("4.5"), out, llm_types=["F16"], mmproj_types=[], vision_types=["fp32"],
                            resampler_types=["f32"], name="m", bundle=False)
    ckpt = Checkpoint.open(tiny_checkpoint("4.5"))
    opener = lambda cb: session_from_files(ckpt, res.path(FileKind.LLM_GGUF, "F16"), res.path(FileKind.VISION_ONNX, "fp32"),   # noqa: E731
                                           res.path(FileKind.RESAMPLER_WEIGHTS, "f32"), 2, eval_callback=cb)
    prompts = builtin_calibration(n=4)
    image = compute_imatrix(opener, prompts, text_only=False, datasets=["builtin"], answer_tokens=4)
    text = compute_imatrix(opener, prompts, text_only=True, datasets=["builtin"], answer_tokens=4)
    return {"dir": out, "f16": res.path(FileKind.LLM_GGUF, "F16"), "ckpt": ckpt, "open": opener, "image": image, "text": text}


def _gguf_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_statistic_matches_numpy_on_known_inputs(files):
    """blk.0.attn_q's input is RMSNorm(token embedding) * attn_norm: computed here from the GGUF's own tensors,
    the collector's per-column sum of squares must match it, and every matmul weight must count every token."""
    from minicpmv_edge.runtime.decoder import Decoder
    tensors = _gguf_tensors(files["f16"])
    reader = gguf.GGUFReader(str(files["f16"]))
    eps = float(next(f.contents() for k, f in reader.fields.items() if k.endswith("layer_norm_rms_epsilon")))
    coll = ImatrixCollector()
    with Decoder(files["f16"], eval_callback=coll.callback, exact=True) as dec:
        ids = dec.tokenize("A bar chart with five bars; the tallest is C.", add_special=False)
        dec.prefill([ids], all_outputs=True)
        coll.raise_if_failed()
    emb = np.array(tensors["token_embd.weight"].data, dtype=np.float32)[ids]
    g = np.array(tensors["blk.0.attn_norm.weight"].data, dtype=np.float32)
    x = emb / np.sqrt((emb.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * g
    want = (x.astype(np.float64) ** 2).sum(0)
    got = coll.sums["blk.0.attn_q.weight"]
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\nblk.0.attn_q in_sum2 vs numpy: max relative error {rel:.2e} over {len(ids)} tokens (tolerance 1e-4)")
    assert rel < 1e-4
    n_layer = 2
    want_names = {f"blk.{i}.{w}.weight" for i in range(n_layer) for w in MATMUL_WEIGHTS}
    assert set(coll.sums) == want_names
    assert set(coll.counts.values()) == {len(ids)}
    for name, s in coll.sums.items():    # each weight's statistic is as wide as its input
        assert s.shape == (tensors[name].shape[0],), name


def test_image_and_text_calibration_differ_and_round_trip(files, tmp_path):
    image, text = files["image"], files["text"]
    assert set(image.sums) == set(text.sums) and image.chunk_count == text.chunk_count == 4
    # the image prompts put 64 embedding rows per slice through the LLM; the captions are shorter
    assert image.counts["blk.0.attn_q.weight"][0] > text.counts["blk.0.attn_q.weight"][0]
    a, b = image.importance()["blk.1.ffn_down.weight"], text.importance()["blk.1.ffn_down.weight"]
    assert not np.allclose(a, b, rtol=1e-3)
    assert image.datasets == ["builtin:image+text"] and text.datasets == ["builtin:text"]
    path = image.save(tmp_path / "im.gguf")
    back = Imatrix.load(path)
    assert back.datasets == image.datasets and back.chunk_count == 4 and back.chunk_size == image.chunk_size
    for name in image.sums:
        np.testing.assert_allclose(back.sums[name], image.sums[name], rtol=1e-6)
        assert back.counts[name].tolist() == image.counts[name].tolist()
    r = gguf.GGUFReader(str(path))
    assert r.get_field("general.type").contents() == "imatrix" and "general.architecture" not in r.fields
    assert {t.name for t in r.tensors} == {f"{n}{s}" for n in image.sums for s in (".in_sum2", ".counts")}


@pytest.mark.parametrize("qtype", ["Q2_K", "IQ4_XS", "Q4_K_M"])
def test_quantizer_uses_the_imatrix(files, tmp_path, qtype):
    """With the imatrix, llama.cpp writes different blocks, and the importance-weighted rounding error (what the
    imatrix asks the quantizer to minimise) drops compared with the same type without it."""
    im = files["image"]
    plain = quantize_gguf(files["f16"], tmp_path / f"plain-{qtype}.gguf", qtype)
    weighted = quantize_gguf(files["f16"], tmp_path / f"imat-{qtype}.gguf", qtype,
                             imatrix=im.save(tmp_path / "im.gguf"))
    assert plain.imatrix_entries == 0 and weighted.imatrix_entries == len(im.sums)
    assert plain.tensor_types == weighted.tensor_types
    src, a, b = (_gguf_tensors(p) for p in (files["f16"], plain.path, weighted.path))
    imp = im.importance()
    changed, err_plain, err_imat = 0, 0.0, 0.0
    for name, w in imp.items():
        ta, tb = a[name], b[name]
        if ta.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            continue
        changed += not np.array_equal(np.asarray(ta.data), np.asarray(tb.data))
        ref = np.array(src[name].data, dtype=np.float32)
        for t, acc in ((ta, "p"), (tb, "i")):
            deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
            e = float((((deq - ref) ** 2) * w).sum())
            if acc == "p":
                err_plain += e
            else:
                err_imat += e
    print(f"\n{qtype}: {changed}/{len(imp)} tensors changed; importance-weighted error {err_plain:.4g} -> "
          f"{err_imat:.4g} with the imatrix")
    assert changed >= len(imp) // 2
    assert err_imat < err_plain


def test_imatrix_errors_are_one_line(files, tmp_path):
    with pytest.raises(MiniCPMVEdgeError, match="general.type is not 'imatrix'"):
        Imatrix.load(files["f16"])
    with pytest.raises(MiniCPMVEdgeError, match="file not found"):
        Imatrix.load(tmp_path / "nope.gguf")
    # an imatrix made for another model: llama.cpp refuses it, we say so and leave no partial file
    im = files["image"]
    wrong = Imatrix({k: np.ones((1, v.shape[1] + 1)) for k, v in im.sums.items()}, dict(im.counts), ["x"], 1, 1)
    with pytest.raises(MiniCPMVEdgeError, match="could not quantize"):
        quantize_gguf(files["f16"], tmp_path / "bad.gguf", "Q4_K_M", imatrix=wrong)
    assert not list(tmp_path.glob("bad.gguf*"))
    bad = tmp_path / "calib"
    bad.mkdir()
    with pytest.raises(MiniCPMVEdgeError, match="no images or .txt prompts"):
        folder_calibration(bad)


def test_cli_on_a_bundle_with_a_user_folder(tiny_bundle, tmp_path, capsys):
    """`minicpmv-edge imatrix BUNDLE --calib builtin --calib DIR` writes a file the exporter then quantizes with."""
    from PIL import Image

    from minicpmv_edge.cli import main
    calib = tmp_path / "calib"
    calib.mkdir()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(calib / "red.png")
    (calib / "red.txt").write_text("What colour is this?\nIs it a square?\n")
    (calib / "notes.txt").write_text("A plain text calibration prompt about invoices.")
    prompts = folder_calibration(calib)
    assert [(p.image is not None, p.question) for p in prompts] == [
        (True, "What colour is this?"), (True, "Is it a square?"), (False, "A plain text calibration prompt about invoices.")]
    out = tmp_path / "im.gguf"
    assert main(["imatrix", str(tiny_bundle("4.5")), "--calib", str(calib), "--out", str(out),
                 "--answer-tokens", "2", "--threads", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    im = Imatrix.load(out)
    assert im.chunk_count == 3 and im.datasets == [f"{calib}:image+text"]
    assert main(["imatrix", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "not a checkpoint or bundle folder" in capsys.readouterr().err


def test_export_with_imatrix_and_recipe(tiny_checkpoint, files, tmp_path):
    """`export --imatrix` reaches the quantizer; a mixed recipe's overrides show in the tensor-type table."""
    from minicpmv_edge.workflows.pipeline import export_checkpoint
    path = files["image"].save(tmp_path / "im.gguf")
    plain = export_checkpoint(tiny_checkpoint("4.5"), tmp_path / "a", llm_types=["Q4_K_M"], mmproj_types=[],
                              bundle=False, name="m")
    imat = export_checkpoint(tiny_checkpoint("4.5"), tmp_path / "b", llm_types=["Q4_K_M", "Q4_K_HI"], mmproj_types=[],
                             bundle=False, name="m", imatrix=path)
    assert plain.path(FileKind.LLM_GGUF, "Q4_K_M").read_bytes() != imat.path(FileKind.LLM_GGUF, "Q4_K_M").read_bytes()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(imat.path(FileKind.LLM_GGUF, "Q4_K_HI"))).tensors}
    recipe = RECIPES["Q4_K_HI"]
    assert types["output.weight"] == recipe.output and types["token_embd.weight"] == recipe.token_embd
    # two blocks in the tiny model: both are "ends", so every block matmul weight takes the ends type
    assert {types[f"blk.{i}.{w}.weight"] for i in range(2) for w in MATMUL_WEIGHTS} == {recipe.ends}
    assert any(n.startswith("Q4_K_HI: tensor types") for n in imat.notes), imat.notes
    assert not any("outside the tested ladder" in n for n in imat.notes)


def test_recipe_overrides_pick_first_and_last_blocks(files, tmp_path):
    r = Recipe("X", "Q4_K_M", ends="Q6_K", n_ends=2)
    [(pattern, t)] = r.overrides(36)
    hit = {i for i in range(36) if re.search(pattern, f"blk.{i}.ffn_down.weight")}
    assert hit == {0, 1, 34, 35} and t == "Q6_K"
    assert not re.search(pattern, "blk.10.attn_q.weight") and not re.search(pattern, "output.weight")
    assert Recipe("Y", "Q4_K_M").overrides(36) == []
    with pytest.raises(MiniCPMVEdgeError, match="unknown ggml tensor type"):
        quantize_gguf(files["f16"], tmp_path / "z.gguf", Recipe("Z", "Q4_K_M", output="Q9_Z"))
