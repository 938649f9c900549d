"""Resampler kernels (bindings/, runtime/resampler.py) against the torch reference (export/reference.py, itself
checked against torch.nn.MultiheadAttention in test_reference.py).

Error measure everywhere: max |ours - ref| / max |ref| over the whole [64, D] output. Tolerances: 1e-4 with
float32 weights, 2e-3 with float16 weights (the reference keeps float32). Every check prints its measured
error and tolerance (run with -s to see them).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv_edge import _native
from minicpmv_edge.export import reference as R
from minicpmv_edge.export.checkpoint import Checkpoint, ResamplerConfig
from minicpmv_edge.export.resampler_weights import write_resampler_file, write_resampler_weights
from minicpmv_edge.runtime import resampler as RS

TOL = {"f32": 1e-4, "f16": 2e-3}
GRIDS = [(32, 32), (28, 40), (16, 70), (1, 1)]
HEADER = Path(__file__).resolve().parents[1] / "bindings" / "include" / "mve.h"


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "output holds NaN or infinity"
    return float(np.abs(got - want).max() / np.abs(want).max())


def parity(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> float:
    """The one comparison helper of the kernel tests: print, then fail loudly with the first mismatches."""
    err = rel_err(got, want)
    print(f"\n[parity] {name}: max rel err {err:.3g} (tolerance {tol:.0e})")
    if err > tol:
        diff = np.abs(np.asarray(got) - np.asarray(want)).reshape(-1)
        worst = np.argsort(diff)[::-1][:5]
        pairs = ", ".join(f"[{i}] {np.asarray(got).reshape(-1)[i]:.6g} vs {np.asarray(want).reshape(-1)[i]:.6g}"
                          for i in worst)
        pytest.fail(f"{name}: max rel err {err:.3g} > {tol:.0e}; worst: {pairs}")
    return err


def native_available() -> bool:
    try:
        _native.load()
        return True
    except OSError:
        return False


needs_native = pytest.mark.skipif(not native_available(), reason="libmve not built (pip install -e .)")


def random_reference(d: int, kv_dim: int = 1152, seed: int = 0, query_num: int = 64) -> R.Resampler:
    """A torch reference resampler at width d with random weights of sane scale (fan-in scaled matrices,
    LayerNorm gains near 1), so attention is neither uniform nor one-hot."""
    cfg = ResamplerConfig(embed_dim=d, num_heads=d // 128, kv_dim=kv_dim, query_num=query_num)
    r = R.Resampler(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in r.named_parameters():
            if name.startswith("ln_"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        r.query.mul_(4.0)  # learned queries are not unit-scale; sharper attention is the harder case
    return r.eval()


def write_from_torch(r: R.Resampler, path: Path, dtype: str) -> Path:
    state = {k: v.detach().numpy() for k, v in r.state_dict().items()}
    cfg = r.cfg
    header = RS.ResamplerHeader(RS.WeightDType.parse(dtype), cfg.embed_dim, cfg.kv_dim, cfg.query_num,
                                cfg.num_heads, cfg.layer_norm_eps)
    return write_resampler_file(path, header, state.__getitem__)


def torch_2d(r: R.Resampler, x: np.ndarray, h: int, w: int) -> np.ndarray:
    with torch.no_grad():
        return r([torch.from_numpy(x)], [(h, w)])[0].numpy()


# ---------------------------------------------------------------------------------------------
# The file format


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    ckpt = Checkpoint.open(tiny_checkpoint("4.5"))
    out = tmp_path_factory.mktemp("mvr")
    files = {dt: write_resampler_weights(ckpt, out / f"tiny_{dt}.mvr", dt) for dt in ("f32", "f16")}
    return ckpt, R.Resampler.from_checkpoint(ckpt), files


def test_weights_file_round_trip(tiny):
    ckpt, _, files = tiny
    for dt, path in files.items():
        header, t = RS.read_resampler_file(path)
        assert (header.embed_dim, header.kv_dim, header.query_num) == (256, 64, 64)
        assert header.dtype is RS.WeightDType.parse(dt)
        assert path.stat().st_size == header.file_size()
        for row, offset, nbytes, _ in header.layout():
            assert offset % 64 == 0
        in_proj = ckpt.tensor("resampler.attn.in_proj_weight")
        np.testing.assert_array_equal(t[RS.Tensor.WK], in_proj[256:512].astype(header.dtype.numpy))
        np.testing.assert_array_equal(t[RS.Tensor.PROJ_T], ckpt.tensor("resampler.proj").T.astype(header.dtype.numpy))
        np.testing.assert_array_equal(t[RS.Tensor.BV][0], ckpt.tensor("resampler.attn.in_proj_bias")[512:])
        assert t[RS.Tensor.LN_Q_W].dtype == np.float32 and t[RS.Tensor.WO].dtype == header.dtype.numpy
        # the derived KV_NORM_R: ||R x|| is the norm of LN_kv's centred input z - mean(z), z = kv_proj x
        x = np.random.default_rng(0).standard_normal((5, 64))
        z = x @ ckpt.tensor("resampler.kv_proj.weight").T.astype(np.float64)
        want = np.linalg.norm(z - z.mean(axis=1, keepdims=True), axis=1)
        np.testing.assert_allclose(np.linalg.norm(x @ t[RS.Tensor.KV_NORM_R].T.astype(np.float64), axis=1), want,
                                   rtol=1e-6)
    assert not list(path.parent.glob("*.partial"))


def test_weights_file_rejects_bad_files(tiny, tmp_path):
    _, _, files = tiny
    raw = files["f32"].read_bytes()
    cases = {"truncated": raw[:-4], "magic": b"XXXXXXXX" + raw[8:],
             "version": raw[:8] + (7).to_bytes(4, "little") + raw[12:]}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.mvr"
        bad.write_bytes(blob)
        with pytest.raises(RS.ResamplerFormatError):
            RS.read_header(bad)
    with pytest.raises(ValueError, match="float16 cannot hold"):
        big = random_reference(256, 64)
        with torch.no_grad():
            big.proj[0, 0] = 1e5
        write_from_torch(big, tmp_path / "big.mvr", "f16")


@needs_native
def test_binding_mirrors_header():
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    decls = re.findall(r"MVE_API\s+[\w\s\*]+?\b(mve_\w+)\s*\(([^)]*)\)\s*;", text)
    declared = {name: 0 if args.strip() in ("", "void") else args.count(",") + 1 for name, args in decls}
    assert declared == _native.bound_signatures()
    assert _native.abi_version() == 2


# ---------------------------------------------------------------------------------------------
# Tiny checkpoint: every backend, plan and variant


@needs_native
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_tiny_checkpoint_all_plans(tiny, dtype):
    _, ref, files = tiny
    rng = np.random.default_rng(1)
    for h, w in GRIDS:
        x = rng.standard_normal((h * w, 64), dtype=np.float32)
        want = torch_2d(ref, x, h, w)
        parity(f"tiny 4.5 {dtype} {h}x{w} numpy", RS.NumpyResampler(files[dtype]).run(x, h, w), want, TOL[dtype])
        for kernel in _native.available_kernels():
            for fold in RS.FOLDS:
                with RS.NativeResampler(files[dtype], threads=2, fold=fold, kernel=kernel) as r:
                    parity(f"tiny 4.5 {dtype} {h}x{w} native {kernel} fold={fold}", r.run(x, h, w), want,
                           TOL[dtype])


@needs_native
def test_tiny_checkpoint_temporal_groups(tiny):
    _, ref, files = tiny
    rng = np.random.default_rng(2)
    temporal_ids = [[7], [3, 5, 8], [10, 11, 12, 13, 14, 15], [-1]]
    sizes = [(32, 32)] + [(16, 20)] * 3 + [(12, 12), (12, 12), (12, 14), (12, 12), (12, 12), (12, 12)] + [(28, 40)]
    feats = [rng.standard_normal((h * w, 64), dtype=np.float32) for h, w in sizes]
    with torch.no_grad():
        want = ref.forward_temporal([torch.from_numpy(f) for f in feats], sizes, temporal_ids).numpy()
    parity("tiny temporal groups numpy", RS.NumpyResampler(files["f32"]).forward_temporal(feats, sizes, temporal_ids),
           want, TOL["f32"])
    for fold in RS.FOLDS:
        with RS.NativeResampler(files["f32"], threads=2, fold=fold) as r:
            got = r.forward_temporal(feats, sizes, temporal_ids)
        for g, name in enumerate(["1 frame", "3 frames", "6 frames (mixed sizes)", "still image (-1)"]):
            parity(f"tiny temporal, group of {name}, fold={fold}", got[g], want[g], TOL["f32"])


@needs_native
def test_identity_kv_proj(tmp_path):
    """kv_dim == D: the HF code has no kv_proj (identity); the file stores an empty entry."""
    ref = random_reference(256, kv_dim=256, seed=3)
    x = np.random.default_rng(4).standard_normal((12 * 20, 256), dtype=np.float32)
    want = torch_2d(ref, x, 12, 20)
    path = write_from_torch(ref, tmp_path / "identity.mvr", "f32")
    assert RS.Tensor.KV_PROJ not in RS.read_resampler_file(path)[1]
    parity("identity kv_proj numpy", RS.NumpyResampler(path).run(x, 12, 20), want, TOL["f32"])
    for fold in RS.FOLDS:
        with RS.NativeResampler(path, fold=fold) as r:
            parity(f"identity kv_proj native fold={fold}", r.run(x, 12, 20), want, TOL["f32"])


# ---------------------------------------------------------------------------------------------
# Real widths (random weights): D in {2560, 3584, 4096}, kv_dim 1152


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """{D: (torch reference, {dtype: weights file})}, built once per width on first use."""
    out, made = tmp_path_factory.mktemp("wide"), {}

    def get(d: int):
        if d not in made:
            made.clear()  # one width in memory at a time
            ref = random_reference(d, seed=d)
            made[d] = ref, {dt: write_from_torch(ref, out / f"d{d}_{dt}.mvr", dt) for dt in ("f32", "f16")}
        return made[d]

    yield get
    made.clear()


@needs_native
def test_wide_other_plans_and_numpy(wide):
    """The unfolded and query-folded plans and the numpy backend at one real width (the fully folded plan is
    the one test_wide_parity_vs_torch covers at every width)."""
    ref, files = wide(2560)
    x = np.random.default_rng(7).standard_normal((28 * 40, 1152), dtype=np.float32)
    want = torch_2d(ref, x, 28, 40)
    for fold in ("none", "query"):
        with RS.NativeResampler(files["f32"], threads=2, fold=fold) as r:
            parity(f"D=2560 28x40 f32 native fold={fold}", r.run(x, 28, 40), want, TOL["f32"])
    parity("D=2560 28x40 f32 numpy", RS.NumpyResampler(files["f32"]).run(x, 28, 40), want, TOL["f32"])


@needs_native
@pytest.mark.parametrize("d", [2560, 3584, 4096])
def test_wide_parity_vs_torch(wide, d):
    ref, files = wide(d)
    rng = np.random.default_rng(d)
    native = {dt: RS.NativeResampler(files[dt], threads=2) for dt in files}   # auto kernel, full folding
    try:
        for h, w in GRIDS:
            x = rng.standard_normal((h * w, 1152), dtype=np.float32)
            want = torch_2d(ref, x, h, w)
            for dt, r in native.items():
                parity(f"D={d} {h}x{w} {dt} native {r.kernel} fold=full", r.run(x, h, w), want, TOL[dt])
        # a 3-frame temporal group (4.5 video)
        sizes, ids = [(16, 20)] * 3, [[4, 9, 13]]
        feats = [rng.standard_normal((h * w, 1152), dtype=np.float32) for h, w in sizes]
        with torch.no_grad():
            want = ref.forward_temporal([torch.from_numpy(f) for f in feats], sizes, ids).numpy()
        for dt, r in native.items():
            parity(f"D={d} temporal 3 frames {dt} native", r.forward_temporal(feats, sizes, ids), want, TOL[dt])
    finally:
        for r in native.values():
            r.close()


# ---------------------------------------------------------------------------------------------
# Errors and the fallback


@needs_native
def test_native_errors_are_exceptions_with_messages(tiny, tmp_path):
    _, _, files = tiny
    path = files["f32"]
    with pytest.raises(RS.ResamplerError, match="embed_dim is 256 but the caller expects 4096"):
        RS.NativeResampler(path, expect_embed_dim=4096)
    with pytest.raises(RS.ResamplerError, match="unknown kernel variant 'sse9'"):
        RS.NativeResampler(path, kernel="sse9")
    missing = [k for k in _native.KERNEL_VARIANTS if k not in _native.available_kernels()]
    for k in missing:
        with pytest.raises(RS.ResamplerError, match=f"'{k}' is not built"):
            RS.NativeResampler(path, kernel=k)
    truncated = tmp_path / "t.mvr"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RS.ResamplerError, match="truncated"):
        RS.NativeResampler(truncated)
    with pytest.raises(RS.ResamplerError, match="cannot open"):
        RS.NativeResampler(tmp_path / "absent.mvr")
    r = RS.NativeResampler(path)
    x = np.zeros((4, 64), np.float32)
    with pytest.raises(RS.ResamplerError, match=r"grid 0 x 4 out of range"):
        r.run(x, 0, 4)
    with pytest.raises(RS.ResamplerError, match="out of range"):
        r.run(np.zeros((2048 * 2, 64), np.float32), 2048, 2)
    x[2, 5] = np.nan
    with pytest.raises(RS.ResamplerError, match="NaN or infinity at patch 2, channel 5"):
        r.run(x, 2, 2)
    with pytest.raises(ValueError, match="expected at least"):
        r.run(np.zeros((3, 64), np.float32), 2, 2)
    r.close()
    r.close()  # idempotent
    with pytest.raises(RS.ResamplerError, match="closed"):
        r.run(np.zeros((4, 64), np.float32), 2, 2)


def test_load_resampler_falls_back_to_numpy(tiny, monkeypatch):
    _, _, files = tiny

    def no_library():
        raise OSError("libmve not found (test)")

    monkeypatch.setattr(_native, "load", no_library)
    with pytest.warns(RuntimeWarning, match="using numpy"):
        r = RS.load_resampler(files["f32"])
    assert r.backend == "numpy"
    with pytest.raises(OSError):
        RS.load_resampler(files["f32"], backend="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RS.load_resampler(files["f32"], backend="numpy").backend == "numpy"
    with pytest.raises(RS.ResamplerFormatError, match="kv_dim is 64 but 1152"):
        RS.load_resampler(files["f32"], backend="numpy", expect_kv_dim=1152)
