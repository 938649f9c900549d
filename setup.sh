#!/usr/bin/env bash
# Set up everything in ./.venv: the runtime (llama-cpp-python, onnxruntime, ...), the export extra
# (torch CPU build, transformers, onnx, coremltools), the cluster extra (Ray, for `sweep --executor ray`), the
# test tools, and our native core.
# Safe to re-run; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# Debian packages some tests need, installed where apt-get and root (or passwordless sudo) are here:
# - gcc-aarch64-linux-gnu + qemu-user: tests/test_kernels_arch.py cross-builds the NEON kernels and runs them
#   under qemu-aarch64;
# - clang: the libFuzzer harness of the weights parser (tests/test_strangers.py);
# - chromium + chromium-driver: tests/test_web_page.py drives the page `serve` shows in headless Chromium.
# Elsewhere they are skipped with a message, and those tests then skip themselves.
APT_NEED=()
command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || \
  APT_NEED+=(gcc-aarch64-linux-gnu qemu-user)
command -v clang >/dev/null || APT_NEED+=(clang)
command -v chromium >/dev/null && command -v chromedriver >/dev/null || APT_NEED+=(chromium chromium-driver)
if [ ${#APT_NEED[@]} -eq 0 ]; then
  :
elif ! command -v apt-get >/dev/null; then
  echo "setup: no apt-get here; skipping ${APT_NEED[*]} (the tests that need them will skip)"
elif [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then
  echo "setup: not root; skipping ${APT_NEED[*]} (the tests that need them will skip)"
else
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  echo "setup: installing ${APT_NEED[*]} (apt)..."
  $SUDO apt-get update -q >/dev/null && \
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${APT_NEED[@]}" >/dev/null || \
    echo "setup: apt-get install of ${APT_NEED[*]} failed; the tests that need them will fail or skip"
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/pip install --disable-pip-version-check -q)

# torch first, pinned to the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0

# llama-cpp-python compiles llama.cpp from source (about 8 minutes on 2 cores) the first time; pip
# caches the wheel, so later environments on this machine install it in seconds. Portable x86 flags:
# a wheel built with -march=native could crash with SIGILL on another CPU if the cache moves.
LLAMA_CMAKE_ARGS="-DLLAMA_OPENSSL=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON $LLAMA_CMAKE_ARGS"
fi
# Opt-in, MINICPMV_EDGE_LLAMA_CPU_VARIANTS=1: llama.cpp's CPU backend built once per feature level (x86: x64 ...
# haswell (AVX2) ... skylakex/icelake/zen4 (AVX-512, VNNI, BF16) ... sapphirerapids (AMX, removed below); ARM
# Linux: armv8.0 ... armv8.6 (dotprod, i8mm, SVE) ...) as libggml-cpu-<variant>.so, and ggml loads the best one
# for this CPU at run time (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS). Off by default: 14 x86 variants compile for
# longer than the one portable AVX2 backend (see bench/README.md, "Kernels for the CPU at hand"). ggml looks for
# the variants only in its compile-time GGML_BACKEND_DIR (a stock build installs them into site-packages/bin,
# where nothing looks), so that is set to this venv's llama_cpp/lib: CMake writes them there during the build,
# outside the wheel, which is why this wheel must not be cached (--no-cache-dir) and the venv not be moved.
if [ "${MINICPMV_EDGE_LLAMA_CPU_VARIANTS:-0}" = 1 ]; then
  LLAMA_LIB="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/llama_cpp/lib"
  if ! ls "$LLAMA_LIB"/libggml-cpu-*.so >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python with all CPU backend variants (long: see bench/README.md)..."
    CMAKE_ARGS="-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF -DGGML_BACKEND_DIR=$LLAMA_LIB \
-DLLAMA_OPENSSL=OFF" "${PIP[@]}" --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
    # The AMX variant is left out, as ollama does: in this llama.cpp its AMX matmul dies with SIGILL at its first
    # tile instruction on a Sapphire Rapids VM where a plain AMX program runs (seen here, 2026-12-01: `tilezero` in
    # ggml_backend_amx_mul_mat; llama.cpp PR #26954 names a tile config the compiler drops and per-thread XFD
    # permission), and ggml would pick it on every AMX CPU. The AVX-512 VNNI variants (zen4, icelake) remain.
    rm -f "$LLAMA_LIB"/libggml-cpu-sapphirerapids.so
    # the check: llama.cpp initialised from a neutral folder maps one libggml-cpu-<variant>.so
    VENV_PYTHON="$PWD/.venv/bin/python"
    (cd / && "$VENV_PYTHON" -c "
import llama_cpp, pathlib
llama_cpp.llama_backend_init()
maps = pathlib.Path('/proc/self/maps').read_text()
assert 'libggml-cpu-' in maps, 'no CPU backend variant loaded'
print('setup: llama.cpp CPU backend:', sorted({l.split()[-1].rsplit('/', 1)[-1] for l in maps.splitlines()
                                               if 'libggml-cpu-' in l}))") || \
      { echo "setup: the CPU-variants build of llama-cpp-python loads no CPU backend; unset" \
             "MINICPMV_EDGE_LLAMA_CPU_VARIANTS and remove .venv to go back to the portable build" >&2; exit 1; }
  fi
elif ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: installing llama-cpp-python (first build compiles llama.cpp, ~8 min)..."
  CMAKE_ARGS="${CMAKE_ARGS:-$LLAMA_CMAKE_ARGS}" "${PIP[@]}" llama-cpp-python==0.3.36
fi

# Our package, editable, with its native core built by CMake through scikit-build-core.
"${PIP[@]}" "scikit-build-core>=0.10"
"${PIP[@]}" --no-build-isolation -e '.[export,video,serve,cluster,dev]'
echo "setup: done ($(.venv/bin/minicpmv-edge --version))"
