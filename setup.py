"""Builds the Go engine into the package with ``go build -buildmode=c-shared``.

``pip install .`` and ``pip install -e .`` run this; no manual step. The wheel
is platform specific because it carries the engine as a native library.

Switches (environment):
    MOE_INFINITY_BUILD_CUDA  "auto" (default): also build the CUDA variant
                             when CUDA headers and a libcuda to link are found
                             (CUDA_HOME, build/cuda from `make cuda-sdk`,
                             /usr/local/cuda); "1": fetch them with
                             cuda/fetch_sdk.sh (PyPI) and build it; "0": skip.
    MOE_INFINITY_GO_LDFLAGS  passed to `go build -ldflags` (unset: none);
                             scripts/build_wheel.sh sets "-s -w" to strip
                             the symbol table and DWARF from the libraries.
    GO                       the go command (default "go"); CC, CGO_* are
                             passed through to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class GoLibrary(Extension):
    """A c-shared library built from ./capi with the given build tags."""

    def __init__(self, name: str, tags: list[str]):
        super().__init__(name, sources=[])
        self.tags = tags


def cuda_flags(fetch: bool = False) -> dict[str, str] | None:
    """CGO flags for the CUDA build, or None when no CUDA headers are around.

    Looks at CUDA_HOME/CUDA_PATH, build/cuda (what cuda/fetch_sdk.sh makes:
    PyPI's cuda.h and a link stub) and /usr/local/cuda; with fetch=True runs
    cuda/fetch_sdk.sh first."""
    if fetch:
        subprocess.run(["bash", str(ROOT / "cuda" / "fetch_sdk.sh")], cwd=ROOT, check=True)
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home)] if home else []
    candidates += [ROOT / "build" / "cuda", Path("/usr/local/cuda")]
    for base in candidates:
        if not (base / "include" / "cuda.h").is_file():
            continue
        libdirs = [p for p in (base / "lib", base / "lib64" / "stubs", base / "lib" / "stubs") if (p / "libcuda.so").exists()]
        if not libdirs:
            continue
        return {"CGO_CFLAGS": f"-I{base / 'include'} -Wno-deprecated-declarations", "CGO_LDFLAGS": f"-L{libdirs[0]}"}
    return None


class BuildGo(build_ext):
    """Builds GoLibrary extensions with the Go toolchain."""

    def get_ext_filename(self, fullname: str) -> str:
        parts = fullname.split(".")
        return os.path.join(*parts[:-1], parts[-1] + ".so")

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, GoLibrary):
            return super().build_extension(ext)
        go = os.environ.get("GO", "go")
        if shutil.which(go) is None:
            raise RuntimeError(
                "building moe_infinity needs the Go toolchain (>= 1.25) on PATH; "
                "install it from https://go.dev/dl or your package manager"
            )
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CGO_ENABLED="1")
        cmd = [go, "build", "-trimpath", "-buildmode=c-shared"]
        ldflags = os.environ.get("MOE_INFINITY_GO_LDFLAGS")
        if ldflags:
            cmd += ["-ldflags=" + ldflags]
        if ext.tags:
            cmd += ["-tags", ",".join(ext.tags)]
            if "cuda" in ext.tags:
                flags = cuda_flags(fetch=os.environ.get("MOE_INFINITY_BUILD_CUDA", "auto") == "1") or {}
                for k, v in flags.items():
                    env[k] = (env.get(k, "") + " " + v).strip()
        cmd += ["-o", str(out), "./capi"]
        print("building engine:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        header = out.with_suffix(".h")
        if header.exists():
            header.unlink()


def libraries() -> list[GoLibrary]:
    libs = [GoLibrary("moe_infinity.libmoe_infinity", [])]
    mode = os.environ.get("MOE_INFINITY_BUILD_CUDA", "auto").lower()
    if mode == "1" or (mode == "auto" and cuda_flags() is not None):
        libs.append(GoLibrary("moe_infinity.libmoe_infinity_cuda", ["cuda"]))
    return libs


setup(ext_modules=libraries(), cmdclass={"build_ext": BuildGo})
