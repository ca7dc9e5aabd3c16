"""The ctypes layer against the C header: every declared export has the
header's parameters (count and C types), the argument struct has the
header's fields, and every number the two sides share (status codes,
executor flags and paths) is the header's. Drift fails here, not as a
crash or a silently misread argument."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from moe_infinity import _native, errors

HEADER = Path(__file__).resolve().parent.parent / "capi" / "moe_infinity.h"

_SCALARS = {
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float,
}


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _ctype(decl: str):
    """(ctypes type or marker, is_pointer) for one C parameter declaration."""
    decl = decl.replace("const ", "").strip()
    base, name = decl.rsplit(None, 1) if "*" not in decl else (decl[: decl.rindex("*")].strip(), "")
    if "*" in decl:
        if base == "char":
            return "char*", True
        if base in _SCALARS:
            return ctypes.POINTER(_SCALARS[base]), True
        if base == "moe_layer_args":
            return ctypes.POINTER(_native.LayerArgs), True
        if base == "void":
            return ctypes.c_void_p, True
        raise AssertionError(f"unknown pointer type in {decl!r}")
    return _SCALARS[base], False


def _prototypes() -> dict[str, list[str]]:
    text = _strip_comments(HEADER.read_text())
    out = {}
    for name, params in re.findall(r"\bint32_t\s+(moe_\w+)\s*\(([^)]*)\)\s*;", text, flags=re.S):
        params = " ".join(params.split())
        out[name] = [] if params in ("", "void") else [p.strip() for p in params.split(",")]
    return out


def _compatible(want, is_ptr: bool, got) -> bool:
    if want == "char*":
        return got in (ctypes.c_char_p, ctypes.c_void_p)
    if is_ptr and got is ctypes.c_void_p:
        return True  # an address passed as an opaque pointer
    return got is want


def test_every_export_the_header_declares_is_declared_in_ctypes_with_its_types():
    protos = _prototypes()
    assert set(protos) == set(_native._SIGNATURES), "exports in the header vs _native._SIGNATURES"
    for name, params in protos.items():
        got = _native._SIGNATURES[name]
        assert len(got) == len(params), f"{name}: {len(params)} parameters in the header, {len(got)} in ctypes"
        for i, (decl, g) in enumerate(zip(params, got)):
            want, is_ptr = _ctype(decl)
            assert _compatible(want, is_ptr, g), f"{name} parameter {i} ({decl}): ctypes has {g}"


def test_layer_args_struct_matches_the_header():
    text = _strip_comments(HEADER.read_text())
    body = re.search(r"typedef struct moe_layer_args \{(.*?)\} moe_layer_args;", text, flags=re.S).group(1)
    fields = []
    for decl in (d.strip() for d in body.split(";")):
        if decl:
            name = decl.replace("*", " ").split()[-1]
            fields.append((name, _ctype(decl.rsplit(name, 1)[0] + " x")[0]))
    got = [(n, t) for n, t in _native.LayerArgs._fields_]
    assert [n for n, _ in got] == [n for n, _ in fields], "field names and order"
    for (name, want), (_, g) in zip(fields, got):
        assert g is want, f"moe_layer_args.{name}: header {want}, ctypes {g}"


def _defines(prefix: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(rf"(?m)^#define ({prefix}\w+) (\d+)", HEADER.read_text())}


def test_executor_flags_and_paths_are_the_headers():
    for name, value in _defines("MOE_LAYER_").items():
        assert getattr(_native, name.removeprefix("MOE_")) == value, name
    for name, value in _defines("MOE_PATH_").items():
        assert getattr(_native, name.removeprefix("MOE_")) == value, name
    assert len(_defines("MOE_PATH_")) == 5 and len(_defines("MOE_LAYER_")) == 5
    gap = re.search(r"(?m)^#define MOE_ROUTING_GAP (-?\d+)$", HEADER.read_text())
    assert gap is not None and _native.ROUTING_GAP == int(gap.group(1))


@pytest.mark.parametrize("name,value", sorted(_defines("MOE_ERR_").items()))
def test_each_status_code_raises_its_exception_class(name, value):
    exc = errors.error_for_status(value, "m")
    if name in ("MOE_ERR_BUFFER",):  # handled inside _native (retries with a larger buffer)
        return
    assert isinstance(exc, errors.MoEInfinityError)
    assert type(exc) is not errors.MoEInfinityError, f"{name} = {value} has no exception class of its own"
    assert exc.status == value or name == "MOE_ERR_HANDLE"
