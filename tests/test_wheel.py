"""The distributions: the binary wheel (`make wheel`) installs and generates
on a machine without Go, and the sdist carries what building from source
needs.

MOE_INFINITY_WHEEL=path/to/moe_infinity-*.whl tests a prebuilt wheel instead
of running `make wheel` (saves CI the build when an earlier step made it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "moe_infinity"
ENGINES = ("libmoe_infinity.so", "libmoe_infinity_cuda.so")
BUILTIN = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
WHEEL_NAME = re.compile(r"^moe_infinity-(?P<ver>[^-]+)-py3-none-(?P<plat>manylinux_\d+_\d+_x86_64)\.whl$")

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel() -> Path:
    prebuilt = os.environ.get("MOE_INFINITY_WHEEL")
    if prebuilt:
        path = Path(prebuilt).resolve()
        assert path.is_file(), f"MOE_INFINITY_WHEEL={prebuilt} is not a file"
        return path
    out = _run(["make", "--no-print-directory", "wheel", f"PYTHON={sys.executable}"], cwd=ROOT)
    # The script says "dist/<name>.whl (<size>)" (make, when nested,
    # adds lines of its own around it).
    built = [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("dist/") and ln.split()[0].endswith(".whl")]
    assert len(built) == 1, out.stdout
    path = ROOT / built[0]
    assert path.is_file(), out.stdout
    return path


def test_wheel_tag_is_any_cpython_on_manylinux(wheel):
    m = WHEEL_NAME.match(wheel.name)
    assert m, f"{wheel.name}: want moe_infinity-<ver>-py3-none-manylinux_<x>_<y>_x86_64.whl"
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"{PKG}-{m['ver']}.dist-info/WHEEL").decode()
        info = z.read(f"{PKG}-{m['ver']}.dist-info/METADATA").decode()
    assert re.findall(r"^Tag: (.+)$", meta, re.M) == [f"py3-none-{m['plat']}"]
    assert "Root-Is-Purelib: false" in meta
    assert "Requires-Python: >=3.10" in info


def test_wheel_carries_both_engines_stripped_and_the_builtin_model(wheel, tmp_path):
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        # _native.py looks for the engines beside itself.
        for lib in ENGINES:
            assert f"{PKG}/{lib}" in names
        for f in BUILTIN:
            assert f"{PKG}/builtin_model/{f}" in names
        # Subpackages are listed in pyproject's packages, or left out.
        for mod in ("serving/__init__.py", "serving/scheduler.py", "serving/server.py", "serving/ray.py"):
            assert f"{PKG}/{mod}" in names
        assert not [n for n in names if n.endswith(".h") or ".libs/" in n], "no headers, nothing vendored"
        z.extractall(tmp_path, members=[f"{PKG}/{lib}" for lib in ENGINES])
    for lib in ENGINES:
        with open(tmp_path / PKG / lib, "rb") as f:
            elf = ELFFile(f)
            sections = [s.name for s in elf.iter_sections()]
            assert ".dynsym" in sections and ".text" in sections, sections
            assert not [s for s in sections if s == ".symtab" or s.startswith((".debug", ".zdebug"))], f"{lib} is not stripped: {sections}"
            dyn = next(s for s in elf.iter_sections() if isinstance(s, DynamicSection))
            needed = sorted(t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED")
            exports = {s.name for s in elf.get_section_by_name(".dynsym").iter_symbols()}
        assert {"moe_version", "moe_engine_create", "moe_layer"} <= exports
        # The CUDA engine links the driver dynamically (the machine's
        # libcuda.so.1); otherwise the engines need only glibc's own
        # libraries (libm for the CPU expert kernels), which every manylinux
        # system has.
        glibc = {"libc.so.6", "libm.so.6"}
        assert "libc.so.6" in needed and set(needed) <= glibc | ({"libcuda.so.1"} if "cuda" in lib else set()), (lib, needed)
        assert ("libcuda.so.1" in needed) == ("cuda" in lib), (lib, needed)


def test_auditwheel_agrees_with_the_platform_tag(wheel):
    out = _run([sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)])
    report = json.loads(out.stdout)
    plat = WHEEL_NAME.match(wheel.name)["plat"]
    # The glibc symbol versions the engines reference allow exactly this tag
    # (the lowest they qualify for) ...
    assert report["sym_tag"] == plat, report
    # ... and the only library outside the manylinux policy is the CUDA
    # driver, which repair excludes on purpose (it must be the machine's).
    assert set(report["external_libs"]) == {"libcuda.so.1"}, report["external_libs"]
    assert report["policy_upgrades"][plat]["libs_to_eliminate"] == ["libcuda.so.1"]
    assert not report["unsupported_isa"]


def test_wheel_installs_and_generates_without_go(wheel, tmp_path):
    venv = tmp_path / "venv"
    # System site-packages give torch and transformers; nothing is downloaded.
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    path = f"{venv / 'bin'}:/usr/bin:/bin"
    assert shutil.which("go", path=path) is None, "this test needs a PATH without Go"
    env = {
        "PATH": path,
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MOE_INFINITY_CACHE": str(tmp_path / "cache"),
        "LANG": "C.UTF-8",
    }
    py = str(venv / "bin" / "python")
    # --ignore-installed: a system install of moe_infinity (the checkout's
    # editable one) is left alone, and the wheel goes into the venv.
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--disable-pip-version-check", "-q", str(wheel)], env=env, cwd=tmp_path)
    where = _run([py, "-c", f"import {PKG}; print({PKG}.__file__)"], env=env, cwd=tmp_path).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the venv's install"

    version = _run([py, "-m", PKG, "version"], env=env, cwd=tmp_path).stdout
    assert re.search(rf"library {re.escape(str(venv.resolve()))}\S*/{PKG}/libmoe_infinity(_cuda)?\.so", version), version

    out = _run([py, "-m", PKG, "generate", "--prompt", "Hello", "--max-new-tokens", "8"], env=env, cwd=tmp_path)
    assert out.stdout.startswith("Hello") and len(out.stdout.strip()) > len("Hello"), out.stdout
    assert "8 tokens in" in out.stderr, out.stderr
    assert "builtin_model" in out.stderr, "the packaged model is the default"


def test_sdist_carries_the_go_sources_and_builds_with_go(tmp_path):
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)], cwd=ROOT)
    (sdist,) = tmp_path.glob("moe_infinity-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for need in ("setup.py", "pyproject.toml", "go.mod", "go.sum", "Makefile", "MANIFEST.in",
                 "capi/exports.go", "capi/moe_infinity.h", "cuda/fetch_sdk.sh", "cuda/moe_ffn.cu",
                 "go/backend/cuda/moe_ffn.ptx", "go/backend/cuda/moe_ffn_sm89.ptx", "scripts/build_wheel.sh", "tests/c/capi_test.c"):
        assert need in names, f"sdist lacks {need}"
    assert any(n.startswith("go/engine/") and n.endswith(".go") for n in names)
    for f in BUILTIN:
        assert f"python/{PKG}/builtin_model/{f}" in names
    assert not [n for n in names if n.endswith(".so")], "no prebuilt engine in the sdist"

    # Installing it builds the engine with Go (the CPU one; the CUDA one is
    # the same build with -tags cuda).
    if shutil.which(os.environ.get("GO", "go")) is None:
        pytest.skip("no Go on PATH: built the sdist, not a wheel from it")
    env = dict(os.environ, MOE_INFINITY_BUILD_CUDA="0")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--disable-pip-version-check", "-q",
          "-w", str(tmp_path / "from_sdist"), str(sdist)], env=env, cwd=tmp_path)
    (built,) = (tmp_path / "from_sdist").glob("*.whl")
    with zipfile.ZipFile(built) as z:
        assert f"{PKG}/libmoe_infinity.so" in z.namelist()
