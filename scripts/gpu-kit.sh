#!/usr/bin/env bash
# Packs the device kit: what a GPU machine needs to run the CUDA build's tests and the 7B-shape
# benchmark, and nothing it already has. Runs scripts/build-cuda.sh first (--no-build: use the
# build as it is). The kit folder ($MEFT_KIT_DIR, default gpu-kit/, git-ignored) holds:
#
#   run.sh, results.py   the entry point (see scripts/gpu-kit/run.sh) and its report writer
#   bin/                 meft-worker, meft-param-server, meft_gpu_shape_bench (when the tree has it)
#   tests/               every test program of the CUDA build that has CUDA tests (a test whose
#                        suite or name contains "Cuda")
#   golden/              the tests' reference data (tests/golden/ without its generators)
#   lib/                 libmeft_spm_shim.so (the worker looks for it next to bin/)
#   debian-libs.tar.xz   the shared libraries those programs need that are neither glibc,
#                        libstdc++, libgcc nor LibTorch and its nvidia wheels (gRPC, protobuf,
#                        abseil, oneTBB, prometheus-cpp, yaml-cpp, spdlog, ICU, PCRE2, ...: the GPU
#                        machine has no Debian -dev packages), xz-compressed because ICU's data
#                        alone is 30 MB; run.sh unpacks them into a temporary folder
#   kit.env              commit, torch version, CUDA architecture, whether the tree has the bench
#   MANIFEST             every file with its size
#
# The programs are stripped and carry no RPATH: run.sh puts lib/ and python3's torch on
# LD_LIBRARY_PATH. LibTorch itself (about 4 GB with CUDA) is not in the kit; the GPU machine's
# python3 has torch 2.11.0+cu130. The kit must stay within 60 MiB (it travels with the working
# tree to the GPU machine); this script fails if it does not. Prints the kit's path last.
#
#   scripts/gpu-kit.sh && gpu-kit/run.sh --dry-run /tmp/kit-dry-run   # the test command's check
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "gpu-kit: $*" >&2
  exit 1
}

build=${MEFT_CUDA_BUILD_DIR:-build-cuda}
kit=${MEFT_KIT_DIR:-gpu-kit}
limit_mib=60
if [ "${1:-}" = "--no-build" ]; then
  [ -f "$build/CMakeCache.txt" ] || die "no CUDA build in $build: run scripts/build-cuda.sh"
else
  bash scripts/build-cuda.sh
fi

venv=$(bash scripts/python-env.sh 2>/dev/null | tail -1)
site=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
torch_cuda=$("$venv/bin/python" -c 'import torch; print(torch.version.cuda)')
# What the programs load here; LibTorch and the nvidia wheels resolve into the venv, as they
# will into python3's torch on the GPU machine.
libpath="$build/gpu_worker:$site/torch/lib"
for d in "$site"/nvidia/*/lib; do libpath+=":$d"; done

# Only ever replace an earlier kit.
if [ -d "$kit" ] && [ -n "$(ls -A "$kit")" ] && [ ! -f "$kit/kit.env" ]; then
  die "$kit exists and is not a kit; set MEFT_KIT_DIR to another folder"
fi
rm -rf "$kit"
mkdir -p "$kit/bin" "$kit/tests" "$kit/lib"
kit=$(cd "$kit" && pwd)

# Strip, drop the build tree's RPATH (it points into this machine's venv), copy.
pack() {
  local src=$1 dest=$2
  strip --strip-unneeded -o "$dest" "$src"
  cmake -DFILE="$dest" -P scripts/gpu-kit/remove_rpath.cmake >/dev/null
}

for p in gpu_worker/meft-worker param_server/meft-param-server; do
  [ -x "$build/$p" ] || die "$build/$p is missing: the CUDA build did not finish"
  pack "$build/$p" "$kit/bin/${p##*/}"
done
if cmake --build "$build" --target help | grep -q '\bmeft_gpu_shape_bench\b'; then
  has_bench=1
  pack "$build/bench/meft_gpu_shape_bench" "$kit/bin/meft_gpu_shape_bench"
else
  has_bench=0
fi
pack "$build/gpu_worker/libmeft_spm_shim.so" "$kit/lib/libmeft_spm_shim.so"

