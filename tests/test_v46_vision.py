"""MiniCPM-V 4.6 vision side against transformers' own MiniCPMV4_6ForConditionalGeneration (tests/v46_reference.py):
the checkpoint reader, our export module, the ONNX graphs (fp32 / fp16 / int8, "16x" and "4x") and the
llama.cpp `minicpmv4_6` mmproj. The reference is random-initialised from a small config, never our own code.

Grids: the 8 shapes the other versions test (onnx_vision.PARITY_GRIDS), snapped to whole merge blocks
(`merger_parity_grids`: multiples of 4 in "16x", of 2 in "4x"), since a 4.6 slice must hold whole 2x2(x2) blocks.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from minicpmv_edge.errors import CheckpointError, MiniCPMVEdgeError
from minicpmv_edge.facts import MODEL_FACTS

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.models.minicpmv4_6")
from v46_reference import image_features  # noqa: E402

from minicpmv_edge.export import onnx_vision as ov  # noqa: E402
from minicpmv_edge.export.merger_tower import MergerCheckpoint, MergerSliceModel  # noqa: E402
from minicpmv_edge.runtime.preprocess import vision_position_ids  # noqa: E402

FACTS = MODEL_FACTS["4.6"]
MODES = ("16x", "4x")
# cosine per token row vs transformers (the bar), per precision
LIMITS = {"fp32": 0.99999, "fp16": 0.9995}
# int8 (dynamic, per channel) on random weights: a floor, as for the other versions (bench/README)
INT8_LIMIT = 0.99


def _grids(mode: str):
    return ov.merger_parity_grids(FACTS.downsample_side(mode))


def _slices(mode: str, seed: int = 0):
    return [ov.random_slice(h, w, 14, seed) for h, w in _grids(mode)]


@pytest.fixture(scope="module")
def ckpt(v46_reference):
    return MergerCheckpoint.open(v46_reference[1])


@pytest.fixture(scope="module")
def reference_features(v46_reference):
    """transformers get_image_features for all 8 slices of a mode in ONE packed call (its cu_seqlens path)."""
    model = v46_reference[0]
    return {mode: image_features(model, _slices(mode), mode) for mode in MODES}


@pytest.fixture(scope="module")
def onnx_files(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("v46-onnx")
    arts = ov.export_vision_onnx(ckpt, out, "tiny46", precisions=("fp32", "fp16"))
    return {(a.graph, a.precision): a for a in arts}


def _cos(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    assert got.shape == want.shape, (got.shape, want.shape)
    return ov.cosine_rows(got, want)


def test_reader_reads_the_transformers_layout(ckpt, v46_reference):
    model = v46_reference[0]
    v = ckpt.vision
    assert ckpt.facts.version == "4.6" and v.insert_layer_id == model.config.insert_layer_id
    assert (v.hidden_size, v.llm_hidden_size) == (64, 256) and v.num_patches_per_side == 70
    assert len(ckpt.names()) == len([n for n, _ in model.named_parameters()
                                     if n.startswith(("model.vision_tower.", "model.merger."))])


def test_bad_checkpoints_get_clear_errors(v46_reference, tmp_path):
    from minicpmv_edge.export.safetensors_io import TensorSpec, load_tensor, read_header, write_safetensors

    src = v46_reference[1]

    def copy(name: str):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = copy("missing-merger")                                 # drop one merger tensor
    infos = read_header(src / "model.safetensors")           # read from the original, rewrite the copy
    keep = [TensorSpec(n, i.shape, i.dtype, lambda i=i: [load_tensor(i)]) for n, i in infos.items()
            if n != "model.merger.mlp.0.linear_2.weight"]
    write_safetensors(d / "model.safetensors", keep)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.merger\.mlp\.0\.linear_2\.weight"):
        MergerCheckpoint.open(d)

    for field, value, pattern in [("hidden_size", "256", r"text_config\.hidden_size: expected int"),
                                  ("hidden_size", 128, r"model\.merger\.mlp\.0\.linear_2\.weight has shape")]:
        d = copy(f"bad-{field}-{value}")
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"][field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=pattern):
            MergerCheckpoint.open(d)
    d = copy("bad-insert")
    cfg = json.loads((d / "config.json").read_text())
    cfg["insert_layer_id"] = 9
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="insert_layer_id: 9 is not a layer"):
        MergerCheckpoint.open(d)


@pytest.mark.parametrize("mode", MODES)
def test_torch_module_matches_transformers(ckpt, reference_features, mode):
    model = MergerSliceModel(ckpt, mode)
    worst = 1.0
    for (h, w), px, want in zip(_grids(mode), _slices(mode), reference_features[mode]):
        ids = vision_position_ids(h, w, 70, FACTS.vision_position_ids).reshape(h, w)
        with torch.no_grad():
            got = model(torch.from_numpy(px[None]), torch.from_numpy(ids))[0].numpy()
        assert got.shape == (h * w // FACTS.downsample_side(mode) ** 2, 256)
        worst = min(worst, float(_cos(got, want).min()))
    print(f"\n[4.6 {mode}] torch export module vs transformers get_image_features: min cosine {worst:.9f}")
    assert worst >= 0.999999


@pytest.mark.parametrize("mode", MODES)
def test_onnx_matches_transformers(onnx_files, reference_features, mode):
    """The issue's bar: per slice, cosine >= 0.99999 (fp32), >= 0.9995 (fp16), over the 8 grid shapes."""
    graph = ov.MERGER_GRAPHS[mode]
    lines = []
    for precision, limit in LIMITS.items():
        art = onnx_files[(graph, precision)]
        assert art.path.name == f"vision-merger-{mode}-tiny46-{precision}.onnx"
        sess = ov.ort_session(art.path)
        assert ov.graph_of(sess) == graph
        for (h, w), px, want in zip(_grids(mode), _slices(mode), reference_features[mode]):
            got = sess.run(None, ov.slice_feed(px, 14, 70, FACTS.vision_position_ids))[0][0]
            cos = _cos(got, want)
            rel = float(np.abs(got - want).max() / np.abs(want).max())
            lines.append(f"{precision} {h}x{w}: min {cos.min():.8f} mean {cos.mean():.8f}, max|diff|/max|ref| {rel:.1e}")
            assert cos.min() >= limit, (precision, h, w, float(cos.min()))
    print(f"\n[4.6 {mode}] ONNX vs transformers get_image_features, cosine per token row:\n  " + "\n  ".join(lines))


