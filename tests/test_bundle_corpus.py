"""Crafted bundles: a corpus generated from the manifest schema (runtime/bundle.py) plus hand-made file attacks.

Each case is run through `minicpmv-edge verify` and `minicpmv-edge run` (in-process, the way the CLI runs them)
and must end in one line on stderr naming the manifest (or the file) and the field, exit status 1, no other
exception, within a time limit. The schema cases are not hand-listed: for every field of every section the
generator makes it missing (required fields), of the wrong type, outside its range, not one of its choices,
malformed, too long. The attacks on files: a wrong sha256, a FIFO, symlinks out of the folder, a directory
where a file belongs, a truncated file; on the JSON: depth, huge integers, NaN, not an object, not UTF-8, a FIFO
or an oversize file as manifest.json; on the chat template: a syntax error and a sandbox escape."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import typing
from pathlib import Path
from typing import Any, Callable

import pytest

from minicpmv_edge.cli import main as cli
from minicpmv_edge.export import bundle as B
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.runtime.bundle import MANIFEST, FileKind, Manifest, Rule, Section

CASE_SECONDS = 20


# =============================================================================================
# The base bundle: tiny files with a valid manifest listing every kind of entry
# =============================================================================================

@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus-base")
    ckpt = Checkpoint.open(tiny_checkpoint("4.5"))
    (root / "m-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    (root / "r.mvr").write_bytes(b"MVERSMPL" + bytes(56))
    (root / "v.onnx").write_bytes(b"graph")
    (root / "v.onnx.data").write_bytes(b"weights")
    pkg = root / "v.mlpackage" / "Data"
    pkg.mkdir(parents=True)
    (pkg / "model.mlmodel").write_bytes(b"spec")
    (pkg / "weight.bin").write_bytes(b"w" * 32)
    parity = {"min_cosine": 0.99, "mean_cosine": 0.999, "reference": "torch", "graph": "vision",
              "grids": [{"grid": [32, 32], "min_cosine": 0.99, "mean_cosine": 0.999, "max_abs": 0.01}]}
    files = [B.BundleFileSpec(root / "m-Q4_K_M.gguf", FileKind.LLM_GGUF, "Q4_K_M"),
             B.BundleFileSpec(root / "v.onnx", FileKind.VISION_ONNX, "fp32",
                              {"graph": "vision", "format": "onnx", "quant": {"tool": "x"}, "fused_ops": {"Gelu": 1},
                               "io": {"inputs": {}}}, [root / "v.onnx.data"]),
             B.BundleFileSpec(root / "r.mvr", FileKind.RESAMPLER_WEIGHTS, "f32"),
             B.BundleFileSpec(root / "v.mlpackage", FileKind.VISION_COREML, "fp16",
                              {"minimum_deployment_target": "iOS17"})]
    B.write_manifest(root, ckpt, files, {root / "v.onnx": parity}, name="corpus")
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


# =============================================================================================
# Schema cases, generated
# =============================================================================================

def _wrong_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, __import__("types").UnionType):
        return _wrong_type(args[0])
    base = origin or hint
    if base is bool:
        return "yes"
    if base in (int, float):
        return "12"
    if base is str:
        return 12
    if base is list:
        return {"a": 1}
    return [1]                    # dicts and sections


def _fields(section: type[Section], data: dict, where: str):
    """(field path, section-relative accessors, type, rule, required) for every field the schema declares,
    descending into nested sections, the items of lists of sections and the first item of lists of scalars."""
    for name, hint, rule, required in section.schema():
        path = f"{where}.{name}" if where else name
        yield path, (data, name), hint, rule, required
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        t = inner[0]
        if isinstance(t, type) and issubclass(t, Section) and isinstance(data.get(name), dict):
            yield from _fields(t, data[name], path)
        elif typing.get_origin(t) is list and data.get(name):
            (item,) = typing.get_args(t)
            if isinstance(item, type) and issubclass(item, Section):     # every file entry: their fields differ
                for i, value in enumerate(data[name][:8]):
                    yield from _fields(item, value, f"{path}[{i}]")
            elif item in (int, float, str):
                yield f"{path}[0]", (data[name], 0), item, Rule(), True


Case = tuple[str, Callable[[dict], None], str]      # (id, edit of the manifest dict, what the error must name)


def schema_cases(manifest: dict) -> list[Case]:
    cases: list[Case] = []

    for path, _, hint, rule, required in _fields(Manifest, manifest, ""):
        if path == "schema_version":
            continue                                     # its own cases below (checked before the schema)
        if required:
            cases.append((f"missing:{path}", lambda m, p=path: _pop(m, p), path))
        cases.append((f"type:{path}", lambda m, p=path, v=_wrong_type(hint): _set(m, p, v), path))
        if rule.hi is not None:
            cases.append((f"above:{path}", lambda m, p=path, v=rule.hi: _set(m, p, _past(v, +1)), path))
        if rule.lo is not None:
            cases.append((f"below:{path}", lambda m, p=path, v=rule.lo: _set(m, p, _past(v, -1)), path))
        if rule.choices is not None:
            cases.append((f"choice:{path}", lambda m, p=path: _set(m, p, "evil"), path))
        if rule.pattern is not None:
            cases.append((f"pattern:{path}", lambda m, p=path: _set(m, p, "not/hex!"), path))
        if rule.length is not None:
            cases.append((f"length:{path}", lambda m, p=path, n=rule.length: _set(m, p, [1.0] * (n + 1)), path))
        if rule.max_len is not None and rule.max_len <= 4096 and typing.get_origin(hint) is None and hint is str:
            cases.append((f"long:{path}", lambda m, p=path, n=rule.max_len: _set(m, p, "a" * (n + 1)), path))
    return cases


def _past(bound: float, direction: int) -> float:
    return int(bound) + direction if float(bound).is_integer() else bound * (1 + 0.5 * direction) + direction


def _locate(m: dict, path: str):
    parts = path.replace("[", ".[").split(".")
    obj = m
    for part in parts[:-1]:
        obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
    last = parts[-1]
    return obj, (int(last[1:-1]) if last.startswith("[") else last)


def _pop(m: dict, path: str) -> None:
    obj, key = _locate(m, path)
    del obj[key]


def _set(m: dict, path: str, value: Any) -> None:
    obj, key = _locate(m, path)
    obj[key] = value


# cross-field and semantic cases the per-field rules cannot express
SEMANTIC: list[Case] = [
    ("files-empty", lambda m: m.__setitem__("files", []), "files"),
    ("slice_size-0", lambda m: m["preprocess"].__setitem__("slice_size", 0), "preprocess.slice_size"),
    ("slice_size-huge", lambda m: m["preprocess"].__setitem__("slice_size", 1_000_000), "preprocess.slice_size"),
    ("slice_size-not-multiple", lambda m: m["preprocess"].__setitem__("slice_size", 450), "preprocess.slice_size"),
    ("slice_size-past-table", lambda m: m["preprocess"].__setitem__("slice_size", 14 * 71), "preprocess.slice_size"),
    ("patch_size-0", lambda m: m["preprocess"].__setitem__("patch_size", 0), "preprocess.patch_size"),
    ("patch_size-mismatch", lambda m: m["preprocess"].__setitem__("patch_size", 16), "preprocess.patch_size"),
    ("side-0", lambda m: m["preprocess"].__setitem__("num_patches_per_side", 0), "preprocess.num_patches_per_side"),
    ("norm_std-0", lambda m: m["preprocess"]["norm_std"].__setitem__(1, 0.0), "preprocess.norm_std[1]"),
    ("slicing-evil", lambda m: m["preprocess"].__setitem__("slicing", "evil"), "preprocess.slicing"),
    ("max_slices-37", lambda m: m["preprocess"].__setitem__("max_slice_nums", 37), "preprocess.max_slice_nums"),
    ("query_num-10M", lambda m: m["prompt"].__setitem__("query_num", 10_000_000), "prompt.query_num"),
    ("query_num-mismatch", lambda m: m["prompt"].__setitem__("query_num", 32), "prompt.query_num"),
    ("kv_dim-mismatch", lambda m: m["model"]["resampler"].__setitem__("kv_dim", 7), "model.resampler.kv_dim"),
    ("heads-not-dividing", lambda m: m["model"]["resampler"].__setitem__("num_heads", 7), "model.resampler.num_heads"),
    ("version-unknown", lambda m: m["model"].__setitem__("version", "9.9"), "model.version"),
    ("version-number", lambda m: m["model"].__setitem__("version", 4.5), "model.version"),
    ("unknown-role", lambda m: m["prompt"]["special_tokens"].__setitem__("evil", "<e>"), "prompt.special_tokens.evil"),
    ("role-missing", lambda m: m["prompt"]["special_tokens"].pop("image_pad"), "prompt.special_tokens.image_pad"),
    ("role-empty", lambda m: m["prompt"]["special_tokens"].__setitem__("image_start", ""),
     "prompt.special_tokens.image_start"),
    ("stop-tokens-empty", lambda m: m["prompt"].__setitem__("stop_tokens", []), "prompt.stop_tokens"),
    ("rope-theta-neg", lambda m: m["model"]["llm"].__setitem__("rope_theta", -1.0), "model.llm.rope_theta"),
    ("eps-huge", lambda m: m["model"]["llm"].__setitem__("rms_norm_eps", 1e300), "model.llm.rms_norm_eps"),
    ("files-dup", lambda m: m["files"].append(copy.deepcopy(m["files"][0])), "files[4]"),
    ("path-dotdot", lambda m: m["files"][0].__setitem__("path", "../outside.gguf"), "files[0].path"),
    ("path-nested-dotdot", lambda m: m["files"][0].__setitem__("path", "a/../../x.gguf"), "files[0].path"),
    ("path-absolute", lambda m: m["files"][0].__setitem__("path", "/etc/passwd"), "files[0].path"),
    ("path-home", lambda m: m["files"][0].__setitem__("path", "~/.ssh/id_rsa"), "files[0].path"),
    ("path-backslash", lambda m: m["files"][0].__setitem__("path", "..\\..\\x"), "files[0].path"),
    ("path-empty", lambda m: m["files"][0].__setitem__("path", ""), "files[0].path"),
    ("path-nul", lambda m: m["files"][0].__setitem__("path", "a\x00b"), "files[0].path"),
    ("ext-path-escape", lambda m: m["files"][1]["external_data"][0].__setitem__("path", "../../etc/passwd"),
     "files[1].external_data[0].path"),
    ("contents-outside", lambda m: m["files"][3]["contents"][0].__setitem__("path", "r.mvr"), "files[3].contents[0]"),
    ("files-too-many", lambda m: m.__setitem__("files", [m["files"][0]] * 300), "files"),
    ("size-negative", lambda m: m["files"][0].__setitem__("size", -1), "files[0].size"),
    ("size-huge", lambda m: m["files"][0].__setitem__("size", 2 ** 62), "files[0].size"),
    ("sha-short", lambda m: m["files"][0].__setitem__("sha256", "abc"), "files[0].sha256"),
    ("sha-upper", lambda m: m["files"][0].__setitem__("sha256", "A" * 64), "files[0].sha256"),
    ("kind-mystery", lambda m: m["files"][2].__setitem__("kind", "mystery"), "files[2].kind"),
    ("schema-99", lambda m: m.__setitem__("schema_version", 99), "schema_version"),
    ("schema-missing", lambda m: m.pop("schema_version"), "schema_version"),
    ("schema-string", lambda m: m.__setitem__("schema_version", "1"), "schema_version"),
    ("template-syntax", lambda m: m["prompt"].__setitem__("chat_template", "{% for %}"), "prompt.chat_template"),
    ("template-raises", lambda m: m["prompt"].__setitem__("chat_template", "{{ raise_exception('no') }}"),
     "prompt.chat_template"),
    ("template-escape", lambda m: m["prompt"].__setitem__(
        "chat_template", "{{ ''.__class__.__mro__[1].__subclasses__() }}"), "prompt.chat_template"),
    ("template-undefined-call", lambda m: m["prompt"].__setitem__("chat_template", "{{ messages.pop() }}"),
     "prompt.chat_template"),
]


def _raw(text: bytes) -> Callable[[Path], None]:
    return lambda root: (root / MANIFEST).write_bytes(text)


def _deep(depth: int) -> bytes:
    return b'{"schema_version": 1, "model": ' + b"[" * depth + b"]" * depth + b"}"


# manifest.json itself as the attack: (id, write it into the folder, what the error must name)
RAW: list[tuple[str, Callable[[Path], None], str]] = [
    ("json-invalid", _raw(b"{not json"), "not valid JSON"),
    ("json-list", _raw(b"[1, 2]"), "JSON object"),
    ("json-string", _raw(b'"manifest"'), "JSON object"),
    ("json-empty", _raw(b""), "not valid JSON"),
    ("json-not-utf8", _raw(b'{"name": "\xff\xfe"}'), "not valid JSON"),
    ("json-deep-100k", _raw(_deep(100_000)), "nested deeper"),
    ("json-deep-40", _raw(_deep(40)), "nested deeper"),
    ("json-int-5000-digits", _raw(b'{"schema_version": ' + b"9" * 5000 + b"}"), "not valid JSON"),
    ("json-nan", _raw(b'{"schema_version": 1, "x": NaN}'), "not valid JSON"),
    ("json-infinity", _raw(b'{"schema_version": 1, "x": -Infinity}'), "not valid JSON"),
    ("manifest-fifo", lambda root: os.mkfifo(root / MANIFEST), "special file"),
    ("manifest-folder", lambda root: (root / MANIFEST).mkdir(), "a folder"),
    ("manifest-symlink-out", lambda root: (root / MANIFEST).symlink_to("/etc/passwd"), "outside the bundle"),
    ("manifest-oversize", lambda root: os.truncate(_touch(root / MANIFEST), 17 * 2 ** 20), "at most"),
    ("manifest-missing", lambda root: None, "no manifest.json"),
]


def _touch(p: Path) -> Path:
    p.write_bytes(b"{")
    return p


def _replace_with(target: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / target
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        make(p)
    return edit


def _flip(target: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / target
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 1
        p.write_bytes(bytes(data))
    return edit


# files the manifest lists, attacked on disk (manifest untouched): (id, edit, the file the error must name,
# which commands fail: run loads the LLM, fp32 vision (+ external data) and the resampler; verify checks all)
FILES: list[tuple[str, Callable[[Path], None], str, tuple[str, ...]]] = [
    ("sha-llm", _flip("m-Q4_K_M.gguf"), "m-Q4_K_M.gguf", ("verify", "run")),
    ("sha-external-data", _flip("v.onnx.data"), "v.onnx.data", ("verify", "run")),
    ("sha-resampler", _flip("r.mvr"), "r.mvr", ("verify", "run")),
    ("sha-in-package", _flip("v.mlpackage/Data/weight.bin"), "v.mlpackage/Data/weight.bin", ("verify",)),
    ("fifo-resampler", _replace_with("r.mvr", os.mkfifo), "r.mvr", ("verify", "run")),
    ("fifo-llm", _replace_with("m-Q4_K_M.gguf", os.mkfifo), "m-Q4_K_M.gguf", ("verify", "run")),
    ("fifo-external-data", _replace_with("v.onnx.data", os.mkfifo), "v.onnx.data", ("verify", "run")),
    ("fifo-in-package", _replace_with("v.mlpackage/Data/weight.bin", os.mkfifo), "weight.bin", ("verify",)),
    ("symlink-out-llm", _replace_with("m-Q4_K_M.gguf", lambda p: p.symlink_to("/etc/passwd")), "m-Q4_K_M.gguf",
     ("verify", "run")),
    ("symlink-out-data", _replace_with("v.onnx.data", lambda p: p.symlink_to("/etc/hostname")), "v.onnx.data",
     ("verify", "run")),
    ("symlink-out-package", _replace_with("v.mlpackage", lambda p: p.symlink_to("/etc")), "v.mlpackage",
     ("verify",)),
    ("symlink-dev-zero", _replace_with("r.mvr", lambda p: p.symlink_to("/dev/zero")), "r.mvr", ("verify", "run")),
    ("folder-for-file", _replace_with("r.mvr", lambda p: p.mkdir()), "r.mvr", ("verify", "run")),
    ("missing-llm", _replace_with("m-Q4_K_M.gguf", lambda p: None), "m-Q4_K_M.gguf", ("verify", "run")),
    ("truncated-resampler", lambda root: os.truncate(root / "r.mvr", 10), "r.mvr", ("verify", "run")),
]


# =============================================================================================
# Running a case
# =============================================================================================

class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """One CLI command in-process under a time limit: (exit status, stderr)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        rc = cli(argv)
    except _Timeout:
        pytest.fail(f"{argv[0]} ran past {CASE_SECONDS} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, capsys.readouterr().err.strip()


def _expect_one_line(root: Path, cmds: tuple[str, ...], names: str, capsys, extra: str | None = None) -> None:
    for cmd in cmds:
        argv = ["verify", str(root)] if cmd == "verify" else ["run", str(root), "-p", "hi"]
        rc, err = _run(argv, capsys)
        print(f"  [{cmd}] {err}")
        assert rc == 1, f"{cmd}: exit {rc}, stderr {err!r}"
        assert err.count("\n") == 0, f"{cmd}: more than one line:\n{err}"
        assert "Traceback" not in err
        assert names in err, f"{cmd}: {err!r} does not name {names!r}"
        if extra:
            assert extra in err, f"{cmd}: {err!r} does not name {extra!r}"


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPMV_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def generated(base) -> list[Case]:
    return schema_cases(_manifest(base))


def test_corpus_size(base):
    n_schema = len(schema_cases(_manifest(base)))
    total = n_schema + len(SEMANTIC) + len(RAW) + len(FILES)
    missing = sum(1 for c in schema_cases(_manifest(base)) if c[0].startswith("missing:"))
    print(f"\n[corpus] {n_schema} generated from the schema ({missing} of them a missing field) + {len(SEMANTIC)} "
          f"semantic + {len(RAW)} manifest-file + {len(FILES)} file attacks = {total} bundles")
    assert total >= 100 and missing >= 40


def test_every_schema_case_is_a_one_line_error(base, generated, tmp_path, capsys):
    """Every generated case (missing / wrong type / out of range / ... per field) and every semantic case fails
    `verify` and `run` with one line naming manifest.json and the field."""
    root = tmp_path / "b"
    root.mkdir()
    failures = []
    for case_id, edit, field in [*generated, *SEMANTIC]:
        m = _manifest(base)
        edit(m)
        (root / MANIFEST).write_text(json.dumps(m))
        try:
            _expect_one_line(root, ("verify", "run"), MANIFEST, capsys, extra=field)
        except AssertionError as exc:
            failures.append(f"{case_id}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case_id,write,expect", RAW, ids=[c[0] for c in RAW])
def test_hostile_manifest_file(case_id, write, expect, tmp_path, capsys):
    root = tmp_path / "b"
    root.mkdir()
    write(root)
    _expect_one_line(root, ("verify", "run"), str(root), capsys, extra=expect)


@pytest.mark.parametrize("case_id,edit,target,cmds", FILES, ids=[c[0] for c in FILES])
def test_hostile_listed_file(case_id, edit, target, cmds, base, tmp_path, capsys):
    root = tmp_path / "b"
    shutil.copytree(base, root, symlinks=True)
    edit(root)
    _expect_one_line(root, cmds, target, capsys)


def _schema_names(section: type[Section]) -> set[str]:
    names = set()
    for name, hint, *_ in section.schema():
        names.add(name)
        for t in [hint, *typing.get_args(hint), *[a for arg in typing.get_args(hint) for a in typing.get_args(arg)]]:
            if isinstance(t, type) and issubclass(t, Section):
                names |= _schema_names(t)
    return names


def test_every_schema_field_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bundle.md").read_text()
    missing = sorted(n for n in _schema_names(Manifest) if f"`{n}`" not in doc and f".{n}`" not in doc)
    assert not missing, f"docs/bundle.md does not describe: {', '.join(missing)}"
