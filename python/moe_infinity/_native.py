"""The only ctypes code of moe_infinity: finds and loads the engine library,
declares every export's signature and turns status codes into exceptions.

Two builds of the engine exist (see docs/ARCHITECTURE.md): ``libmoe_infinity.so``
(CPU backend only) and ``libmoe_infinity_cuda.so`` (links the CUDA driver).
The CUDA build is chosen only after checking, through ctypes, that
``libcuda.so.1`` loads, ``cuInit(0)`` succeeds and a device exists — a CUDA
build loaded without a usable GPU would terminate the process. Only one Go
c-shared library may be loaded per process, so the choice is made once.

Environment:
    MOE_INFINITY_LIB      path of the library to load (skips the search)
    MOE_INFINITY_BACKEND  "cpu" to never load the CUDA build
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Any

from .errors import LibraryLoadError, error_for_status

__all__ = ["lib", "call", "call_json", "library_path", "variant", "cuda_usable", "LayerArgs"]

_STATUS_BUFFER = 10

_c_int32 = ctypes.c_int32
_c_int64 = ctypes.c_int64
_c_uint64 = ctypes.c_uint64
_p_char = ctypes.c_char_p
_p_int64 = ctypes.POINTER(ctypes.c_int64)
_p_uint64 = ctypes.POINTER(ctypes.c_uint64)
_p_int32 = ctypes.POINTER(ctypes.c_int32)
_p_float = ctypes.POINTER(ctypes.c_float)
_buf = ctypes.c_char_p  # output buffers are passed as create_string_buffer

# moe_layer_args.flags and .path, and the empty place of a routing
# (MOE_LAYER_*, MOE_PATH_*, MOE_ROUTING_GAP of moe_infinity.h;
# tests/test_native_abi.py checks them against the header).
LAYER_NO_MAPPED = 1
LAYER_NO_KERNELS = 2
LAYER_HOST_BATCHED = 4
LAYER_ROUTING_GAPS = 8
LAYER_ROWWISE = 16
ROUTING_GAP = -1  # MOE_ROUTING_GAP: an empty place of a routing with LAYER_ROUTING_GAPS
PATH_MAPPED = 1
PATH_KERNELS = 2
PATH_HOST_STREAM = 3
PATH_HOST_STACKED = 4
PATH_NEED_ROUTING = 5


class LayerArgs(ctypes.Structure):
    """``moe_layer_args`` of moe_infinity.h (tests/test_native_abi.py checks
    the fields against the header): one MoE layer for the executor."""

    _fields_ = [
        ("layer", ctypes.c_int32),
        ("nreq", ctypes.c_int32),
        ("reqs", _p_uint64),
        ("topk_host", _p_int64),
        ("stream", ctypes.c_uint64),
        ("x", ctypes.c_uint64),
        ("out", ctypes.c_uint64),
        ("scratch", ctypes.c_uint64),
        ("topk", ctypes.c_uint64),
        ("weights", ctypes.c_uint64),
        ("tokens", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("weights_dtype", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("path", ctypes.c_int32),
        ("experts_cap", ctypes.c_int32),
        ("n_experts", ctypes.c_int32),
        ("experts", _p_int32),
        ("partial", ctypes.c_uint64),
        ("n_cpu_experts", ctypes.c_int32),
        ("cpu_experts", _p_int32),
    ]


# name -> argtypes (every export returns int32 status)
_SIGNATURES: dict[str, list[Any]] = {
    "moe_layer": [_c_uint64, ctypes.POINTER(LayerArgs)],
    "moe_version": [_buf, _c_int64, _p_int64],
    "moe_last_error": [_buf, _c_int64, _p_int64],
    "moe_engine_create": [_p_char, _p_uint64],
    "moe_engine_close": [_c_uint64],
    "moe_engine_add_checkpoint": [_c_uint64, _p_char],
    "moe_engine_add_compressed": [_c_uint64, _p_char, _buf, _c_int64, _p_int64],
    "moe_engine_compress_host": [_c_uint64, _p_char, _buf, _c_int64, _p_int64],
    "moe_engine_add_host_tensor": [_c_uint64, _p_char, _p_char, _c_int32, _p_int64, ctypes.c_void_p, _c_int64],
    "moe_engine_modules": [_c_uint64, _buf, _c_int64, _p_int64],
    "moe_engine_configure": [_c_uint64, _p_char, _buf, _c_int64, _p_int64],
    "moe_engine_slot_plan": [_c_uint64, _p_char, _buf, _c_int64, _p_int64],
    "moe_engine_arena": [_c_uint64, _p_uint64, _p_int64],
    "moe_engine_slot_addr": [_c_uint64, _c_int32, _p_uint64],
    "moe_engine_max_pin": [_c_uint64, _p_int32],
    "moe_request_begin": [_c_uint64, _p_uint64],
    "moe_request_end": [_c_uint64, _c_uint64],
    "moe_observe": [_c_uint64, _c_int32, _c_int32, _p_uint64, _p_float],
    "moe_acquire": [_c_uint64, _c_int32, _c_int32, _p_int32, _p_int32, _p_uint64, _c_uint64],
    "moe_release": [_c_uint64, _c_uint64, _c_uint64],
    "moe_layer_ffn": [_c_uint64, _c_int32, _c_int32, _p_int32, _c_uint64] + [_c_uint64] * 5 + [_c_int64, _c_int64, _c_int32],
    "moe_ffn_shape": [_c_uint64, _p_int64, _p_int64, _p_int32],
    "moe_capture_begin": [_c_uint64],
    "moe_capture_end": [_c_uint64, _p_int32],
    "moe_graph_step": [_c_uint64, _c_uint64, _c_int32, _p_uint64],
    "moe_engine_progress": [_c_uint64, _p_int64, _p_int64],
    "moe_device_memory": [_c_int32, _p_int64, _p_int64],
    "moe_hint": [_c_uint64, _c_int32, _c_int32, _p_int32],
    "moe_stats": [_c_uint64, _buf, _c_int64, _p_int64],
    "moe_reset_stats": [_c_uint64],
    "moe_save_trace": [_c_uint64, _p_char],
    "moe_debug_panic": [_c_uint64],
    "moe_runtime_stats": [_buf, _c_int64, _p_int64],
    "moe_engine_tune": [_c_uint64, _p_char],
    "moe_engine_plan": [_c_uint64, _buf, _c_int64, _p_int64],
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_path: Path | None = None


def cuda_usable() -> bool:
    """Reports whether the CUDA driver loads, initialises and sees a device.

    Uses the driver API through ctypes only, so it is safe on machines with
    no GPU or no driver at all.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    try:
        if cuda.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
        return count.value > 0
    except AttributeError:
        return False


