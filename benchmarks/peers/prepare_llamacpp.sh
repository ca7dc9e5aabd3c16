#!/usr/bin/env bash
# On the CPU machine (needs the network only for the downloads): the llama.cpp
# source that llama-cpp-python's sdist vendors, stripped to what a CUDA (or CPU)
# build of llama-bench and llama-completion needs, packed small enough to carry
# to the GPU machine; and PyPI's gguf wheel, which write_gguf.py uses.
#
#   bash benchmarks/peers/prepare_llamacpp.sh [path/to/llama_cpp_python-X.tar.gz]
#
# Without an argument it downloads the sdist with pip (LCP_VERSION, default
# 0.3.36). Writes (both git-ignored):
#   build/peers/llama.cpp.tar.xz   the stripped tree, top folder llama.cpp/, with
#                                  PEERS_VERSION (sdist, its sha256, the llama.cpp
#                                  commit the sdist's changelog names)
#   .whl/gguf-*.whl                the gguf wheel (scripts/gpu_check.sh and
#                                  run_peers.sh install .whl/ to /tmp/site)
set -euo pipefail
cd "$(dirname "$0")/../.."
LCP_VERSION=${LCP_VERSION:-0.3.36}
GGUF_VERSION=${GGUF_VERSION:-0.19.0}
OUTDIR=build/peers
mkdir -p "$OUTDIR" .whl
sdist=${1:-}
if [ -z "$sdist" ]; then
    python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" -d "$OUTDIR/dl"
    sdist=$(ls "$OUTDIR"/dl/llama_cpp_python-"$LCP_VERSION".tar.gz)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
top=$(ls "$work")
src="$work/$top/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "prepare: $sdist has no vendor/llama.cpp" >&2; exit 1; }

# The llama.cpp commit: the sdist's changelog says "update llama.cpp to
# ggml-org/llama.cpp@<commit>" under each release (the sdist has no .git).
version=$(sed -n 's/^Version: //p' "$work/$top/PKG-INFO" | head -1)
commit=$(awk -v v="[$version]" '$0 ~ "^## " {on = index($0, v) > 0} on && /llama\.cpp@/ {sub(/.*llama\.cpp@/, ""); sub(/[^0-9a-f].*/, ""); print; exit}' "$work/$top/CHANGELOG.md")
[ -n "$commit" ] || { echo "prepare: no llama.cpp commit under [$version] in CHANGELOG.md" >&2; exit 1; }

# What the build does not need. Other backends: ggml_add_backend only enters a
# backend's folder when its GGML_<NAME> option is on (build_llamacpp.sh leaves
# them off); ggml-blas and ggml-cpu stay (ggml-cpu whole: its CMakeLists picks
# per-architecture files).
(
    cd "$src"
    rm -rf .github .devops docs media models tests examples pocs benches app scripts skills \
        gguf-py conversion requirements grammars ci \
        convert_*.py requirements.txt flake.nix pyproject.toml poetry.lock mypy.ini pyrightconfig.json ty.toml \
        build-xcframework.sh AGENTS.md CLAUDE.md CODEOWNERS CONTRIBUTING.md SECURITY.md AUTHORS
    for b in cann et hexagon hip metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn zendnn; do
        rm -rf "ggml/src/ggml-$b"
    done
    # Tools: only llama-bench and llama-completion (llama-cli links the server
    # library and its web UI, which a benchmark does not need).
    find tools -mindepth 1 -maxdepth 1 -type d ! -name llama-bench ! -name completion -exec rm -rf {} +
    cat > tools/CMakeLists.txt <<'EOF'
# Stripped by moe_infinity's benchmarks/peers/prepare_llamacpp.sh: only the
# tools its llama.cpp comparison runs.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(completion)
EOF
    # vendor/: miniaudio only serves the multimodal tool (removed above).
    rm -rf vendor/miniaudio
    sed -i 's/^add_subdirectory(miniaudio)$/# add_subdirectory(miniaudio)  # stripped: only tools\/mtmd used it/' vendor/CMakeLists.txt
    cat > PEERS_VERSION <<EOF
sdist=$(basename "$sdist")
sdist_sha256=$(sha256sum "$sdist" | cut -d' ' -f1)
llama_cpp_python=$version
llama_cpp_commit=$commit
stripped_by=benchmarks/peers/prepare_llamacpp.sh
EOF
)
mv "$src" "$work/llama.cpp"
tar -C "$work" -cf - llama.cpp | xz -T2 -9 > "$OUTDIR/llama.cpp.tar.xz"
python3 -m pip download --no-deps "gguf==$GGUF_VERSION" -d .whl
cat "$work/llama.cpp/PEERS_VERSION"
ls -l "$OUTDIR/llama.cpp.tar.xz" .whl/gguf-*.whl
size=$(stat -c %s "$OUTDIR/llama.cpp.tar.xz")
if [ "$size" -gt $((30 << 20)) ]; then
    echo "prepare: $OUTDIR/llama.cpp.tar.xz is $size bytes, over 30 MiB: too big to carry beside the engine" >&2
    exit 1
fi
