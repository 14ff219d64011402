#!/usr/bin/env bash
# The CUDA build: a second build of the whole tree (libraries, both binaries, every test and
# benchmark program) against the CUDA LibTorch inside PyPI's torch wheel, in its own folder,
# warnings as errors. Compile and link only: nothing here needs a GPU, and nothing CUDA runs.
# scripts/gpu-kit.sh packs its binaries for a GPU machine.
#
# What it pins:
# - LibTorch: torch==2.11.0 from PyPI (scripts/python/requirements.txt, installed by
#   scripts/python-env.sh into its cached venv; pip's cache keeps the wheels between runs). That
#   wheel is PyTorch's CUDA 13.0 build (torch.version.cuda == "13.0", 2.11.0+cu130, C++11 ABI),
#   the same as the GPU machine's python3 torch; its CUDA runtime (cuda-toolkit==13.0.2 and the
#   nvidia-*-cu13 wheels) matches the nvcc below. The venv also serves the converter and the
#   golden generators, so nothing is installed for this build alone.
# - nvcc and the CUDA toolkit headers: $MEFT_CUDA_HOME, default /usr/local/cuda, which must be
#   CUDA 13.0 (the wheel's major.minor). LibTorch's CMake configuration insists on nvcc even
#   though meft compiles no .cu file (its CUDA sources are host code on the CUDA runtime).
# - GPU architecture: TORCH_CUDA_ARCH_LIST=9.0 (sm_90: H100, H200), $MEFT_CUDA_ARCH to change.
#   Set so that LibTorch's CMake does not try to detect a GPU here; only nvcc flags depend on it.
# - Build type Release at -O2 without debug information (the CPU build's optimisation, so the
#   same warnings; the kit strips the binaries anyway, and links are much faster).
#
#   scripts/build-cuda.sh                     # configure and build everything
#   scripts/build-cuda.sh --target meft-worker
#
# Build folder: $MEFT_CUDA_BUILD_DIR, default build-cuda/. Uses ccache when it is installed.
# The binaries keep build-tree RUNPATHs into the venv, so they run here (on the CPU) as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "build-cuda: $*" >&2
  exit 1
}

build=${MEFT_CUDA_BUILD_DIR:-build-cuda}
cuda_home=${MEFT_CUDA_HOME:-/usr/local/cuda}
arch=${MEFT_CUDA_ARCH:-9.0}

bash scripts/install-deps.sh
venv=$(bash scripts/python-env.sh | tail -1)
python="$venv/bin/python"

# What the wheel is; every check says what is wrong rather than letting CMake fail later.
torch_info=$("$python" - <<'PY'
import os, sys
try:
    import torch
except Exception as e:  # noqa: BLE001
    sys.exit(f"cannot import torch: {e}")
print(torch.__version__)
print(torch.version.cuda or "")
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(os.path.dirname(torch.__file__))
print(torch.utils.cmake_prefix_path)
PY
) || die "the venv $venv has no working torch (scripts/python-env.sh installs it)"
{
  read -r torch_version
  read -r torch_cuda
  read -r torch_abi
  read -r torch_dir
  read -r torch_cmake
} <<<"$torch_info"
[ -n "$torch_cuda" ] || die "torch $torch_version in $venv is a CPU-only build; the CUDA build needs the CUDA wheel"
[ "$torch_abi" = 1 ] || die "torch $torch_version uses the pre-C++11 libstdc++ ABI; Debian's libraries use the C++11 ABI"

nvcc="$cuda_home/bin/nvcc"
[ -x "$nvcc" ] || die "no nvcc at $nvcc: install the CUDA $torch_cuda toolkit there or set MEFT_CUDA_HOME"
[ -f "$cuda_home/include/cuda_runtime_api.h" ] || die "no CUDA headers in $cuda_home/include"
nvcc_version=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
[ "$nvcc_version" = "$torch_cuda" ] ||
  die "nvcc at $nvcc is CUDA $nvcc_version but torch $torch_version was built with CUDA $torch_cuda"

# libtorch_cuda.so names the CUDA libraries it needs (cuSPARSELt, cuFile, NCCL, NVSHMEM, cuDNN,
# ...) without paths; the linker finds them in the venv's nvidia wheels, where torch's own RPATH
# points at run time too. Not an RPATH of ours: the binaries must not depend on this venv.
site=$(dirname "$torch_dir")
rpath_link=""
for d in "$torch_dir/lib" "$site"/nvidia/*/lib; do
  [ -d "$d" ] && rpath_link+="${rpath_link:+:}$d"
done

launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi

echo "== configure $build: torch $torch_version (CUDA $torch_cuda) from $torch_dir, nvcc $nvcc_version, sm_${arch/./}"
# kineto_LIBRARY: the wheel links Kineto into libtorch_cpu.so, where TorchConfig.cmake looks for a
# libkineto of its own and warns when there is none.
PATH="$cuda_home/bin:$PATH" cmake -S . -B "$build" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
  -DMEFT_WERROR=ON "${launcher[@]}" \
  -DCMAKE_PREFIX_PATH="$torch_cmake" \
  -DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCUDAToolkit_ROOT="$cuda_home" \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DTORCH_CUDA_ARCH_LIST="$arch" \
  -Dkineto_LIBRARY="$torch_dir/lib/libtorch_cpu.so" \
  -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$rpath_link" \
  -DCMAKE_SHARED_LINKER_FLAGS="-Wl,-rpath-link,$rpath_link" \
  -DCMAKE_MODULE_LINKER_FLAGS="-Wl,-rpath-link,$rpath_link"
echo "== build $build"
cmake --build "$build" -j"${MEFT_JOBS:-$(nproc)}" "$@"
echo "build-cuda: done ($build)"