def test_onnx_metadata_and_dynamic_shapes(onnx_files):
    import onnx

    for (graph, precision), art in onnx_files.items():
        m = onnx.load(str(art.path), load_external_data=False)
        assert ov.graph_of(m) == graph
        out = m.graph.output[0]
        assert out.name == "image_embeds"
        assert out.type.tensor_type.shape.dim[1].dim_param == "n_tokens"
        assert art.fused.get("LayerNormalization", 0) + art.fused.get("SkipLayerNormalization", 0) > 0
    # a slice that is not whole merge blocks is refused by the graph, not silently mis-merged
    sess = ov.ort_session(onnx_files[("vision_merger_16x", "fp32")].path)
    with pytest.raises(Exception):
        sess.run(None, ov.slice_feed(ov.random_slice(6, 8), 14, 70, "nearest"))


def test_int8_and_export_parity(ckpt, onnx_files, reference_features, tmp_path):
    from minicpmv_edge.quantize.onnx_int8 import matmul_roles, quantize_vision_onnx

    import onnx

    base = onnx_files[("vision_merger_16x", "fp32")]
    roles = list(matmul_roles(onnx.load(str(base.path))).values())
    # every tower layer keeps its roles (the merger MLPs in between do not end the tower)
    assert roles.count("fc1") == roles.count("fc2") == ckpt.vision.num_hidden_layers and "resampler" not in roles
    arts = quantize_vision_onnx(ckpt, tmp_path, "tiny46", recipes=["int8"], graphs=["vision_merger_16x"],
                                reuse=[base])
    assert arts[0].path.name == "vision-merger-16x-tiny46-int8.onnx" and arts[0].graph == "vision_merger_16x"
    # the 4 merger Linears (2 window merger, 2 final merger; Gemm in the export) stay fp32 MatMuls, the tower's
    # Linears are quantized
    q = onnx.load(str(arts[0].path))
    weights = {t.name for t in q.graph.initializer}
    fp32_linears = [n for n in q.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert base.op_counts.get("Gemm") == 4 and len(fp32_linears) == 4
    assert arts[0].op_counts.get("MatMulInteger", 0) >= 4 * ckpt.vision.num_hidden_layers
    sess = ov.ort_session(arts[0].path)
    worst = min(float(_cos(sess.run(None, ov.slice_feed(px, 14, 70, "nearest"))[0][0], want).min())
                for px, want in zip(_slices("16x"), reference_features["16x"]))
    print(f"\n[4.6 16x] int8 (dyn-pc) ONNX vs transformers: min cosine {worst:.6f} (floor {INT8_LIMIT})")
    assert worst >= INT8_LIMIT
    # the library's own bundle check (ONNX vs our torch module) agrees
    rep = ov.parity(base.path, ckpt, _grids("16x"))
    assert rep["graph"] == "vision_merger_16x" and rep["min_cosine"] >= 0.99999
    with pytest.raises(MiniCPMVEdgeError, match="does not fit this checkpoint"):
        ov.export_onnx(ckpt, tmp_path / "x.onnx", graph="vision")


# ------------------------------------------------------------------------------------------------ mmproj

def _field(reader, key):
    f = reader.fields[key]
    if f.types[0].name == "STRING":
        return bytes(f.parts[-1]).decode()
    if f.types[0].name == "ARRAY":
        return [int(f.parts[i][0]) for i in f.data]
    return f.parts[-1][0].item()


@pytest.mark.parametrize("mode", MODES)
def test_mmproj_layout_matches_llama_cpp_expectations(ckpt, mode, tmp_path):
    """Keys and tensor names llama.cpp's loader reads for PROJECTOR_TYPE_MINICPMV4_6 (clip.cpp, clip-impl.h)."""
    import gguf

    from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf

    mm = write_mmproj_gguf(ckpt, tmp_path / f"mmproj-{mode}.gguf", "F16", downsample_mode=mode)
    r = gguf.GGUFReader(str(mm))
    c, i = ckpt.vision.hidden_size, ckpt.vision.intermediate_size
    assert _field(r, "clip.projector_type") == "minicpmv4_6"
    assert _field(r, "clip.vision.projector.scale_factor") == FACTS.downsample_side(mode)
    assert _field(r, "clip.vision.wa_layer_indexes") == [ckpt.vision.insert_layer_id]
    assert _field(r, "clip.vision.image_size") == 448 and _field(r, "clip.vision.projection_dim") == 256
    t = {x.name: x for x in r.tensors}
    window = sorted(n for n in t if n.startswith("v.vit_merger."))
    assert len(window) == (16 if mode == "16x" else 0)          # "4x" files drop the window merger
    assert not [n for n in t if n.startswith("resampler.")]
    assert list(t["v.blk.0.ffn_up.weight"].shape) == [c, i]      # fc1 under its own name, not swapped
    assert list(t["mm.up.weight"].shape) == [4 * c, 4 * c] and list(t["mm.down.weight"].shape) == [4 * c, 256]
    assert list(t["v.position_embd.weight"].shape) == [c, 70 * 70]
    assert len(t) == 5 + 16 * ckpt.vision.num_hidden_layers + len(window) + 6   # body, layers, window, merger


def test_mmproj_llama_cpp_clip_matches_onnx(ckpt, onnx_files, tiny_checkpoint, tmp_path):
    """Our ONNX embeddings vs llama.cpp's clip on our minicpmv4_6 mmproj, unsliced 448x448 image (no resize in
    either, and the 32x32 grid has the same position ids in llama.cpp (floor(70 i / n)) and 4.6 (nearest))."""
    from minicpmv_edge.workflows.demo import demo_image
    from minicpmv_edge.export.checkpoint import Checkpoint
    from minicpmv_edge.export.gguf_llm import write_llm_gguf
    from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
    from minicpmv_edge.runtime.llamacpp_clip import LlamaCppClip
    from minicpmv_edge.runtime.preprocess import preprocess_image

    assert np.array_equal(vision_position_ids(32, 32, 70, "nearest"),
                          [(70 * i // 32) * 70 + 70 * j // 32 for i in range(32) for j in range(32)])
    # mtmd needs a text model of the mmproj's output width: the tiny 4.5 LLM is 256 wide, like ours
    llm = write_llm_gguf(Checkpoint.open(tiny_checkpoint("4.5")), tmp_path / "llm-F32.gguf", "F32")
    img = demo_image(448)
    limits = {"F32": 0.9999, "F16": 0.999}
    lines = []
    for mode in MODES:
        pre = preprocess_image(img, slicing="llava_uhd_v46", downsample_mode=mode)
        assert pre.grid is None and pre.slices[0].tgt_size == (32, 32)
        sess = ov.ort_session(onnx_files[(ov.MERGER_GRAPHS[mode], "fp32")].path)
        ours = sess.run(None, ov.slice_feed(pre.slices[0].pixels, 14, 70, "nearest"))[0][0]
        for t, limit in limits.items():
            mm = write_mmproj_gguf(ckpt, tmp_path / f"mmproj-{mode}-{t}.gguf", t, downsample_mode=mode)
            with LlamaCppClip(mm, llm) as clip:
                chunks = clip.encode(img)
            assert len(chunks) == 1 and chunks[0].shape == ours.shape, [c.shape for c in chunks]
            cos = _cos(chunks[0], ours)
            lines.append(f"{mode} {t}: min {cos.min():.7f} mean {cos.mean():.7f} (tolerance {limit})")
            assert cos.min() >= limit, lines[-1]
    print("\n[4.6] llama.cpp clip on our minicpmv4_6 mmproj vs our fp32 ONNX, cosine per token row:\n  "
          + "\n  ".join(lines))



# ------------------------------------------------------------------------------------------------ CoreML
# CoreML cannot predict on Linux: here the packages' spec is checked (inputs, ranges, outputs, ops, gelu modes, how
# weights are stored) against what the runtime feeds; `test_coreml_matches_transformers_on_macos` runs them.

COREML_PRECISIONS = ("fp16", "w8", "p4", "w4")
# per token row vs transformers, as the 2.6 - 4.5 packages (tests/test_vision_export.py): fp16 the bar,
# compressed weights on random init a floor
COREML_LIMITS = {"fp16": LIMITS["fp16"], "w8": 0.99, "p4": 0.9, "w4": 0.9}
COREML_OPS = {"const", "cast", "conv", "reshape", "gather", "expand_dims", "transpose", "add", "mul", "layer_norm",
              "linear", "matmul", "softmax", "gelu", "reduce_mean", "shape", "floor_div", "slice_by_index", "concat",
              "constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}


@pytest.fixture(scope="module")
def coreml_bundle(tiny_checkpoint, tmp_path_factory):
    """`minicpmv-edge export --coreml fp16,int4,int8,p4` (CoreML only) of the tiny synthetic 4.6: per mode the fp16
    package, w4 from its own iOS18 conversion, then w8 and p4 compressed from the fp16 base (this order once
    crashed: a conversion replaced the base). Returns (the bundle folder, the checkpoint folder)."""
    from minicpmv_edge.cli import main as cli

    out = tmp_path_factory.mktemp("v46-coreml") / "b"
    assert cli(["export", str(tiny_checkpoint("4.6")), "--out", str(out), "--name", "t", "--llm", "none",
                "--mmproj", "none", "--vision", "none", "--coreml", "fp16,int4,int8,p4", "--resampler", "none"]) == 0
    return out, tiny_checkpoint("4.6")


def _package(bundle, mode: str, precision: str):
    return bundle / f"vision-merger-{mode}-t-{precision}.mlpackage"


def _expected_ops(cfg, mode: str) -> dict[str, int]:
    """MIL op counts the merger graph of `mode` must have: every layer, the window merger ("16x"), the merger."""
    n, k = cfg.num_hidden_layers, cfg.merger_times
    window = mode == "16x"
    return {"conv": 1, "linear": 6 * n + 6 * window + 2 * k, "layer_norm": 2 * n + 1 + 2 * window + k,
            "softmax": n + window}


@pytest.mark.parametrize("mode", MODES)
def test_coreml_packages_spec(coreml_bundle, mode):
    from coremltools.converters.mil.frontend.torch import ops as ct_torch_ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    from minicpmv_edge.export import coreml_vision as CV

    bundle, folder = coreml_bundle
    cfg = MergerCheckpoint.open(folder).vision
    side, n = FACTS.downsample_side(mode), cfg.num_hidden_layers
    expect = _expected_ops(cfg, mode)
    linears = expect["linear"] + expect["conv"]
    stored = {"fp16": ("float16", linears),
              "w8": ("constexpr_affine_dequantize:quantized_data=int8,scale=float16,zero_point=int8", linears),
              "p4": ("constexpr_lut_to_dense:indices=uint8,lut=float16[16]", linears),
              # blocks of 16 inputs: the patch conv's 3*14*14 = 588 inputs do not split, it stays fp16
              "w4": ("constexpr_blockwise_shift_scale:data=int4,scale=float16", linears - 1)}
    spec_version = {"fp16": 8, "w8": 8, "p4": 8, "w4": 9}        # iOS17, w4 iOS18
    sizes = {}
    print()
    for precision in COREML_PRECISIONS:
        info = CV.inspect_mlpackage(_package(bundle, mode, precision))
        sizes[precision] = info["size"]
        print(f"[4.6 {mode} coreml {precision}] {info['size']} bytes, spec {info['specification_version']}, "
              f"ops {info['ops']}, gelu {info['gelu_modes']}, weights {info['weights']}")
        assert info["specification_version"] == spec_version[precision]
        assert info["metadata"]["minicpmv_edge.graph"] == ov.MERGER_GRAPHS[mode]
        px, ids = info["inputs"]["pixel_values"], info["inputs"]["position_ids"]
        assert px["dtype"] == "float32" and ids["dtype"] == "int32"
        assert px["range"] == [[1, 1], [3, 3], [14 * side, 14 * CV.MAX_SIDE], [14 * side, 14 * CV.MAX_SIDE]]
        assert ids["range"] == [[side, CV.MAX_SIDE], [side, CV.MAX_SIDE]]
        assert info["outputs"] == {"image_embeds": {"dtype": "float32"}}
        assert set(info["ops"]) <= COREML_OPS, set(info["ops"]) - COREML_OPS
        assert {op: info["ops"].get(op) for op in expect} == expect
        # SigLIP layers and the window merger use tanh GELU, the merger the exact one (coremltools 9 alone made
        # every one EXACT: export/coreml_vision.gelu_keeps_its_approximation)
        assert info["gelu_modes"] == {"TANH_APPROXIMATION": n + (mode == "16x"), "EXACT": cfg.merger_times}
        assert info["weights"].get(stored[precision][0]) == stored[precision][1], info["weights"]
    # smaller than fp16 by more than the fp16 position table, which is not compressed
    table = cfg.num_patches_per_side ** 2 * cfg.hidden_size * 2
    for v in ("w8", "p4", "w4"):
        assert sizes[v] - table < 0.8 * (sizes["fp16"] - table), v
    # the conversion's gelu converter was put back
    assert _TORCH_OPS_REGISTRY.get_func("gelu") is ct_torch_ops.gelu


@pytest.mark.parametrize("mode", MODES)
def test_coreml_spec_takes_what_the_runtime_feeds(coreml_bundle, mode):
    """Every slice the 4.6 slicer makes of a few images, fed as the runtime's CoreML backend feeds it
    (`coreml_inputs`): the same input names, dtypes the spec declares, shapes inside its ranges; the one output is
    the one the backend and parity read."""
    from PIL import Image

    from minicpmv_edge.export import coreml_vision as CV
    from minicpmv_edge.runtime.preprocess import preprocess_image
    from minicpmv_edge.runtime.vision import coreml_inputs

    info = CV.inspect_mlpackage(_package(coreml_bundle[0], mode, "fp16"))
    dtypes = {"float32": np.float32, "int32": np.int32}
    side, checked = FACTS.downsample_side(mode), 0
    for size in ((1000, 700), (448, 448), (300, 1200), (1800, 420), (60, 90)):
        pre = preprocess_image(Image.new("RGB", size), slicing=FACTS.slicing, downsample_mode=mode)
        for s in pre.slices:
            feed = coreml_inputs(s, 70, FACTS.vision_position_ids)
            assert set(feed) == set(info["inputs"])
            for name, arr in feed.items():
                spec = info["inputs"][name]
                assert arr.dtype == dtypes[spec["dtype"]], (name, arr.dtype)
                assert len(arr.shape) == len(spec["range"])
                assert all(lo <= d <= hi for d, (lo, hi) in zip(arr.shape, spec["range"])), (name, arr.shape)
            h, w = feed["position_ids"].shape
            assert h % side == 0 and w % side == 0 and feed["pixel_values"].shape[2:] == (14 * h, 14 * w)
            checked += 1
    print(f"\n[4.6 {mode} coreml] {checked} slices of 5 images fit the package's inputs")
    assert checked > 10 and list(info["outputs"]) == [ov.GRAPHS[ov.MERGER_GRAPHS[mode]].value]


def test_coreml_manifest_and_the_runtime_choice(coreml_bundle):
    """The export lists both modes' packages (kind, precision, graph, every file inside with its sha256) and the
    bundle verifies. The runtime chooses as for ONNX: the default mode's graph, the other mode's graph on the same
    backend in the same precision; CoreML only on macOS, and ONNX before CoreML where a bundle has both (as
    2.6 - 4.5)."""
    from minicpmv_edge.errors import BundleError
    from minicpmv_edge.export import bundle as B
    from minicpmv_edge.runtime.bundle import (MANIFEST, Bundle, BundleFile, FileKind, default_vision_kind,
                                              other_mode_files)

    out = coreml_bundle[0]
    m = json.loads((out / MANIFEST).read_text())
    entries = {(e["kind"], e["precision"]): e for e in m["files"]}
    assert set(entries) == {(f"vision_merger_{mode}_coreml", p) for mode in MODES for p in COREML_PRECISIONS}
    for mode in MODES:
        side = FACTS.downsample_side(mode)
        for precision in COREML_PRECISIONS:
            e = entries[(f"vision_merger_{mode}_coreml", precision)]
            assert e["path"] == _package(out, mode, precision).name and e["graph"] == ov.MERGER_GRAPHS[mode]
            assert e["format"] == "mlpackage" and e["parity"] is None
            assert e["minimum_deployment_target"] == ("iOS18" if precision == "w4" else "iOS17")
            assert e["contents"] and all(c["path"].startswith(e["path"] + "/") and len(c["sha256"]) == 64
                                         for c in e["contents"])
            assert e["io"]["outputs"] == {"image_embeds": ["float32", [1, f"h*w/{side * side}", "D"]]}
            assert e["io"]["inputs"]["position_ids"] == ["int32", ["h", "w"]]
        assert entries[(f"vision_merger_{mode}_coreml", "w8")]["quant"]["dtype"] == "int8"
        assert entries[(f"vision_merger_{mode}_coreml", "p4")]["quant"]["nbits"] == 4
        assert entries[(f"vision_merger_{mode}_coreml", "w4")]["quant"]["block_size"] == 16
    report = B.verify_bundle(out)
    assert report.ok and report.files_checked == sum(len(e["contents"]) for e in m["files"])

    def others(b, kind, precision):
        return {mode: (k, f.precision) for mode, (k, f) in other_mode_files(b, kind, precision).items()}

    b = Bundle.open(out)
    assert default_vision_kind(b, "darwin") == FileKind.VISION_MERGER_16X_COREML
    assert others(b, FileKind.VISION_MERGER_16X_COREML, "w8") == {"4x": (FileKind.VISION_MERGER_4X_COREML, "w8")}
    assert others(b, FileKind.VISION_MERGER_16X_COREML, "p4") == {"4x": (FileKind.VISION_MERGER_4X_COREML, "p4")}
    with pytest.raises(BundleError, match="no vision file this machine can run"):
        default_vision_kind(b, "linux")
    # the same bundle with ONNX graphs too (the choice reads only the file list)
    b.files += [BundleFile(out / f"{mode}.onnx", f"{mode}.onnx", kind, "fp32", 0, None)
                for mode, kind in (("16x", FileKind.VISION_MERGER_16X_ONNX), ("4x", FileKind.VISION_MERGER_4X_ONNX))]
    for platform in ("linux", "darwin"):
        assert default_vision_kind(b, platform) == FileKind.VISION_MERGER_16X_ONNX
    assert others(b, FileKind.VISION_MERGER_16X_ONNX, "fp32") == {"4x": (FileKind.VISION_MERGER_4X_ONNX, "fp32")}
    assert others(b, FileKind.VISION_MERGER_16X_COREML, "p4") == {"4x": (FileKind.VISION_MERGER_4X_COREML, "p4")}


def test_coreml_enumerated_shapes_cover_the_4_6_slicer(ckpt, tmp_path):
    from PIL import Image

    from minicpmv_edge.export import coreml_vision as CV
    from minicpmv_edge.runtime.preprocess import preprocess_image

    grids = {mode: CV.slicer_grids(merge=FACTS.downsample_side(mode)) for mode in MODES}
    rng = np.random.default_rng(0)
    for mode, side in ((m, FACTS.downsample_side(m)) for m in MODES):
        assert grids[mode] and all(h % side == 0 and w % side == 0 for h, w in grids[mode])
        for _ in range(20):                                   # random images within 1:4..4:1
            w = int(rng.integers(40, 1800))
            h = int(np.clip(w * np.exp(rng.uniform(-np.log(4), np.log(4))), 10, 3600))
            if not 0.25 <= w / h <= 4:
                continue
            for s in preprocess_image(Image.new("RGB", (w, h)), slicing=FACTS.slicing, downsample_mode=mode).slices:
                assert tuple(s.tgt_size) in grids[mode], f"{mode}: {w}x{h} gives a {s.tgt_size} slice"
    art = CV.export_vision_coreml(ckpt, tmp_path, "tiny46", graph="vision_merger_4x", shapes="enumerated")
    info = CV.inspect_mlpackage(art.path)
    print(f"\n[4.6 coreml] enumerated: {len(grids['16x'])} grids (16x), {len(grids['4x'])} (4x), target {art.target}")
    assert art.target == "iOS18" and art.grids == grids["4x"]
    assert [tuple(s) for s in info["inputs"]["position_ids"]["enumerated"]] == list(grids["4x"])
    assert [tuple(s[2:]) for s in info["inputs"]["pixel_values"]["enumerated"]] == [(14 * h, 14 * w) for h, w in grids["4x"]]
    with pytest.raises(MiniCPMVEdgeError, match="not whole 4x4 merge blocks"):
        CV.convert_coreml(ckpt, graph="vision_merger_16x", shapes="enumerated", grids=[(32, 32), (30, 32)])


@pytest.mark.skipif(sys.platform != "darwin",
                    reason="CoreML prediction exists on macOS only; on Linux the spec is checked instead")
@pytest.mark.parametrize("mode", MODES)
def test_coreml_matches_transformers_on_macos(coreml_bundle, mode):
    """The packages run through the runtime's own backend (CoreMLVision) against transformers' get_image_features
    of the same checkpoint, per slice over the 8 grid shapes; the ONNX test's bar for fp16."""
    from minicpmv_edge.export.reference_native import native_model
    from minicpmv_edge.runtime.preprocess import Slice
    from minicpmv_edge.runtime.vision import CoreMLVision

    bundle, folder = coreml_bundle
    want_all = image_features(native_model(folder), _slices(mode), mode)
    lines = []
    for precision, limit in COREML_LIMITS.items():
        vision = CoreMLVision(_package(bundle, mode, precision), 70, FACTS.vision_position_ids)
        for (h, w), px, want in zip(_grids(mode), _slices(mode), want_all):
            cos = _cos(vision.encode(Slice(px, (h, w), "source")), want)
            lines.append(f"{precision} {h}x{w}: min {cos.min():.7f} mean {cos.mean():.7f} (tolerance {limit})")
            assert cos.min() >= limit, lines[-1]
    print(f"\n[4.6 {mode}] CoreML vs transformers get_image_features, cosine per token row:\n  " + "\n  ".join(lines))
