"""Vision export: ONNX (fp32, fp16, int8 recipes, vision+resampler graph) against the torch reference, and the
CoreML packages' spec. Tiny synthetic checkpoints of 2.6 and 4.5; run with -s to see every measured number.

CoreML cannot predict on Linux: here the tests check the spec (inputs, outputs, shapes, op set, how weights
are stored). `test_coreml_prediction_matches_reference_on_macos` runs the packages and runs on macOS only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from minicpmv_edge.errors import MiniCPMVEdgeError
from minicpmv_edge.export import onnx_vision as OV
from minicpmv_edge.export.checkpoint import Checkpoint

VERSIONS = ("2.6", "4.5")
FP32_MIN_COS = 0.99999
FP16_MIN_COS = 0.9995
BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "bench_vision.json"


@pytest.fixture(scope="module", params=VERSIONS)
def exported(request, tiny_checkpoint, tmp_path_factory):
    """(ckpt, {(graph, precision): OnnxArtifact}): fp32/fp16 of the tower and of the vision+resampler graph,
    exported once per version."""
    ckpt = Checkpoint.open(tiny_checkpoint(request.param))
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    arts = OV.export_vision_onnx(ckpt, out, "tiny", precisions=("fp32", "fp16"), with_resampler=True)
    return ckpt, {(a.graph, a.precision): a for a in arts}


@pytest.fixture(scope="module")
def modules(exported):
    return OV.reference_modules(exported[0])


def _print_parity(label: str, par: dict, tol: float) -> None:
    print(f"\n[parity] {label} (per-row cosine vs torch, tolerance >= {tol}):")
    for g in par["grids"]:
        print(f"    grid {g['grid'][0]:>2}x{g['grid'][1]:<2}  min {g['min_cosine']:.8f}  mean {g['mean_cosine']:.8f}  "
              f"max|d| {g['max_abs']:.2e}")


@pytest.mark.parametrize("precision,tol", [("fp32", FP32_MIN_COS), ("fp16", FP16_MIN_COS)])
def test_onnx_tower_matches_reference_on_every_grid(exported, modules, precision, tol):
    ckpt, arts = exported
    par = OV.parity(arts[("vision", precision)].path, ckpt, OV.PARITY_GRIDS, modules=modules)
    _print_parity(f"{ckpt.version} vision {precision}", par, tol)
    assert len(par["grids"]) >= 6 and {(32, 32), (28, 40), (16, 70)} <= {tuple(g["grid"]) for g in par["grids"]}
    bad = [g for g in par["grids"] if g["min_cosine"] < tol]
    assert not bad, f"grids below {tol}: {bad}"


@pytest.mark.parametrize("precision,tol", [("fp32", FP32_MIN_COS), ("fp16", FP16_MIN_COS)])
def test_onnx_vision_resampler_graph_matches_reference(exported, modules, precision, tol):
    ckpt, arts = exported
    grids = ((32, 32), (28, 40), (16, 70), (25, 49), (1, 1), (5, 3))
    par = OV.parity(arts[("vision_resampler", precision)].path, ckpt, grids, modules=modules)
    _print_parity(f"{ckpt.version} vision+resampler {precision} ({ckpt.resampler.query_num} rows)", par, tol)
    assert par["graph"] == "vision_resampler"
    assert par["min_cosine"] >= tol
    if precision == "fp32":
        import onnx

        from minicpmv_edge.quantize.onnx_int8 import matmul_roles

        roles = list(matmul_roles(onnx.load(str(arts[("vision_resampler", "fp32")].path))).values())
        assert roles.count("resampler") >= 3 and roles.count("fc2") == ckpt.vision.num_hidden_layers


def test_onnx_graph_io_dynamic_dims_and_fusions(exported):
    import onnx

    ckpt, arts = exported
    layers = ckpt.vision.num_hidden_layers
    fp32 = onnx.load(str(arts[("vision", "fp32")].path))
    ins = {i.name: i.type.tensor_type for i in fp32.graph.input}
    assert list(ins) == ["pixel_values", "position_ids"]
    assert ins["pixel_values"].elem_type == onnx.TensorProto.FLOAT
    assert ins["position_ids"].elem_type == onnx.TensorProto.INT64
    px_dims = [d.dim_param or d.dim_value for d in ins["pixel_values"].shape.dim]
    id_dims = [d.dim_param or d.dim_value for d in ins["position_ids"].shape.dim]
    assert px_dims[:2] == [1, 3] and all(isinstance(d, str) for d in px_dims[2:]), px_dims
    assert id_dims == ["h", "w"]
    assert [o.name for o in fp32.graph.output] == ["patch_features"]
    # no arange/bucketize in the tower graph: the runtime computes the ids
    assert not {"Range", "Floor", "Div"} & {n.op_type for n in fp32.graph.node}
    fused = arts[("vision", "fp32")].fused
    at_load = OV.ort_session_fusions(arts[("vision", "fp32")].path)
    print(f"\n[fusions] {ckpt.version} fp32 file: {fused}; onnxruntime at load: {at_load}")
    assert fused.get("Attention") == layers and fused.get("FastGelu") == layers
    assert fused.get("SkipLayerNormalization", 0) >= 2 * layers
    assert "Softmax" not in arts[("vision", "fp32")].op_counts        # all attention is fused
    fp16 = onnx.load(str(arts[("vision", "fp16")].path))
    init_types = {onnx.TensorProto.DataType.Name(t.data_type) for t in fp16.graph.initializer}
    assert "FLOAT16" in init_types
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT   # float32 I/O kept
    casts = sum(n.op_type == "Cast" for n in fp16.graph.node)
    print(f"[fp16] {ckpt.version}: {casts} Cast nodes around {', '.join(OV.FP16_KEEP_FP32)} (kept fp32); "
          f"size {arts[('vision', 'fp16')].size} vs fp32 {arts[('vision', 'fp32')].size} bytes")
    assert arts[("vision", "fp16")].size < 0.6 * arts[("vision", "fp32")].size


def test_onnx_uses_the_bucket_ids_it_is_given(exported, modules):
    """25x49 is a grid where HF's float32 bucketing differs from floor(70 i / n): feeding floor ids must
    change the output, feeding the runtime's ids must match the reference (which reproduces HF)."""
    ckpt, arts = exported
    sess = OV.ort_session(arts[("vision", "fp32")].path)
    px = OV.random_slice(25, 49)
    feed = OV.slice_feed(px)
    floor_ids = (np.arange(25)[:, None] * 70 // 25) * 70 + (np.arange(49)[None, :] * 70 // 49)
    assert not np.array_equal(feed["position_ids"], floor_ids)
    want = OV.reference_output(modules[0], None, px)
    got = sess.run(None, feed)[0][0]
    wrong = sess.run(None, {**feed, "position_ids": floor_ids.astype(np.int64)})[0][0]
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(wrong - want).max() > 1e-3


def test_external_data_is_used_above_the_threshold(exported, tmp_path, monkeypatch):
    import onnx

    ckpt, arts = exported
    src = arts[("vision", "fp32")].path
    monkeypatch.setattr(OV, "EXTERNAL_DATA_THRESHOLD", 1000)          # pretend the tiny model is > 2 GB
    files = OV.save_onnx(onnx.load(str(src)), tmp_path / "big.onnx")
    assert [p.name for p in files] == ["big.onnx", "big.onnx.data"]
    assert files[1].stat().st_size > 10 * files[0].stat().st_size
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name], "temporary files left behind"
    par = OV.parity(files[0], ckpt, ((32, 32),))
    assert par["min_cosine"] >= FP32_MIN_COS
    monkeypatch.undo()
    again = OV.save_onnx(onnx.load(str(src)), tmp_path / "big.onnx")      # below the threshold: one file
    assert [p.name for p in again] == ["big.onnx"] and not (tmp_path / "big.onnx.data").exists()


