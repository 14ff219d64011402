#!/usr/bin/env bash
# Installs exactly the Debian 12 packages meft's build, tests and benchmarks need.
# Idempotent: packages already present are left alone and apt is not touched at all when
# nothing is missing. Needs root (or sudo) and access to Debian's package archive only.
set -euo pipefail

packages=(
  # toolchain (ccache: both builds use it when present, so repeated test runs recompile little)
  build-essential cmake pkgconf ccache
  # RPC and wire format
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  # parallelism, metrics, config, logging, CLI
  libtbb-dev prometheus-cpp-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libspdlog-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev
  # the worker: LibTorch (CPU build; CUDA builds bring their own) and SentencePiece
  libtorch-dev libsentencepiece-dev
  # promtool validates our metrics exposition in the tests; the deploy test runs the real
  # Prometheus server against both processes, reads its HTTP API with curl, parses the Grafana
  # dashboard with python3, and checks deploy/docker-compose.yml with docker-compose
  prometheus curl python3 python3-yaml docker-compose
  # TLS tests generate certificates
  openssl
  # the cut-network test (tests/system/) joins two network namespaces with a veth pair
  iproute2
  # tokenizer.json: pre-tokenizer regexes (Unicode classes) and Unicode normalizers (NFC, NFKC, ...)
  libpcre2-dev libicu-dev
  # scripts/python-env.sh: the pinned virtual environment of the tools around meft
  python3-venv
  # an optimised BLAS for LibTorch's CPU matrix products (without it, the reference BLAS)
  libopenblas0-pthread
  # libFuzzer targets (tests/fuzz/): clang with its sanitizer and libFuzzer runtimes
  clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: done"
