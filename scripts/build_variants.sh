#!/usr/bin/env bash
# Builds the CUDA engine of several git revisions side by side, for
# `VARIANTS=... bash scripts/gpu_check.sh variants` (A/B runs on one GPU
# machine, since host-side timings differ between machines):
#
#   bash scripts/build_variants.sh base=main batch=batch-copies spin=spin-c
#
# puts each revision's libmoe_infinity_cuda.so, python/ and benchmarks/ in
# build/<name>/ (carry those folders to the GPU machine). Each revision is built in a temporary
# git worktree, so the checkout here is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 name=revision [name=revision ...]" >&2; exit 2; }
bash cuda/fetch_sdk.sh >/dev/null
for spec in "$@"; do
    name=${spec%%=*}
    rev=${spec#*=}
    if [ -z "$name" ] || [ "$name" = "$spec" ]; then
        echo "build_variants: '$spec' is not name=revision" >&2
        exit 2
    fi
    wt=$(mktemp -d)
    git worktree add -q --detach "$wt" "$rev"
    mkdir -p "$wt/build"
    cp -r build/cuda "$wt/build/"
    if ! make -C "$wt" cuda >"$wt/build.log" 2>&1; then
        tail -20 "$wt/build.log" >&2
        git worktree remove --force "$wt"
        exit 1
    fi
    rm -rf "build/$name"
    mkdir -p "build/$name"
    cp "$wt/build/libmoe_infinity_cuda.so" "build/$name/"
    # The revision's Python package and benchmarks too: a bisect over
    # commits that changed Python (the runtime, the scheduler) runs each
    # variant's own code, not the checkout's.
    # (Without the built-in model's 22 MB of weights, to stay within what a
    # device call carries; the benchmarks build their models from presets.)
    cp -r "$wt/python" "$wt/benchmarks" "build/$name/"
    rm -rf "build/$name/python/moe_infinity/builtin_model/model.safetensors" "build/$name/benchmarks/results"
    git worktree remove --force "$wt"
    echo "build/$name/libmoe_infinity_cuda.so: $rev ($(git rev-parse --short "$rev"))"
done