# Test programs: those that list at least one CUDA test.
while IFS= read -r exe; do
  listed=$(LD_LIBRARY_PATH="$libpath" "$exe" --gtest_list_tests --gtest_filter='*Cuda*') ||
    die "$exe --gtest_list_tests failed"
  if grep -q '^  ' <<<"$listed"; then
    pack "$exe" "$kit/tests/${exe##*/}"
    echo "gpu-kit: $(grep -c '^  ' <<<"$listed") CUDA tests in ${exe##*/}"
  fi
done < <(find "$build/tests" -type f -executable -name '*_tests' | sort)

# The Debian libraries: every resolved dependency that glibc, libstdc++ or libgcc does not
# provide and that does not come from LibTorch's wheels. The CUDA driver (libcuda) is the GPU
# machine's own.
# Every file of the packages the GPU machine has, under both spellings of merged /usr.
declare -A base_system=()
while IFS= read -r f; do
  case "$f" in */lib/*) ;; *) continue ;; esac
  base_system[${f#/usr}]=1
  base_system[/usr${f#/usr}]=1
done < <(dpkg-query -L libc6 libstdc++6 libgcc-s1)
from_base_system() {
  [ -n "${base_system[$1]:-}" ] || [ -n "${base_system[$(readlink -f "$1")]:-}" ]
}
# ldd lists a file's whole closure, so the programs and the module are all there is to ask.
declare -A seen=()
for f in "$kit"/bin/* "$kit"/tests/* "$kit"/lib/libmeft_spm_shim.so; do
  deps=$(LD_LIBRARY_PATH="$libpath" ldd "$f") || die "ldd $f failed"
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    if [ "$path" = "not" ]; then
      case "$name" in
        libcuda.so.*) continue ;;
        *) die "${f##*/} needs $name, which is not found here" ;;
      esac
    fi
    case "$path" in "$site"/*) continue ;; esac
    [ -n "${seen[$name]:-}" ] && continue
    seen[$name]=1
    from_base_system "$path" && continue
    cp -L "$path" "$kit/lib/$name"
    chmod 644 "$kit/lib/$name"
  done <<<"$deps"
done

# The Debian libraries travel compressed (about 55 MB -> 15 MB); the SentencePiece module stays in
# lib/, where the worker looks for it.
(cd "$kit/lib" && XZ_OPT=-6 tar --owner=0 --group=0 --exclude=libmeft_spm_shim.so -cJf \
  ../debian-libs.tar.xz .) || die "packing the Debian libraries failed"
find "$kit/lib" -type f ! -name libmeft_spm_shim.so -delete

# The tests' reference data (tests/golden/ without its generators); run.sh points the test
# programs at it with MEFT_GOLDEN_DIR, since the build's source path does not exist there.
mkdir -p "$kit/golden"
(cd tests/golden && find . -type f ! -name '*.py' ! -name 'README.md' -exec cp --parents {} "$kit/golden/" \;)
cp scripts/gpu-kit/run.sh scripts/gpu-kit/results.py "$kit/"
chmod 755 "$kit/run.sh" "$kit/results.py"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit+="-dirty"; fi
{
  echo "commit=$commit"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "torch_version=$torch_version"
  echo "torch_cuda=$torch_cuda"
  echo "cuda_arch=$(sed -n 's/^TORCH_CUDA_ARCH_LIST:[A-Z]*=//p' "$build/CMakeCache.txt")"
  echo "bench=$has_bench"
} >"$kit/kit.env"
(cd "$kit" && find . -type f ! -name MANIFEST -printf '%s\t%P\n' | sort -k2 >MANIFEST)

bytes=$(du -sb "$kit" | cut -f1)
mib=$(((bytes + 1048575) / 1048576))
echo "gpu-kit: $(wc -l <"$kit/MANIFEST") files, ${mib} MiB (limit ${limit_mib} MiB): $(ls "$kit/bin" | tr '\n' ' ')| tests: $(ls "$kit/tests" | tr '\n' ' ')| $(tar -tJf "$kit/debian-libs.tar.xz" | grep -c '\.so') Debian libraries"
[ "$mib" -le "$limit_mib" ] || die "the kit is ${mib} MiB, over ${limit_mib} MiB"
echo "$kit"
