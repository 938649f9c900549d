"""The Metal kernels' arithmetic, checked without a Metal device.

bindings/metal/resampler.metal is compiled as C++ behind bindings/metal/mve_metal_compat.h into
bindings/tests/metal_emu.cpp, which runs the dispatch list the Objective-C host encodes (mve_metal_plan.c)
threadgroup by threadgroup on the CPU and compares the result with the portable C library on the same weights.
Then deliberately broken copies of the .metal file must make the same program fail, so this test can fail.
The Objective-C host itself (mve_metal.m) is not compiled here: it is untested on real hardware.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from minicpmv_edge.export.checkpoint import Checkpoint
from minicpmv_edge.export.resampler_weights import write_resampler_weights

from test_kernels import random_reference, write_from_torch

ROOT = Path(__file__).resolve().parents[1]
METAL = ROOT / "bindings" / "metal"
BUILD = ROOT / "build" / "tests-native"
TOL = 2e-5  # same folded weights on both sides; only float summation order and fma differ

# (description, text in resampler.metal, replacement): each breaks one kernel's arithmetic
MUTATIONS = [
    ("gemm skips the first term of every dot product", "for (uint k = 0; k < a.K; k++) acc = fma(ar[k], wr[k], acc);",
     "for (uint k = 1; k < a.K; k++) acc = fma(ar[k], wr[k], acc);"),
    ("position term with x and y swapped", "pos[j * a.pos_rows + uint(pp.x)] + pos[(a.hq + j) * a.pos_rows + uint(pp.y)]",
     "pos[j * a.pos_rows + uint(pp.y)] + pos[(a.hq + j) * a.pos_rows + uint(pp.x)]"),
    ("temporal term dropped", "if (pp.has_t != 0) v += tf[uint(pp.frame) * a.hq + j];", ""),
]


def _tools() -> bool:
    return all(shutil.which(t) for t in ("cmake", "gcc", "g++"))


@pytest.fixture(scope="module")
def emu_build(tmp_path_factory):
    """A function compiling metal_emu against a given .metal source; returns the executable."""
    if not _tools():
        pytest.skip("needs cmake, gcc and g++")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (BUILD / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release"], check=True,
                       capture_output=True)
    done = subprocess.run(["cmake", "--build", str(BUILD), "--target", "mve_static"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path_factory.mktemp("metal-emu")
    inc = ["-I", str(ROOT / "bindings" / "include"), "-I", str(ROOT / "bindings" / "src"), "-I", str(METAL)]
    plan_o = out / "mve_metal_plan.o"
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Werror", *inc, "-c", str(METAL / "mve_metal_plan.c"),
                    "-o", str(plan_o)], check=True)

    def build(source: Path, name: str) -> Path:
        exe = out / name
        cmd = ["g++", "-std=c++17", "-O2", "-Wall", "-Werror", "-Wno-attributes", *inc,
               f'-DMVE_METAL_SOURCE="{source}"', str(ROOT / "bindings" / "tests" / "metal_emu.cpp"), str(plan_o),
               str(BUILD / "bindings" / "libmve_static.a"), "-lpthread", "-lm", "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return exe

    return build


@pytest.fixture(scope="module")
def weight_files(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("metal-w")
    ckpt = Checkpoint.open(tiny_checkpoint("4.5"))
    files = {"tiny f32": write_resampler_weights(ckpt, out / "tiny_f32.mvr", "f32")}
    mid = random_reference(512, seed=9)
    files["D=512 kv=1152 f16"] = write_from_torch(mid, out / "mid_f16.mvr", "f16")
    return files


def test_metal_kernels_match_the_c_library(emu_build, weight_files):
    exe = emu_build(METAL / "resampler.metal", "metal_emu")
    for name, path in weight_files.items():
        done = subprocess.run([str(exe), str(path), str(TOL)], capture_output=True, text=True, timeout=300)
        print(f"\n{name}:\n" + done.stdout.strip())
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("[metal-emu]") == 5


@pytest.mark.parametrize("what,old,new", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_broken_metal_kernel_fails(emu_build, weight_files, tmp_path, what, old, new):
    source = (METAL / "resampler.metal").read_text()
    assert source.count(old) == 1, f"mutation target not found once: {old}"
    broken = tmp_path / "resampler_broken.metal"
    broken.write_text(source.replace(old, new))
    exe = emu_build(broken, "metal_emu_broken_" + "_".join(what.split()[:3]))
    done = subprocess.run([str(exe), str(weight_files["tiny f32"]), str(TOL)], capture_output=True, text=True,
                          timeout=300)
    print(f"\nbroken ({what}):\n" + done.stdout.strip())
    assert done.returncode == 1, f"the emulation did not notice: {what}\n{done.stdout}{done.stderr}"
