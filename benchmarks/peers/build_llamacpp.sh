#!/usr/bin/env bash
# Builds llama-bench (and llama-completion) from the tarball that
# prepare_llamacpp.sh packs. On the GPU machine: CUDA for sm_90 only, every
# core. On a CPU-only machine: LLAMACPP_CUDA=OFF.
#
#   bash benchmarks/peers/build_llamacpp.sh                       # CUDA, sm_90, all cores
#   LLAMACPP_CUDA=OFF JOBS=2 TARGETS=llama-bench bash benchmarks/peers/build_llamacpp.sh
#
# Environment: LLAMACPP_TAR (default build/peers/llama.cpp.tar.xz), LLAMACPP_DIR
# (where it unpacks and builds, default build/peers; the binaries land in
# $LLAMACPP_DIR/llama.cpp/build/bin), LLAMACPP_CUDA (ON|OFF, default ON),
# CUDA_ARCH (default 90), JOBS (default: the host's cores), TARGETS (default
# "llama-bench llama-completion"). Prints the build's seconds and writes
# $LLAMACPP_DIR/build_info.txt (commit, options, seconds).
set -euo pipefail
cd "$(dirname "$0")/../.."
TAR=${LLAMACPP_TAR:-build/peers/llama.cpp.tar.xz}
DIR=${LLAMACPP_DIR:-build/peers}
CUDA=${LLAMACPP_CUDA:-ON}
ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc)}
TARGETS=${TARGETS:-llama-bench llama-completion}
[ -f "$TAR" ] || { echo "build_llamacpp: $TAR is missing: run benchmarks/peers/prepare_llamacpp.sh on the CPU machine and carry it" >&2; exit 2; }
mkdir -p "$DIR"
src="$DIR/llama.cpp"
stamp="$src/.unpacked_from"
# Unpack unless this tarball is already unpacked there (a second call on a warm
# machine keeps the build folder and only rebuilds what changed).
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$(sha256sum "$TAR" | cut -d' ' -f1)" ]; then
    rm -rf "$src"
    tar -xJf "$TAR" -C "$DIR"
    sha256sum "$TAR" | cut -d' ' -f1 > "$stamp"
fi
commit=$(sed -n 's/^llama_cpp_commit=//p' "$src/PEERS_VERSION")
opts=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF          # static binaries: nothing to find at run time
    -DLLAMA_BUILD_COMMIT="$commit"   # the sdist has no .git: name the commit in --version and llama-bench's build_commit
    -DLLAMA_BUILD_NUMBER=0
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DGGML_NATIVE=ON                 # built on the host that runs it
    -DGGML_CUDA="$CUDA"
)
if [ "$CUDA" = ON ]; then
    opts+=(-DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_CUDA_NCCL=OFF)
    if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
        export PATH=/usr/local/cuda/bin:$PATH
    fi
    command -v nvcc >/dev/null || { echo "build_llamacpp: no nvcc on PATH (or /usr/local/cuda/bin); LLAMACPP_CUDA=OFF builds for the CPU" >&2; exit 2; }
    nvcc --version | tail -2
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
t0=$(date +%s)
cmake -S "$src" -B "$src/build" "${generator[@]}" "${opts[@]}"
# shellcheck disable=SC2086
cmake --build "$src/build" --config Release -j "$JOBS" --target $TARGETS
secs=$(( $(date +%s) - t0 ))
{
    cat "$src/PEERS_VERSION"
    echo "cuda=$CUDA cuda_arch=$ARCH jobs=$JOBS targets=$TARGETS"
    echo "cmake_options=${opts[*]}"
    echo "build_seconds=$secs"
} | tee "$DIR/build_info.txt"
"$src/build/bin/llama-bench" --version 2>&1 | tail -2 || true