# ---------------------------------------------------------------------------------------------- int8

@pytest.fixture(scope="module")
def ckpt45(tiny_checkpoint) -> Checkpoint:
    return Checkpoint.open(tiny_checkpoint("4.5"))


def test_int8_recipes_measured_and_recorded(ckpt45, tmp_path):
    import onnx

    from minicpmv_edge.quantize import onnx_int8 as Q

    ckpt = ckpt45
    modules = OV.reference_modules(ckpt)
    bases = {lvl: OV.export_onnx(ckpt, tmp_path / f"base-{lvl}.onnx", fuse=lvl).path
             for lvl in ("full", "no_attention")}
    n = ckpt.vision.num_hidden_layers
    for lvl, qkv in (("full", n), ("no_attention", 3 * n)):      # Attention nodes / separate q, k, v MatMuls
        roles = list(Q.matmul_roles(onnx.load(str(bases[lvl]))).values())
        assert {r: roles.count(r) for r in set(roles)} == {"qkv": qkv, "attn_out": n, "fc1": n, "fc2": n}, lvl
    print(f"\n[int8] {ckpt.version} tiny, random weights (harsher on int8 than trained ones): per-row cosine vs torch")
    results = {}
    for r in Q.RECIPES.values():
        art = Q.quantize_onnx(bases[r.base], tmp_path / f"{r.name}.onnx", r)
        par = OV.parity(art.path, ckpt, ((32, 32), (16, 70)), modules=modules)
        results[r.name] = par["min_cosine"]
        print(f"    {r.name:<18} min {par['min_cosine']:.6f}  mean {par['mean_cosine']:.6f}  "
              f"kernels {art.fused}")
        assert par["min_cosine"] >= 0.9, f"{r.name}: {par['min_cosine']}"
        assert art.precision == ("int8" if r.name == Q.DEFAULT_RECIPE else r.name)
        if r.method == "nbits":
            assert art.fused.get("MatMulNBits") == 6 * ckpt.vision.num_hidden_layers
        else:   # 7-bit weights: u8 x s8 pair sums (255*64*2 = 32640) fit the int16 of ORT's AVX2 GEMM on every CPU
            graph = onnx.load(str(art.path)).graph
            inits = {t.name: t for t in graph.initializer}
            weights = [onnx.numpy_helper.to_array(inits[node.input[1]]) for node in graph.node
                       if node.op_type in ("MatMulInteger", "QAttention")]
            assert len(weights) == n * len({"qkv", "attn_out", "fc1", "fc2"} - set(r.keep_fp32))
            assert all(w.dtype == np.int8 for w in weights), r.name
            assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64, r.name
    with pytest.raises(MiniCPMVEdgeError, match="fuse='no_attention'"):
        Q.quantize_onnx(bases["full"], tmp_path / "x.onnx", "w8-b128")

    # the recorded table (bench/bench_vision.py at SigLIP-400M dims) has a row for every recipe
    table = json.loads(BENCH_RESULTS.read_text())
    names = [row["name"] for row in table["rows"]]
    for r in Q.RECIPES:
        assert any(n.startswith(f"ORT {r}") and n[len(f"ORT {r}"):][:1] in ("", " ") for n in names), r
    for needed in ("torch eager fp32", "ORT fp32 (Attention+SkipLN+FastGelu)", "ORT fp16 (LN/softmax fp32)"):
        assert needed in names
    assert table["default_recipe"] == Q.DEFAULT_RECIPE
    default = next(row for row in table["rows"] if row["name"] == f"ORT {Q.DEFAULT_RECIPE}")
    print(f"[int8] recorded default ({Q.DEFAULT_RECIPE}) at SigLIP-400M dims: cos min {default['cos_min']:.5f}, "
          f"{default['median']:.2f} s")


