"""Kernel variants and the C API under hostile input.

* every variant this machine runs (avx2 here) against the generic C kernels, in process, every plan and dtype;
* MVE_KERNEL pins the variant "auto" picks (decided once per process, so checked in subprocesses);
* aarch64: the library and bindings/tests/mve_check.c are cross-built with CMake (-DMVE_CROSS_AARCH64=ON,
  Debian's gcc-aarch64-linux-gnu) and run under qemu-aarch64; the NEON variant is compared with the torch
  reference and with the generic kernels on the same inputs, so a wrong NEON kernel fails here;
* bindings/tests/mve_fuzz.c under AddressSanitizer + UndefinedBehaviorSanitizer: NULLs, bad grids, NaNs,
  truncated and mutated weight files must give error codes, never a crash.

The cross and sanitizer builds live in build/tests-* and are incremental, so reruns take seconds.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv_edge import _native
from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.export import reference as R
from minicpmv_edge.export.resampler_weights import write_resampler_weights
from minicpmv_edge.runtime import resampler as RS

from test_kernels import TOL, native_available, parity, random_reference, torch_2d, write_from_torch

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
SYSROOT = "/usr/aarch64-linux-gnu"
# Variant vs generic: the same weights, only the summation order differs. With f16 weights the load-time folds are
# stored in f16 too, and a different summation order can move a folded value across a rounding boundary (one f16
# ulp, 2^-11 relative, ~5e-5 at the output); so f16 files are compared with generic unfolded (every matrix
# through the f16 tile kernel, no rounded folds) and their folded plans against torch with TOL["f16"].
VARIANT_TOL = 2e-5

needs_native = pytest.mark.skipif(not native_available(), reason="libmve not built (pip install -e .)")


def _cmake_build(build_dir: Path, *args: str) -> Path:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build_dir / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *gen, "-DMVE_BUILD_TESTS=ON", *args],
                       check=True, capture_output=True, text=True)
    done = subprocess.run(["cmake", "--build", str(build_dir), "--target", "mve_check", "mve_fuzz"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return build_dir / "bindings"


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """A D=512, kv_dim=1152 resampler (4 heads): big enough to cover every code path, small enough for
    generic C and qemu."""
    ref = random_reference(512, seed=5)
    out = tmp_path_factory.mktemp("mid")
    return ref, {dt: write_from_torch(ref, out / f"mid_{dt}.mvr", dt) for dt in ("f32", "f16")}


@pytest.fixture(scope="module")
def tiny_file(tiny_checkpoint, tmp_path_factory):
    ckpt = Checkpoint.open(tiny_checkpoint("4.5"))
    out = tmp_path_factory.mktemp("tinyw")
    return R.Resampler.from_checkpoint(ckpt), {dt: write_resampler_weights(ckpt, out / f"t_{dt}.mvr", dt)
                                              for dt in ("f32", "f16")}


# ---------------------------------------------------------------------------------------------
# Variants in process


@needs_native
def test_every_variant_matches_generic(mid):
    ref, files = mid
    variants = [k for k in _native.available_kernels() if k != "generic"]
    if not variants:
        pytest.skip("this build has only the generic kernels")
    rng = np.random.default_rng(11)
    cases = [((16, 20),), ((1, 1),), ((7, 9), (7, 9), (5, 11))]       # slices and a 3-frame group
    for dt, path in files.items():
        for fold in RS.FOLDS if dt == "f32" else ["none"]:
            with RS.NativeResampler(path, threads=2, fold=fold, kernel="generic") as gen:
                others = [RS.NativeResampler(path, threads=2, fold=fold, kernel=k) for k in variants]
                for grids in cases:
                    feats = [rng.standard_normal((h * w, 1152), dtype=np.float32) for h, w in grids]
                    ids = [-1] if len(grids) == 1 else [2, 4, 6]
                    want = gen.run_group(feats, grids, ids)
                    for o in others:
                        parity(f"{o.kernel} vs generic, {dt} fold={fold} {grids}", o.run_group(feats, grids, ids),
                               want, VARIANT_TOL)
                for o in others:
                    o.close()
            # the last case is the 3-frame group: generic itself against torch
            with torch.no_grad():
                torch_want = ref.forward_temporal([torch.from_numpy(f) for f in feats], list(grids), [ids])[0]
            parity(f"generic vs torch, {dt} fold={fold} 3-frame group", want, torch_want.numpy(), TOL[dt])
        if dt == "f16":
            for k in variants:
                for fold in ("query", "full"):
                    with RS.NativeResampler(path, threads=2, fold=fold, kernel=k) as o:
                        parity(f"{k} vs torch, f16 fold={fold} 3-frame group", o.run_group(feats, grids, ids),
                               torch_want.numpy(), TOL[dt])


def _auto_kernel_with(env_value: str) -> subprocess.CompletedProcess:
    code = ("from minicpmv_edge import _native as n; import sys; k = n.auto_kernel(); print(k)")
    env = {**os.environ, "MVE_KERNEL": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@needs_native
def test_mve_kernel_environment_pins_the_variant(tiny_file):
    for name in _native.available_kernels():
        assert _auto_kernel_with(name).stdout.strip() == name
    code = ("import sys; from minicpmv_edge.runtime.resampler import NativeResampler, ResamplerError\n"
            "try:\n    NativeResampler(sys.argv[1])\nexcept ResamplerError as e:\n    print(e)")
    env = {**os.environ, "MVE_KERNEL": "sse9"}
    out = subprocess.run([sys.executable, "-c", code, str(tiny_file[1]["f32"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert "MVE_KERNEL=sse9" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# aarch64 under qemu


def _have_cross() -> bool:
    return bool(shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64") and shutil.which("cmake"))


@pytest.fixture(scope="module")
def aarch64_check():
    if not _have_cross():
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user (setup.sh installs them)")
    bindir = _cmake_build(BUILD / "tests-aarch64", "-DMVE_CROSS_AARCH64=ON", "-DCMAKE_BUILD_TYPE=Release")
    exe = bindir / "mve_check"

    def run(*args: str) -> subprocess.CompletedProcess:
        # binfmt_misc is not registered on these machines: always call qemu explicitly
        return subprocess.run(["qemu-aarch64", "-L", SYSROOT, str(exe), *args], capture_output=True, text=True,
                              timeout=120)
    return run


def _qemu_resample(run, tmp: Path, weights: Path, feats: list[np.ndarray], grids, ids, kernel: str,
                   fold: int) -> np.ndarray:
    x, out = tmp / "x.f32", tmp / f"out_{kernel}_{fold}.f32"
    np.concatenate(feats).astype("<f4").tofile(x)
    done = run(str(weights), str(x), str(out), kernel, str(fold), "2", ",".join(f"{h},{w}" for h, w in grids),
               ",".join(str(i) for i in ids))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"kernel {kernel} fold {fold}" in done.stdout
    return np.fromfile(out, dtype="<f4")


def test_aarch64_neon_under_qemu(aarch64_check, tiny_file, mid, tmp_path):
    info = aarch64_check("--info")
    assert info.returncode == 0 and "available generic neon" in info.stdout and "auto neon" in info.stdout, info
    rng = np.random.default_rng(3)
    # tiny 4.5 checkpoint, a 12x20 slice: every plan with f32 weights, unfolded and fully folded with f16
    ref, files = tiny_file
    h, w = 12, 20
    x = rng.standard_normal((h * w, 64), dtype=np.float32)
    want = torch_2d(ref, x, h, w)
    for dt, path in files.items():
        gen = _qemu_resample(aarch64_check, tmp_path, path, [x], [(h, w)], [-1], "generic", 0).reshape(want.shape)
        parity(f"aarch64 generic tiny {dt} {h}x{w} fold=0 vs torch", gen, want, TOL[dt])
        for fold in (0, 1, 2) if dt == "f32" else (0, 2):
            got = _qemu_resample(aarch64_check, tmp_path, path, [x], [(h, w)], [-1], "neon", fold)
            parity(f"aarch64 neon tiny {dt} {h}x{w} fold={fold} vs torch", got.reshape(want.shape), want, TOL[dt])
            if fold == 0 or dt == "f32":
                parity(f"aarch64 neon fold={fold} vs generic fold=0, tiny {dt}", got.reshape(want.shape), gen,
                       VARIANT_TOL)
    # D=512, kv_dim=1152: a 3-frame temporal group and an odd grid (tails in every dimension)
    ref, files = mid
    grids, ids = [(6, 10), (6, 10), (5, 13)], [1, 4, 9]
    feats = [rng.standard_normal((h * w, 1152), dtype=np.float32) for h, w in grids]
    with torch.no_grad():
        want = ref.forward_temporal([torch.from_numpy(f) for f in feats], grids, [ids])[0].numpy()
    for dt, path in files.items():
        got = _qemu_resample(aarch64_check, tmp_path, path, feats, grids, ids, "neon", 2).reshape(want.shape)
        parity(f"aarch64 neon D=512 {dt} 3-frame group vs torch", got, want, TOL[dt])


# ---------------------------------------------------------------------------------------------
# The C API under AddressSanitizer


CORPUS = ROOT / "bindings" / "tests" / "corpus"   # weights files that once crashed libmve
# Seconds of random fuzzing per run of the suite (CI runs it on every change; set MVE_FUZZ_SECONDS for longer).
FUZZ_SECONDS = float(os.environ.get("MVE_FUZZ_SECONDS", "30"))
SANITIZE = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -O1 -g"
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


def _no_sanitizer_report(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr[-4000:]


def test_c_api_fuzz_under_sanitizers(tiny_file, capsys):
    """The scripted fuzzer, the crafted corpus (each file loaded with every fold and run small, large, small,
    temporal), then FUZZ_SECONDS of random shapes and mutations, all under ASan + UBSan: 0 findings."""
    if not shutil.which("cmake") or not shutil.which("gcc"):
        pytest.skip("needs cmake and gcc")
    crafted = sorted(CORPUS.glob("*.mvr"))
    assert crafted, f"no crafted files in {CORPUS}"
    bindir = _cmake_build(BUILD / "tests-asan", "-DCMAKE_BUILD_TYPE=Debug", f"-DCMAKE_C_FLAGS={SANITIZE}")
    env = {**os.environ, **SANITIZER_ENV}
    files = list(tiny_file[1].items())
    for seed, (dt, path) in enumerate(files):
        args = [str(bindir / "mve_fuzz"), str(path), str(seed), "--seconds", str(FUZZ_SECONDS / len(files)),
                *map(str, crafted)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300 + FUZZ_SECONDS)
        print("\n" + done.stdout.strip())
        _no_sanitizer_report(done)
        assert "0 failures" in done.stdout
        assert f"crafted {crafted[0]}:" in done.stdout
        cases = re.search(r"random phase: (\d+) cases executed", done.stdout)
        assert cases and int(cases.group(1)) > 0, done.stdout
        with capsys.disabled():    # the count belongs in CI's log, passed or not
            print(f"\n[fuzz] ASan/UBSan mve_fuzz ({dt}): {cases.group(1)} random cases + {len(crafted)} crafted "
                  "files, 0 findings")


def test_libfuzzer_harness(tmp_path, capsys):
    """bindings/tests/mve_libfuzzer.c, coverage-guided from the crafted corpus and small valid files, for
    FUZZ_SECONDS / 2 under ASan + UBSan: libFuzzer exits non-zero on any crash, leak, sanitizer report or
    timeout. Needs clang (setup.sh installs it)."""
    clang = shutil.which("clang")
    if not clang:
        pytest.skip("needs clang with libFuzzer (setup.sh installs it with apt)")
    src = ROOT / "bindings"
    exe = BUILD / "tests-libfuzzer" / "mve_libfuzzer"
    exe.parent.mkdir(parents=True, exist_ok=True)
    sources = [src / "src" / f for f in ("mve_core.c", "dispatch.c", "pool.c", "gemm.c", "weights.c",
                                          "resampler.c")] + [src / "tests" / "mve_libfuzzer.c"]
    built = subprocess.run([clang, "-fsanitize=fuzzer", *SANITIZE.split(), "-std=gnu11", f"-I{src / 'include'}",
                            f"-I{src / 'src'}", *map(str, sources), "-lm", "-lpthread", "-o", str(exe)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for path in CORPUS.glob("*.mvr"):
        shutil.copy(path, seeds / path.name)
    # small valid files (a few KB, so mutations reach the header and table often and every input runs in ms):
    # the smallest shape the header allows, and two more
    rng = np.random.default_rng(0)
    for dtype, d, c, q, heads in ((0, 4, 4, 1, 1), (1, 8, 4, 2, 2), (0, 16, 8, 4, 4)):
        header = RS.ResamplerHeader(RS.WeightDType(dtype), d, c, q, heads, 1e-6)
        blob = bytearray(header.file_size())
        blob[:len(header.pack())] = header.pack()
        for row, offset, nbytes, count in header.layout():
            values = rng.uniform(-0.2, 0.2, count).astype(header.entry_dtype(row).numpy)
            blob[offset:offset + nbytes] = values.tobytes()
        (seeds / f"d{d}_c{c}_q{q}_h{heads}.mvr").write_bytes(bytes(blob))
    work = tmp_path / "work"
    work.mkdir()
    seconds = max(1, int(FUZZ_SECONDS / 2))
    # libFuzzer reads its RSS from getrusage's ru_maxrss, which Linux carries over fork+exec from this (large,
    # torch-holding) pytest process: the 2 GB budget is counted on top of what this process already peaked at.
    # -malloc_limit_mb bounds any single allocation by itself.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    done = subprocess.run([str(exe), f"-max_total_time={seconds}", "-max_len=16384",
                           f"-rss_limit_mb={2048 + inherited_mb}", "-malloc_limit_mb=2048",
                           f"-artifact_prefix={tmp_path}/", "-timeout=20", "-print_final_stats=1", str(work),
                           str(seeds)], capture_output=True,
                          text=True, env={**os.environ, **SANITIZER_ENV}, timeout=120 + seconds)
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", done.stderr)
    with capsys.disabled():        # the count belongs in CI's log
        print(f"\n[fuzz] libFuzzer (ASan + UBSan): {runs.group(1) if runs else '?'} inputs executed in {seconds} s")
    _no_sanitizer_report(done)
    assert runs and int(runs.group(1)) > 0, done.stderr[-4000:]
