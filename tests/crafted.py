"""A crafted corpus of hostile checkpoints and resampler weight files (issue 16), and the worker that runs it.

    cases = checkpoint_corpus(tiny_checkpoint_dir, out) + weights_corpus(tiny_mvr, out)
    results, peak_rss_mb = run_corpus(cases, out)

Cases are generated from classes, not listed by hand: every bounded config field (from the bound tables in
export/checkpoint_checks.py) with values below, above and of the wrong kind; JSON that is too deep, has 5000-digit
integers or the wrong top level; names that escape the folder (`..`, absolute, symlinks); FIFOs, folders and
devices where files should be; every safetensors header rule; NaN/Inf weights (at export); every header field and
tensor-table entry of a .mvr file with boundary values, NaN in every tensor, truncations.

`run_corpus` runs all cases in ONE subprocess (so a hang or a blow-up cannot take the test session with it), each
in-process through the CLI entry point (`minicpmv_edge.cli.main`) or the ctypes binding, under a SIGALRM timeout,
and reports each case's exit code, stderr and time, any traceback, and the worker's peak RSS.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 20
OUTSIDE = "/etc/passwd"   # a file outside every checkpoint folder: must never be opened


@dataclass
class Case:
    name: str
    kind: str                   # "inspect", "export" (checkpoint folder) or "mvr" (weights file)
    target: str
    file: str                   # the file name the one-line error must name
    fields: tuple[str, ...]     # it must name at least one of these ("" = the file is enough: JSON-level faults)


# =============================================================================================
# Checkpoints


def _clone(base: Path, dst: Path) -> Path:
    """A case folder: hard links to the base checkpoint's files (free), replaced one by one by the mutations."""
    dst.mkdir(parents=True)
    for f in base.iterdir():
        os.link(f, dst / f.name)
    return dst