# ---------------------------------------------------------------------------------------------- CoreML

@pytest.fixture(scope="module")
def coreml(tiny_checkpoint, tmp_path_factory):
    from minicpmv_edge.export import coreml_vision as CV
    from minicpmv_edge.quantize import coreml_compress as CC

    ckpt = Checkpoint.open(tiny_checkpoint("4.5"))
    out = tmp_path_factory.mktemp("coreml")
    arts = {"fp16": CV.export_vision_coreml(ckpt, out, "tiny")}
    arts.update({a.precision: a for a in CC.compress_vision_coreml(ckpt, out, "tiny", variants=("w8", "p4", "w4"),
                                                                   base=arts["fp16"])})
    return ckpt, arts


ALLOWED_OPS = {"const", "cast", "conv", "reshape", "gather", "expand_dims", "transpose", "add", "mul",
               "layer_norm", "linear", "matmul", "softmax", "gelu", "constexpr_affine_dequantize",
               "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}


def test_coreml_packages_spec(coreml):
    from minicpmv_edge.export import coreml_vision as CV

    ckpt, arts = coreml
    n = ckpt.vision.num_hidden_layers
    expect_weights = {
        "fp16": ("float16", 6 * n + 1),
        "w8": ("constexpr_affine_dequantize:quantized_data=int8,scale=float16,zero_point=int8", 6 * n + 1),
        "p4": ("constexpr_lut_to_dense:indices=uint8,lut=float16[16]", 6 * n + 1),
        # int4 blocks of 16 along the input axis: the patch conv's 3*14*14 = 588 inputs do not split, stays fp16
        "w4": ("constexpr_blockwise_shift_scale:data=int4,scale=float16", 6 * n),
    }
    spec_version = {"iOS17": 8, "iOS18": 9}
    print()
    for precision, art in arts.items():
        info = CV.inspect_mlpackage(art.path)
        print(f"[coreml] {precision}: {info['size']} bytes, target {art.target} (spec {info['specification_version']},"
              f" {info['opset']}), linear/conv weights {info['weights']}")
        assert info["specification_version"] == spec_version[art.target]
        px, ids = info["inputs"]["pixel_values"], info["inputs"]["position_ids"]
        assert px["dtype"] == "float32" and ids["dtype"] == "int32"
        assert px["range"] == [[1, 1], [3, 3], [14, 14 * CV.MAX_SIDE], [14, 14 * CV.MAX_SIDE]]
        assert ids["range"] == [[1, CV.MAX_SIDE], [1, CV.MAX_SIDE]]
        assert info["outputs"] == {"patch_features": {"dtype": "float32"}}
        assert set(info["ops"]) <= ALLOWED_OPS, set(info["ops"]) - ALLOWED_OPS
        assert info["ops"]["linear"] == 6 * n and info["ops"]["conv"] == 1
        assert info["ops"]["layer_norm"] == 2 * n + 1 and info["ops"]["softmax"] == n
        # SigLIP's gelu_pytorch_tanh stays tanh (coremltools 9 alone made it EXACT, see coreml_vision.py)
        assert info["gelu_modes"] == {"TANH_APPROXIMATION": n}
        stored, count = expect_weights[precision]
        assert info["weights"].get(stored) == count, info["weights"]
        assert info["metadata"]["minicpmv_edge.shapes"] == "range"
    assert arts["w4"].target == "iOS18" and arts["p4"].target == "iOS17"
    # smaller than fp16 by more than the 4900-row fp16 position table, which is not compressed
    table = ckpt.vision.num_patches_per_side ** 2 * ckpt.vision.hidden_size * 2
    for v in ("w8", "p4", "w4"):
        assert arts[v].size - table < 0.8 * (arts["fp16"].size - table), v


def test_coreml_enumerated_shapes_cover_the_slicer(tiny_checkpoint, tmp_path):
    from PIL import Image

    from minicpmv_edge.export import coreml_vision as CV
    from minicpmv_edge.runtime.preprocess import preprocess_image

    grids = CV.slicer_grids()
    assert (32, 32) == grids[0] and len(grids) == len(set(grids))
    rng = np.random.default_rng(0)
    for _ in range(30):                                   # random images within 1:4..4:1
        w = int(rng.integers(40, 1800))
        h = int(np.clip(w * np.exp(rng.uniform(-np.log(4), np.log(4))), 10, 3600))
        if not 0.25 <= w / h <= 4:
            continue
        for s in preprocess_image(Image.new("RGB", (w, h))).slices:
            assert tuple(s.tgt_size) in grids, f"{w}x{h} gives a {s.tgt_size} slice"
    art = CV.export_vision_coreml(Checkpoint.open(tiny_checkpoint("4.5")), tmp_path, "tiny", shapes="enumerated")
    info = CV.inspect_mlpackage(art.path)
    print(f"\n[coreml] enumerated: {len(grids)} grids, target {art.target}")
    assert art.target == "iOS18"
    assert [tuple(s[2:]) for s in info["inputs"]["pixel_values"]["enumerated"]] == [(14 * h, 14 * w) for h, w in grids]
    assert [tuple(s) for s in info["inputs"]["position_ids"]["enumerated"]] == list(grids)
    with pytest.raises(MiniCPMVEdgeError, match="iOS18"):
        CV.convert_coreml(Checkpoint.open(tiny_checkpoint("4.5")), shapes="enumerated", grids=[(32, 32)],
                          target="iOS17")


@pytest.mark.skipif(sys.platform != "darwin",
                    reason="CoreML prediction exists on macOS only; on Linux the spec is checked instead")
def test_coreml_prediction_matches_reference_on_macos(coreml):
    from minicpmv_edge.export.coreml_vision import parity_coreml

    ckpt, arts = coreml
    for precision, tol in (("fp16", FP16_MIN_COS), ("w8", 0.99), ("p4", 0.9), ("w4", 0.9)):
        par = parity_coreml(arts[precision].path, ckpt, ((32, 32), (28, 40), (16, 70)))
        _print_parity(f"coreml {precision}", par, tol)
        assert par["min_cosine"] >= tol
