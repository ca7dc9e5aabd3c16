"""Loads a PTX file through the CUDA driver API (ctypes on libcuda) and
launches its kernels on torch's current stream — for the micro-benchmarks
that time kernels outside the engine (zero_copy.py, pcie_read.py). Every
kernel parameter is passed as 8 bytes (pointers and int64), as the kernels
in cuda/ declare them."""

from __future__ import annotations

import ctypes
import statistics
from pathlib import Path

import torch


class PTXModule:
    """The kernels ``names`` of the PTX file ``path`` (primary context)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.cu = ctypes.CDLL("libcuda.so.1")
        torch.zeros(1, device="cuda")  # makes the primary context current
        ptx = Path(path).read_bytes() + b"\0"
        mod = ctypes.c_void_p()
        self._check(self.cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx)), "cuModuleLoadData")
        self.fn: dict[str, ctypes.c_void_p] = {}
        for name in names:
            f = ctypes.c_void_p()
            self._check(self.cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), f"cuModuleGetFunction({name})")
            self.fn[name] = f

    @staticmethod
    def _check(r: int, what: str) -> None:
        if r != 0:
            raise RuntimeError(f"{what} failed: CUresult {r}")

    def launch(self, name: str, grid: tuple[int, int], threads: int, args: list[int]) -> None:
        """Launches kernel ``name`` on a (grid[0], grid[1]) grid of
        ``threads``-thread blocks with 8-byte arguments."""
        vals = [ctypes.c_uint64(a & (2**64 - 1)) for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.cu.cuLaunchKernel(self.fn[name], grid[0], grid[1], 1, threads, 1, 1, 0, stream, ptrs, None), f"launch of {name}")


def timed_ms(fn, reps: int) -> float:
    """Median milliseconds of fn(i) for i in range(reps), timed with CUDA
    events on the current stream, after one warm-up call fn(0)."""
    fn(0)
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)