def _replace(path: Path, data: bytes | str) -> None:
    """Write a new file at `path` (never through the hard link into the base checkpoint)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _json(obj) -> str:
    return json.dumps(obj, allow_nan=True)


def _st_split(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), len(raw) - 8 - n


def _st_with_header(path: Path, header_bytes: bytes, data_size: int, length: int | None = None) -> None:
    """A safetensors file with this header and `data_size` zero bytes of data (sparse: inspect never reads it)."""
    if path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if length is None else length))
        f.write(header_bytes)
        f.truncate(8 + len(header_bytes) + data_size)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


_BIG_INT = "9" * 5000


def checkpoint_corpus(base: Path, out: Path) -> list[Case]:
    from minicpmv_edge.export.checkpoint_checks import LLM_BOUNDS, PREPROCESS_BOUNDS, VISION_BOUNDS
    from minicpmv_edge.facts import facts_for

    config = json.loads((base / "config.json").read_text())
    pre = json.loads((base / "preprocessor_config.json").read_text())
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok = json.loads((base / "tokenizer.json").read_text())
    header, data_size = _st_split(base / "model.safetensors")
    facts = facts_for(config["version"])
    cases: list[Case] = []

    def add(name: str, file: str, fields: tuple[str, ...], mutate: Callable[[Path], None], kind: str = "inspect"):
        folder = _clone(base, out / "ckpt" / name)
        mutate(folder)
        cases.append(Case(name, kind, str(folder), file, fields))

    def config_with(path: tuple[str, ...], value) -> Callable[[Path], None]:
        def mutate(folder: Path) -> None:
            cfg = json.loads(json.dumps(config))
            node = cfg
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            _replace(folder / "config.json", _json(cfg))
        return mutate

    def pre_with(key: str, value) -> Callable[[Path], None]:
        return lambda folder: _replace(folder / "preprocessor_config.json", _json({**pre, key: value}))

    # --- every bounded number, below / above its bound and of the wrong kind
    def bad_values(bound):
        top = bound.top(facts)
        return {"below": bound.low - 1 if bound.kind is int else -1.0, "above": int(top) + 1 if bound.kind is int
                else top * 10, "nan": math.nan, "string": "12", "bool": True}

    for table, where in ((LLM_BOUNDS, ()), (VISION_BOUNDS, ("vision_config",)), (PREPROCESS_BOUNDS, ("slice_config",))):
        for key, bound in table.items():
            for label, value in bad_values(bound).items():
                field = ".".join((*where, key))
                add(f"config-{field}-{label}", "config.json", (field,), config_with((*where, key), value))
    for key, bound in PREPROCESS_BOUNDS.items():
        for label, value in bad_values(bound).items():
            add(f"preprocessor-{key}-{label}", "preprocessor_config.json", (key,), pre_with(key, value))
    # the issue's own cases
    add("issue-num_hidden_layers-1e9", "config.json", ("num_hidden_layers",),
        config_with(("num_hidden_layers",), 1_000_000_000))
    add("issue-rope_theta-nan", "config.json", ("rope_theta",), config_with(("rope_theta",), math.nan))
    add("issue-rms_norm_eps-inf", "config.json", ("rms_norm_eps",), config_with(("rms_norm_eps",), math.inf))
    add("issue-rms_norm_eps-minus-1", "config.json", ("rms_norm_eps",), config_with(("rms_norm_eps",), -1.0))
    add("issue-max_slice_nums-minus-3", "preprocessor_config.json", ("max_slice_nums",), pre_with("max_slice_nums", -3))
    # structure of config.json / preprocessor_config.json
    add("config-vision_config-list", "config.json", ("vision_config",), config_with(("vision_config",), [1]))
    add("config-version-nan", "config.json", ("version",), config_with(("version",), math.nan))
    add("config-version-99", "config.json", ("version",), config_with(("version",), 99.0))
    add("config-rope_scaling-list", "config.json", ("rope_scaling",), config_with(("rope_scaling",), [1, 2]))
    add("config-rope_scaling-factor-inf", "config.json", ("rope_scaling.factor",),
        config_with(("rope_scaling",), {"rope_type": "longrope", "factor": math.inf}))
    add("config-rope_scaling-short_factor-nan", "config.json", ("rope_scaling.short_factor",),
        config_with(("rope_scaling",), {"rope_type": "longrope", "short_factor": [1.0, math.nan]}))
    add("config-rope_parameters-theta-nan", "config.json", ("rope_parameters.rope_theta",),
        config_with(("rope_parameters",), {"rope_theta": math.nan}))
    add("config-eos_token_id-negative", "config.json", ("eos_token_id",), config_with(("eos_token_id",), -1))
    add("config-eos_token_id-list-string", "config.json", ("eos_token_id",), config_with(("eos_token_id",), [1, "x"]))
    add("config-vision-image_size-below-patch", "config.json", ("vision_config.image_size",),
        config_with(("vision_config", "image_size"), 10))
    add("preprocessor-norm_mean-two", "preprocessor_config.json", ("norm_mean",), pre_with("norm_mean", [0.5, 0.5]))
    add("preprocessor-norm_std-zero", "preprocessor_config.json", ("norm_std",), pre_with("norm_std", [0.5, 0, 0.5]))
    add("preprocessor-norm_std-strings", "preprocessor_config.json", ("norm_std",), pre_with("norm_std", ["a"] * 3))
    add("config-text_config-hidden_size-huge", "config.json", ("text_config.hidden_size",),
        config_with(("text_config", "hidden_size"), 10 ** 9))

    # --- JSON-level faults in every JSON file the reader opens
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in header if n != "__metadata__"}}
    json_files = {"config.json": None, "preprocessor_config.json": None, "tokenizer_config.json": None,
                  "tokenizer.json": None, "model.safetensors.index.json": index}
    bad_json = {"deep": _deep(100_000), "bigint": '{"a": ' + _BIG_INT + "}", "list": "[1, 2]", "string": '"x"',
                "not-json": "{'a': 1", "not-utf8": b'{"a": "\xff\xfe"}', "empty": ""}
    for fname in json_files:
        for label, text in bad_json.items():
            add(f"json-{fname}-{label}", fname, ("",), lambda folder, f=fname, t=text: _replace(folder / f, t))
        # larger than the reader's limit: a sparse file, so the case costs no disk
        def too_big(folder: Path, f=fname) -> None:
            _replace(folder / f, b"{")
            os.truncate(folder / f, 200 * 2 ** 20)
        add(f"json-{fname}-200MB", fname, ("",), too_big)

    # --- names that leave the folder, and things that are not regular files
    def with_index(weight_map_update: dict, extra: Callable[[Path], None] | None = None):
        def mutate(folder: Path) -> None:
            wm = dict(index["weight_map"])
            wm.update(weight_map_update)
            _replace(folder / "model.safetensors.index.json", _json({"metadata": {}, "weight_map": wm}))
            if extra:
                extra(folder)
        return mutate

    first = next(n for n in header if n != "__metadata__")
    for label, shard in {"dotdot": "../../../../etc/passwd", "absolute": OUTSIDE, "subdir": "sub/model.safetensors",
                         "int": 5, "list": ["model.safetensors"], "not-safetensors": "config.json",
                         "backslash": "..\\..\\x.safetensors"}.items():
        add(f"path-weight_map-{label}", "model.safetensors.index.json", ("weight_map",), with_index({first: shard}))
    add("path-weight_map-symlink-out", "evil.safetensors", ("",),
        with_index({first: "evil.safetensors"}, lambda f: os.symlink(OUTSIDE, f / "evil.safetensors")))
    add("path-weight_map-missing", "model.safetensors.index.json", ("weight_map",),
        with_index({first: "absent.safetensors"}))
    add("path-weight_map-empty", "model.safetensors.index.json", ("weight_map",),
        lambda f: _replace(f / "model.safetensors.index.json", _json({"weight_map": {}})))

    def symlinked(fname: str, to: str = OUTSIDE):
        def mutate(folder: Path) -> None:
            (folder / fname).unlink(missing_ok=True)
            os.symlink(to, folder / fname)
        return mutate

    def fifo(fname: str):
        def mutate(folder: Path) -> None:
            (folder / fname).unlink(missing_ok=True)
            os.mkfifo(folder / fname)
        return mutate

    def directory(fname: str):
        def mutate(folder: Path) -> None:
            (folder / fname).unlink(missing_ok=True)
            (folder / fname).mkdir()
        return mutate

    for fname in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                  "model.safetensors", "chat_template.jinja"):
        add(f"fifo-{fname}", fname, ("",), fifo(fname))
        add(f"symlink-out-{fname}", fname, ("",), symlinked(fname))
        add(f"symlink-dev-zero-{fname}", fname, ("",), symlinked(fname, "/dev/zero"))
    add("dir-model.safetensors", "model.safetensors", ("",), directory("model.safetensors"))
    add("dir-config.json", "config.json", ("",), directory("config.json"))

    # --- every safetensors header rule (data left as sparse zeros: the header is what is read)
    def st_case(label: str, header_bytes: bytes, fields=("",), length: int | None = None, size: int = data_size):
        add(f"safetensors-{label}", "model.safetensors", fields,
            lambda folder: _st_with_header(folder / "model.safetensors", header_bytes, size, length))

    def header_with(name: str, **entry) -> bytes:
        h = json.loads(json.dumps(header))
        h[name] = {**h[name], **entry}
        return _json(h).encode()

    for label, text in {"list": "[1]", "string": '"x"', "number": "3", "null": "null", "deep": _deep(10_000),
                        "bigint": '{"a": ' + _BIG_INT + "}", "not-json": "{{", "not-utf8": "\udcff"}.items():
        st_case(f"header-{label}", text.encode("utf-8", "surrogateescape"))
    st_case("length-past-end", b"{}", length=2 ** 40)
    st_case("length-huge", b"{}", length=2 ** 63)
    add("safetensors-7-bytes", "model.safetensors", ("",), lambda f: _replace(f / "model.safetensors", b"\x01" * 7))
    add("safetensors-empty", "model.safetensors", ("",), lambda f: _replace(f / "model.safetensors", b""))
    add("safetensors-text-file", "model.safetensors", ("",),
        lambda f: _replace(f / "model.safetensors", b"root:x:0:0:root:/root:/bin/bash\n" * 4))
    entry = header[first]
    begin, end = entry["data_offsets"]
    t = f"tensor {first!r}"
    for label, kw in {"entry-list": None, "dtype-unknown": {"dtype": "Q4"}, "dtype-int": {"dtype": 5},
                      "shape-string": {"shape": "12"}, "shape-negative": {"shape": [-1, *entry["shape"][1:]]},
                      "shape-float": {"shape": [float(s) for s in entry["shape"]]},
                      "shape-bool": {"shape": [True] * len(entry["shape"])}, "shape-deep": {"shape": [1] * 20},
                      "offsets-float": {"data_offsets": [float(begin), float(end)]},
                      "offsets-negative": {"data_offsets": [-2, end - begin - 2]},
                      "offsets-three": {"data_offsets": [begin, end, end]},
                      "offsets-reversed": {"data_offsets": [end, begin]},
                      "offsets-past-data": {"data_offsets": [data_size, data_size + end - begin]},
                      "offsets-bigint": {"data_offsets": [begin, 10 ** 19]},
                      "span-mismatch": {"data_offsets": [begin, end - 2]}}.items():
        if kw is None:
            h = json.loads(json.dumps(header))
            h[first] = [1, 2]
            st_case(label, _json(h).encode(), (t,))
        else:
            st_case(label, header_with(first, **kw), (t,))
    # two tensors on the same bytes: same shape and dtype, so every entry is fine on its own
    by_span = {}
    for name, e in header.items():
        if name != "__metadata__":
            by_span.setdefault((e["dtype"], tuple(e["shape"])), []).append(name)
    a, b = next(v for v in by_span.values() if len(v) >= 2)[:2]
    st_case("overlap", header_with(b, data_offsets=header[a]["data_offsets"]), ("tensor",))
    st_case("metadata-list", _json({**header, "__metadata__": [1]}).encode(), ("__metadata__",))

    # --- tokenizer files
    def tok_with(update: Callable[[dict], None]):
        def mutate(folder: Path) -> None:
            data = json.loads(json.dumps(tok))
            update(data)
            _replace(folder / "tokenizer.json", _json(data))
        return mutate

    def first_vocab(d, v):
        d["model"]["vocab"][next(iter(d["model"]["vocab"]))] = v
    add("tokenizer-vocab-id-string", "tokenizer.json", ("model.vocab",), tok_with(lambda d: first_vocab(d, "7")))
    add("tokenizer-vocab-id-negative", "tokenizer.json", ("model.vocab",), tok_with(lambda d: first_vocab(d, -7)))
    add("tokenizer-model-list", "tokenizer.json", ("model",), tok_with(lambda d: d.update(model=[1])))
    add("tokenizer-merges-ints", "tokenizer.json", ("model.merges",),
        tok_with(lambda d: d["model"].update(merges=[1, 2])))
    add("tokenizer-added_tokens-dict", "tokenizer.json", ("added_tokens",), tok_with(lambda d: d.update(added_tokens={})))
    add("tokenizer-added_tokens-id-string", "tokenizer.json", ("added_tokens",),
        tok_with(lambda d: d["added_tokens"][0].update(id="x")))

    def tok_cfg_with(**kw):
        return lambda folder: _replace(folder / "tokenizer_config.json", _json({**tok_cfg, **kw}))
    add("tokenizer_config-decoder-key", "tokenizer_config.json", ("added_tokens_decoder",),
        tok_cfg_with(added_tokens_decoder={"abc": {"content": "x"}}))
    add("tokenizer_config-decoder-list", "tokenizer_config.json", ("added_tokens_decoder",),
        tok_cfg_with(added_tokens_decoder=[1]))
    add("tokenizer_config-chat_template-number", "tokenizer_config.json", ("chat_template",), tok_cfg_with(chat_template=5))
    add("tokenizer_config-chat_template-strings", "tokenizer_config.json", ("chat_template",),
        tok_cfg_with(chat_template=["a", "b"]))

    def big_template(folder: Path) -> None:
        _replace(folder / "chat_template.jinja", b"x")
        os.truncate(folder / "chat_template.jinja", 8 * 2 ** 20)
    add("chat_template-8MB", "chat_template.jinja", ("",), big_template)

    # --- NaN / Inf weights: inspect reads no tensor data, export must refuse naming the tensor
    def poison(name: str, bits: bytes):
        def mutate(folder: Path) -> None:
            path = folder / "model.safetensors"
            raw = bytearray(path.read_bytes())
            (n,) = struct.unpack("<Q", raw[:8])
            at = 8 + n + header[name]["data_offsets"][0]
            raw[at:at + 2] = bits
            _replace(path, bytes(raw))
        return mutate
    for name, label, bits in (("llm.model.embed_tokens.weight", "nan", b"\xc0\x7f"),
                              ("llm.model.norm.weight", "inf", b"\x80\x7f"),
                              ("llm.model.layers.1.mlp.down_proj.weight", "minus-inf", b"\x80\xff"),
                              ("resampler.query", "nan", b"\xc1\x7f")):
        add(f"export-{label}-{name}", "model.safetensors", (name,), poison(name, bits), kind="export")
    return cases


# =============================================================================================
# Resampler weight files (.mvr)

MVR_FIELDS = ("magic", "version", "dtype", "embed_dim", "kv_dim", "query_num", "num_heads", "layer_norm_eps",
              "n_tensors", "file_size", "reserved", "tensor table", "attention rows")


def weights_corpus(good: Path, out: Path) -> list[Case]:
    from minicpmv_edge.runtime.resampler import ENTRY, HEADER, LAYOUT

    raw = good.read_bytes()
    size = len(raw)
    folder = out / "mvr"
    folder.mkdir(parents=True)
    fields = MVR_FIELDS + ("tensor ",)   # header fields, or a tensor by name ("tensor attn.wq: ...")
    cases: list[Case] = []

    def add(name: str, data: bytes | None = None, make: Callable[[Path], None] | None = None,
            names: tuple[str, ...] = fields) -> None:
        path = folder / f"{name}.mvr"
        if make:
            make(path)
        else:
            path.write_bytes(data)
        cases.append(Case(name, "mvr", str(path), path.name, names))

    def patched(at: int, fmt: str, value) -> bytes:
        b = bytearray(raw)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)

    header_u32 = {"version": 8, "dtype": 12, "embed_dim": 16, "kv_dim": 20, "query_num": 24, "num_heads": 28,
                  "n_tensors": 36}
    for field, at in header_u32.items():
        (old,) = struct.unpack_from("<I", raw, at)
        for value in {0, 1, 2, 3, 5, 65, 4097, 8196, 65537, 0xFFFFFFFF, old + 1} - {old}:
            d, q = struct.unpack_from("<I", raw, 16)[0], struct.unpack_from("<I", raw, 24)[0]
            if field == "num_heads" and value and d % value == 0 and value <= 64 and value * q <= 4096:
                continue   # another valid head count: the file is still a good one
            add(f"header-{field}-{value}", patched(at, "<I", value))
    for label, value in {"nan": math.nan, "inf": math.inf, "zero": 0.0, "minus-1": -1.0, "two": 2.0}.items():
        add(f"header-eps-{label}", patched(32, "<f", value))
    for label, value in {"minus-1": size - 1, "plus-1": size + 1, "zero": 0, "max": 2 ** 64 - 1}.items():
        add(f"header-file_size-{label}", patched(40, "<Q", value))
    add("header-reserved-48", patched(48, "<B", 1))
    add("header-reserved-63", patched(63, "<B", 0x80))
    add("header-magic", b"XVERSMPL" + raw[8:])
    # the tensor table: every entry, every field
    for i in range(len(LAYOUT)):
        at = HEADER.size + i * ENTRY.size
        tid, tdtype, rows, cols, off, nbytes = ENTRY.unpack_from(raw, at)
        prev_off = ENTRY.unpack_from(raw, at - ENTRY.size)[4] if i else 0
        for label, entry in {"id": (tid + 1, tdtype, rows, cols, off, nbytes),
                             "dtype": (tid, tdtype ^ 1, rows, cols, off, nbytes),
                             "rows": (tid, tdtype, rows + 1, cols, off, nbytes),
                             "misaligned": (tid, tdtype, rows, cols, off + 4, nbytes),
                             "overlap": (tid, tdtype, rows, cols, prev_off, nbytes),
                             "nbytes": (tid, tdtype, rows, cols, off, nbytes + 4),
                             "offset-huge": (tid, tdtype, rows, cols, 2 ** 63, nbytes)}.items():
            if entry[4:] == (off, nbytes) and entry[:4] == (tid, tdtype, rows, cols):
                continue
            b = bytearray(raw)
            ENTRY.pack_into(b, at, *entry)
            add(f"table-{i:02d}-{label}", bytes(b))
        if nbytes:
            b = bytearray(raw)
            struct.pack_into("<f" if tdtype == 0 else "<e", b, off, math.nan)
            add(f"data-{i:02d}-nan", bytes(b))
    for cut in (0, 10, 63, 64, 600, size // 2, size - 1):   # below 64 bytes there is no field to name
        add(f"truncated-{cut}", raw[:cut], names=fields if cut >= 64 else ("",))
    add("fifo", make=lambda p: os.mkfifo(p), names=("",))
    add("directory", make=lambda p: p.mkdir(), names=("",))
    add("double-free-embed-dim-1", (ROOT / "bindings/tests/corpus/double-free-embed-dim-1.mvr").read_bytes())
    return cases


# =============================================================================================
# Running the corpus


def run_corpus(cases: list[Case], out: Path, timeout_s: int = 600) -> tuple[list[dict], float]:
    """Run every case in one worker subprocess; (results, the worker's peak RSS in MiB)."""
    spec = out / "cases.json"
    result = out / "results.json"
    spec.write_text(json.dumps([asdict(c) for c in cases]))
    done = subprocess.run([sys.executable, __file__, str(spec), str(result), str(out / "exports")],
                          capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(result.read_text())
    return data["results"], data["peak_rss_mb"]


class _Timeout(Exception):
    pass


def _worker(spec: Path, result: Path, exports: Path) -> None:
    import contextlib
    import io
    import resource
    import signal
    import time
    import traceback

    from minicpmv_edge import cli
    from minicpmv_edge.errors import MiniCPMVEdgeError
    from minicpmv_edge.runtime.resampler import NativeResampler, NumpyResampler

    def alarm(signum, frame):
        raise _Timeout(f"no answer in {CASE_TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, alarm)
    results = []
    for c in json.loads(spec.read_text()):
        err, outs = io.StringIO(), io.StringIO()
        rec = {"name": c["name"], "rc": None, "stderr": "", "traceback": None, "seconds": 0.0, "numpy": None}
        t0 = time.perf_counter()
        signal.alarm(CASE_TIMEOUT_S)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outs):
                if c["kind"] == "inspect":
                    rec["rc"] = cli.main(["inspect", c["target"]])
                elif c["kind"] == "export":
                    dest = exports / c["name"]
                    rec["rc"] = cli.main(["export", c["target"], "--out", str(dest), "--llm", "F32", "--mmproj",
                                          "none", "--vision", "none", "--resampler", "f32"])
                    rec["outputs"] = sorted(p.name for p in dest.glob("*")) if dest.exists() else []
                else:
                    try:
                        NativeResampler(c["target"]).close()
                        rec["rc"] = 0
                    except MiniCPMVEdgeError as exc:
                        rec["rc"], rec["stderr"] = 1, str(exc)
                    try:
                        NumpyResampler(c["target"])
                    except MiniCPMVEdgeError as exc:
                        rec["numpy"] = str(exc)
        except BaseException:  # noqa: BLE001 - the point is to record whatever escapes
            rec["traceback"] = traceback.format_exc()[-3000:]
        finally:
            signal.alarm(0)
        rec["seconds"] = time.perf_counter() - t0
        if c["kind"] != "mvr":
            rec["stderr"] = err.getvalue()
        results.append(rec)
    # VmHWM: this process's own peak. (ru_maxrss would not do: Linux carries it over fork+exec from the
    # parent, here a pytest process that may hold gigabytes.)
    status = Path("/proc/self/status")
    hwm = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")] \
        if status.exists() else []
    peak = int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(json.dumps({"results": results, "peak_rss_mb": peak}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