def _search_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here, here.parent.parent / "build"]


def _candidates() -> list[Path]:
    override = os.environ.get("MOE_INFINITY_LIB")
    if override:
        return [Path(override)]
    names = ["libmoe_infinity.so"]
    if os.environ.get("MOE_INFINITY_BACKEND", "").lower() != "cpu" and cuda_usable():
        names.insert(0, "libmoe_infinity_cuda.so")
    return [d / n for n in names for d in _search_dirs()]


def _declare(handle: ctypes.CDLL) -> None:
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes = argtypes
        fn.restype = _c_int32


def lib() -> ctypes.CDLL:
    """Returns the loaded engine library, loading it on first use."""
    global _lib, _path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in _candidates():
            if not path.is_file():
                tried.append(f"{path} (missing)")
                continue
            try:
                # RTLD_LAZY: the CUDA build leaves NVML symbols to be resolved
                # when (and if) NVML is dlopen'ed at run time.
                handle = ctypes.CDLL(str(path), mode=os.RTLD_LAZY)
                _declare(handle)
            except (OSError, AttributeError) as exc:
                tried.append(f"{path} ({exc})")
                continue
            _lib, _path = handle, path
            return _lib
        raise LibraryLoadError(
            "cannot load the moe_infinity engine library; tried: "
            + "; ".join(tried)
            + ". Build it with `make` or reinstall with `pip install .`, or set MOE_INFINITY_LIB."
        )


def library_path() -> Path:
    """Path of the loaded library (loads it if needed)."""
    lib()
    assert _path is not None
    return _path


def variant() -> str:
    """``"cuda"`` or ``"cpu"``: which build of the engine is loaded."""
    return "cuda" if library_path().name.endswith("_cuda.so") else "cpu"


def _read_string(name: str, size: int = 1024) -> str:
    """Calls an export that writes a string into (buf, cap, needed), growing
    the buffer as needed. Raises on failure (the message is read with
    moe_last_error, which cannot fail this way)."""
    fn = getattr(lib(), name)
    while True:
        buf = ctypes.create_string_buffer(size)
        needed = ctypes.c_int64(0)
        st = fn(buf, size, ctypes.byref(needed))
        if st == _STATUS_BUFFER:
            size = int(needed.value) + 1
            continue
        if st != 0:
            raise error_for_status(st, last_error() if name != "moe_last_error" else f"{name} failed")
        return buf.value.decode("utf-8", "replace")


def last_error() -> str:
    """The calling thread's last engine error message."""
    return _read_string("moe_last_error")


def call(name: str, *args: Any) -> None:
    """Calls an export and raises the matching MoEInfinityError on failure."""
    st = getattr(lib(), name)(*args)
    if st != 0:
        raise_status(name, st)


def raise_status(name: str, st: int) -> None:
    """Raises the MoEInfinityError for export ``name``'s status ``st``."""
    raise error_for_status(st, last_error() or f"{name} failed with status {st}")


def call_json(name: str, *args: Any) -> Any:
    """Calls an export that writes JSON into (buf, cap, needed), growing
    the buffer as needed, and returns the decoded value."""
    size = 1 << 14
    fn = getattr(lib(), name)
    while True:
        buf = ctypes.create_string_buffer(size)
        needed = ctypes.c_int64(0)
        st = fn(*args, buf, size, ctypes.byref(needed))
        if st == _STATUS_BUFFER:
            size = int(needed.value) + 1
            continue
        if st != 0:
            raise error_for_status(st, last_error() or f"{name} failed with status {st}")
        return json.loads(buf.value.decode("utf-8"))


def device_memory(device: int) -> tuple[int, int]:
    """(total, free) bytes of CUDA device ``device`` as NVML reports them
    (the CUDA build only)."""
    total, free = ctypes.c_int64(0), ctypes.c_int64(0)
    call("moe_device_memory", device, ctypes.byref(total), ctypes.byref(free))
    return total.value, free.value


def runtime_stats() -> dict[str, Any]:
    """Process-wide engine counters: goroutines, Go heap bytes, open engines."""
    return call_json("moe_runtime_stats")


def version() -> str:
    """The engine library's version string, e.g. ``"0.1.0 (cpu)"``."""
    return _read_string("moe_version", 64)
