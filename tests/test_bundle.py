"""The bundle manifest: written from a tiny 4.5 export, read back by the runtime's reader, verified; `verify`
catches a flipped byte in any file (ONNX graph, its external data, a file inside an .mlpackage, a GGUF), a
missing file, and malformed manifests, each with a message naming the file or field and a non-zero exit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minicpmv_edge.export import bundle as B
from minicpmv_edge.export import onnx_vision as OV
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.runtime.bundle import MANIFEST, Bundle, BundleError, FileKind


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Checkpoint:
    return Checkpoint.open(tiny_checkpoint("4.5"))


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory) -> Path:
    """A bundle: ONNX fp32 (weights as external data) + fp16 + default int8, a CoreML package, the mmproj GGUF
    and the tokenizer file, with parity measured for the ONNX files."""
    from minicpmv_edge.export.coreml_vision import export_vision_coreml
    from minicpmv_edge.export.gguf_mmproj import write_mmproj_gguf
    from minicpmv_edge.quantize.onnx_int8 import quantize_vision_onnx

    root = tmp_path_factory.mktemp("bundle")
    fp32 = OV.export_onnx(ckpt, root / OV.onnx_file_name("tiny", "fp32"), external=True)
    fp16 = OV.convert_fp16(fp32.path, root / OV.onnx_file_name("tiny", "fp16"))
    [int8] = quantize_vision_onnx(ckpt, root, "tiny", recipes=["int8"], reuse=[fp32])
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary files left in the bundle"
    coreml = export_vision_coreml(ckpt, root, "tiny")
    mmproj = write_mmproj_gguf(ckpt, root / "mmproj-tiny-F16.gguf", "F16")
    shutil.copy(ckpt.root / "tokenizer.json", root / "tokenizer.json")
    parity = B.measure_vision_parity([a.path for a in (fp32, fp16, int8)], ckpt)
    files = [fp32, fp16, int8, coreml,
             {"path": mmproj, "kind": FileKind.MMPROJ_GGUF, "precision": "F16"},
             B.BundleFileSpec(root / "tokenizer.json", FileKind.TOKENIZER, None)]
    B.write_manifest(root, ckpt, files, parity, name="tiny")
    return root


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def test_manifest_round_trip(bundle, ckpt):
    m = B.load_manifest(bundle)
    assert m["schema_version"] == 1 and m["name"] == "tiny"
    assert m["model"]["version"] == "4.5"
    assert m["model"]["vision"]["hidden_size"] == ckpt.vision.hidden_size
    assert m["model"]["resampler"]["query_num"] == ckpt.resampler.query_num
    assert m["model"]["llm"]["vocab_size"] == ckpt.llm.vocab_size
    pre = m["preprocess"]
    assert (pre["slice_size"], pre["patch_size"], pre["max_slice_nums"]) == (448, 14, 9)
    assert pre["norm_mean"] == [0.5] * 3 and pre["slicing"] == "llava_uhd" and pre["num_patches_per_side"] == 70
    p = m["prompt"]
    assert p["chat_template"] == ckpt.chat_template
    assert p["special_tokens"]["image_pad"] == "<unk>" and p["special_tokens"]["think_start"] == "<think>"
    assert p["thinking"] is True and p["use_image_id"] is True and p["query_num"] == 64
    assert p["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert "<slice>" in p["placeholder"]["image"]

    by_path = {e["path"]: e for e in m["files"]}
    onnx = by_path["vision-tiny-fp32.onnx"]
    assert onnx["kind"] == "vision_onnx" and onnx["precision"] == "fp32"
    assert onnx["external_data"][0]["path"] == "vision-tiny-fp32.onnx.data"
    assert onnx["parity"]["min_cosine"] >= 0.99999 and len(onnx["parity"]["grids"]) == 3
    assert by_path["vision-tiny-int8.onnx"]["precision"] == "int8"
    assert by_path["vision-tiny-int8.onnx"]["quant"]["tool"] == "onnxruntime.quantization"
    assert by_path["vision-tiny-fp16.onnx"]["quant"]["kept_fp32_ops"]
    ml = by_path["vision-tiny-fp16.mlpackage"]
    assert ml["kind"] == "vision_coreml" and ml["parity"] is None and ml["contents"]
    assert ml["size"] == sum(c["size"] for c in ml["contents"])
    assert by_path["mmproj-tiny-F16.gguf"]["kind"] == "mmproj_gguf"
    for e in m["files"]:
        if "contents" not in e:
            assert e["size"] == (bundle / e["path"]).stat().st_size
            assert e["sha256"] == B.sha256_file(bundle / e["path"])

    # the runtime's reader understands it
    b = Bundle.open(bundle)
    assert b.facts.version == "4.5"
    assert b.choose(FileKind.VISION_ONNX, None, ("fp32", "fp16", "int8")).rel == "vision-tiny-fp32.onnx"
    assert b.choose(FileKind.VISION_ONNX, "int8", ()).rel == "vision-tiny-int8.onnx"


def test_verify_passes_and_prints_json(bundle, capsys):
    report = B.verify_bundle(bundle)
    assert report.ok, report.problems
    assert report.files_checked >= 8
    assert B.main([str(bundle), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["problems"] == []


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["vision-tiny-fp32.onnx", "vision-tiny-fp32.onnx.data", "vision-tiny-int8.onnx",
                                    "mlpackage", "mmproj-tiny-F16.gguf", "tokenizer.json"])
def test_verify_catches_a_flipped_byte(copy, target, capsys):
    if target == "mlpackage":
        target = next(p for p in sorted((copy / "vision-tiny-fp16.mlpackage").rglob("*.bin"))).relative_to(copy)
        target = target.as_posix()
    _flip(copy / target)
    report = B.verify_bundle(copy)
    assert not report.ok
    assert [p.path for p in report.problems] == [target]
    assert "sha256 mismatch" in report.problems[0].message
    assert B.main([str(copy)]) == 1
    err = capsys.readouterr().err
    print(f"\n[verify] {err.strip()}")
    assert target in err and "sha256 mismatch" in err


def test_verify_catches_a_missing_file_and_a_truncated_one(copy, capsys):
    (copy / "vision-tiny-fp16.onnx").unlink()
    with open(copy / "mmproj-tiny-F16.gguf", "r+b") as f:
        f.truncate(100)
    assert B.main([str(copy)]) == 1
    err = capsys.readouterr().err
    print(f"\n[verify] {err.strip()}")
    assert "vision-tiny-fp16.onnx: listed in manifest.json but missing" in err
    assert "mmproj-tiny-F16.gguf: size 100 bytes" in err
    shutil.rmtree(copy / "vision-tiny-fp16.mlpackage")
    report = B.verify_bundle(copy)
    assert "vision-tiny-fp16.mlpackage" in {p.path for p in report.problems}


def test_verify_catches_an_unlisted_file_inside_a_package(copy):
    extra = copy / "vision-tiny-fp16.mlpackage" / "Data" / "extra.bin"
    extra.write_bytes(b"x")
    report = B.verify_bundle(copy)
    assert [p.path for p in report.problems] == ["vision-tiny-fp16.mlpackage/Data/extra.bin"]


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.pop("prompt"), "prompt"),
    (lambda m: m.__setitem__("schema_version", 99), "schema_version"),
    (lambda m: m["model"].__setitem__("version", "9.9"), "model.version"),
    (lambda m: m["preprocess"].__setitem__("norm_std", [0.5, 0.5]), "preprocess.norm_std"),
    (lambda m: m["files"][0].__setitem__("sha256", "abc"), "files[0].sha256"),
    (lambda m: m["files"][1].__setitem__("path", "../outside.onnx"), "files[1].path"),
    (lambda m: m["files"][2].__setitem__("kind", "mystery"), "files[2].kind"),
    (lambda m: m["files"][0].pop("size"), "files[0].size"),
    (lambda m: m["files"][0]["external_data"][0].pop("sha256"), "files[0].external_data[0].sha256"),
])
def test_malformed_manifest_names_the_field(copy, edit, field, capsys):
    m = _manifest(copy)
    edit(m)
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError) as exc:
        B.verify_bundle(copy)
    assert field in str(exc.value) and MANIFEST in str(exc.value)
    assert B.main([str(copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err, err                # one line, naming the field


def test_not_json_and_not_a_bundle(copy, tmp_path, capsys):
    (copy / MANIFEST).write_text("{not json")
    assert B.main([str(copy)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert B.main([str(tmp_path / "nowhere"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_verify_against_remeasures_parity(bundle, ckpt, tmp_path):
    from minicpmv_edge.export.synth import synthesize

    report = B.verify_bundle(bundle, against=ckpt)
    assert report.ok, report.problems
    print("\n[verify --against]", json.dumps(report.parity, indent=1))
    assert set(report.parity) == {"vision-tiny-fp32.onnx", "vision-tiny-fp16.onnx", "vision-tiny-int8.onnx"}
    assert all(p["ok"] for p in report.parity.values())
    assert any("CoreML" in n for n in report.notes)
    # other weights with the same dims: every vision file's parity collapses
    other = synthesize("4.5", "tiny", tmp_path / "other", seed=1)
    bad = B.verify_bundle(bundle, against=other)
    assert not bad.ok and {p.path for p in bad.problems} == set(report.parity)
    assert all("parity changed" in p.message for p in bad.problems)


def test_write_manifest_takes_typed_records(ckpt, tmp_path):
    """Exporters hand the writer typed records (kind, precision, external data): nothing is parsed from names."""
    (tmp_path / "m-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    (tmp_path / "r.mvr").write_bytes(b"MVERSMPL" + bytes(56))
    (tmp_path / "v.onnx").write_bytes(b"graph")
    (tmp_path / "v.onnx.data").write_bytes(b"weights")
    B.write_manifest(tmp_path, ckpt, [B.BundleFileSpec(tmp_path / "m-Q4_K_M.gguf", FileKind.LLM_GGUF, "Q4_K_M"),
                                      B.BundleFileSpec(tmp_path / "r.mvr", FileKind.RESAMPLER_WEIGHTS, "f16"),
                                      B.BundleFileSpec(tmp_path / "v.onnx", FileKind.VISION_ONNX, "fp32",
                                                       external_data=[tmp_path / "v.onnx.data"])])
    m = B.load_manifest(tmp_path)
    assert [(e["kind"], e["precision"]) for e in m["files"]] == [("llm_gguf", "Q4_K_M"), ("resampler_weights", "f16"),
                                                                 ("vision_onnx", "fp32")]
    assert m["files"][2]["external_data"][0]["path"] == "v.onnx.data"     # listed with the graph
    assert B.verify_bundle(tmp_path).ok
    _flip(tmp_path / "v.onnx.data", 0)
    assert [p.path for p in B.verify_bundle(tmp_path).problems] == ["v.onnx.data"]
    with pytest.raises(Exception, match="unknown file kind"):
        B.write_manifest(tmp_path, ckpt, [B.BundleFileSpec(tmp_path / "r.mvr", "weird", "F16")])
    with pytest.raises(Exception, match="not inside the bundle"):
        B.write_manifest(tmp_path / "sub", ckpt, [B.BundleFileSpec(tmp_path / "r.mvr", FileKind.LLM_GGUF, "F16")])


def test_export_cli_writes_onnx_int8_and_coreml_with_their_recipes(tiny_checkpoint, tmp_path, capsys):
    """`minicpmv-edge export --vision fp32,int8 --coreml fp16,int8,p4`: every file listed with how it was made,
    the int8 ONNX built from the fp32 graph just written (no leftover temporary folder), and the bundle verifies."""
    from minicpmv_edge.cli import main as cli

    out = tmp_path / "b"
    assert cli(["export", str(tiny_checkpoint("4.5")), "--out", str(out), "--name", "t", "--llm", "none",
                "--mmproj", "none", "--vision", "fp32,int8", "--coreml", "fp16,int8,p4", "--resampler", "f16"]) == 0
    m = B.load_manifest(out)
    entries = {(e["kind"], e["precision"]): e for e in m["files"]}
    assert set(entries) == {("vision_onnx", "fp32"), ("vision_onnx", "int8"), ("vision_coreml", "fp16"),
                            ("vision_coreml", "w8"), ("vision_coreml", "p4"), ("resampler_weights", "f16")}
    assert entries[("vision_onnx", "int8")]["quant"]["recipe"] == "dyn-pc"
    assert entries[("vision_onnx", "int8")]["parity"]["min_cosine"] > 0.99
    assert entries[("vision_coreml", "w8")]["quant"]["dtype"] == "int8"
    assert entries[("vision_coreml", "p4")]["quant"]["nbits"] == 4
    assert all(e["minimum_deployment_target"] == "iOS17" for k, e in entries.items() if k[0] == "vision_coreml")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "resampler-t-f16.mvr", "vision-t-fp32.onnx", "vision-t-int8.onnx",
         "vision-t-fp16.mlpackage", "vision-t-w8.mlpackage", "vision-t-p4.mlpackage"])
    assert B.verify_bundle(out).ok
    assert "vision-t-p4.mlpackage" in capsys.readouterr().out

    # an unknown variant is refused before anything is written
    assert cli(["export", str(tiny_checkpoint("4.5")), "--out", str(tmp_path / "c"), "--llm", "Q4_K_M",
                "--coreml", "fp16,int2"]) != 0
    assert "unknown CoreML variant 'int2'" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*"))
