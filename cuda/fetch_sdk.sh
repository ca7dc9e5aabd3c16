#!/usr/bin/env bash
# Fetches what the CUDA build of the engine needs on a machine without a
# CUDA toolkit, into build/cuda/ (idempotent):
#   include/cuda.h   the CUDA driver API header, from PyPI's
#                    nvidia-cuda-runtime-cu12 wheel (gorgonia.org/cu builds
#                    against CUDA 12 headers, not 13);
#   lib/libcuda.so   a link-time stub with soname libcuda.so.1 that defines
#                    every driver function cuda.h declares; the real driver's
#                    libcuda.so.1 is what the library loads at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/cuda
version=12.9.79
PYTHON=${PYTHON:-python3}
CC=${CC:-cc}
mkdir -p "$out/include" "$out/lib" "$out/wheel"
if [ ! -s "$out/include/cuda.h" ]; then
    "$PYTHON" -m pip download -q --no-deps --disable-pip-version-check --only-binary=:all: \
        --platform manylinux2014_x86_64 --python-version 3.11 \
        "nvidia-cuda-runtime-cu12==$version" -d "$out/wheel"
    "$PYTHON" - "$out" <<'PY'
import glob, sys, zipfile
out = sys.argv[1]
whl = glob.glob(f"{out}/wheel/nvidia_cuda_runtime_cu12-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    with open(f"{out}/include/cuda.h", "wb") as f:
        f.write(z.read("nvidia/cuda_runtime/include/cuda.h"))
PY
fi
if [ ! -s "$out/lib/libcuda.so" ]; then
    # Every function cuda.h declares, by the name the preprocessor gives it
    # (cuCtxCreate → cuCtxCreate_v2, ...).
    "$CC" -E -P -I"$out/include" -x c "$out/include/cuda.h" | tr '\n' ' ' \
        | grep -oE '\bCUresult[[:space:]]+(CUDAAPI[[:space:]]+)?cu[A-Za-z0-9_]+[[:space:]]*\(' \
        | sed -E 's/^CUresult[[:space:]]+(CUDAAPI[[:space:]]+)?(cu[A-Za-z0-9_]+).*/\2/' | sort -u > "$out/lib/symbols.txt"
    sed 's/.*/int &(void) { return 999; }/' "$out/lib/symbols.txt" > "$out/lib/stub.c"
    "$CC" -shared -fPIC -o "$out/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$out/lib/stub.c"
fi
echo "CUDA SDK pieces in $out: $(wc -l < "$out/lib/symbols.txt") driver functions"
