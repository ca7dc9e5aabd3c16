"""Host cost of the CUDA driver calls copy mode makes, per call.

Copy mode's engine host time is mostly driver calls (BENCHMARKS.md, "Copy
mode's reaction, engine host time and the GPU-side wait"): per Mixtral layer
~2.9 ``cuMemcpyHtoDAsync``, one ``moe_answer`` launch and ~3 event records,
and one call's cost differs 2.5x between H100 machines. Decode runs are too
noisy to rank changes that save a few calls, so this times each call alone,
thousands of times, on one machine:

- ``copy_pinned`` / ``copy_registered``: ``cuMemcpyHtoDAsync`` of ``--bytes``
  from torch pinned memory / from a ``cuMemHostRegister``-ed buffer (the
  engine's kind);
- ``copy_x3``: three such copies, timed as one (what a Mixtral layer's miss
  issues); ``batch_x3`` / ``batch_x3_any``: the same three in one
  ``cuMemcpyBatchAsync`` (12.8 ABI, source order stream / any);
- ``launch``: ``moe_answer`` with no entries (the engine's PTX);
- ``write32``: ``cuStreamWriteValue32``; ``memset32``: ``cuMemsetD32Async``;
- ``record``: ``cuEventRecord``; ``query``: ``cuEventQuery`` of a completed
  event; ``null``: ``cuCtxGetCurrent`` (the ctypes call's own cost).

Each runs ``--calls`` times with the stream drained every 32 calls (not
timed): on a quiet GPU; ``spaced``, each call after ``--gap-us`` of spinning
(as the copy driver spins between layers: cold caches and branch
predictors; an eighth of the calls); and ``busy`` / ``busy_big`` while
another thread replays a CUDA graph of 64 / 2048 small kernels on another
stream, as torch's graph launches do during decode; ``link_busy`` while
256 MiB host-to-device copies stream back to back on another stream (copy
mode issues its calls while earlier copies saturate the link). Medians and
90th percentiles in microseconds:

    python benchmarks/driver_calls.py --out benchmarks/results/driver_calls_h100.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptx_module import PTXModule  # noqa: E402

try:
    from moe_infinity._hostinfo import host_facts
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from moe_infinity._hostinfo import host_facts

ROOT = Path(__file__).resolve().parents[1]
U64 = ctypes.c_uint64


class Attrs(ctypes.Structure):
    """CUmemcpyAttributes (cuda.h, 12.8)."""

    _fields_ = [("order", ctypes.c_int), ("src_type", ctypes.c_int), ("src_id", ctypes.c_int),
                ("dst_type", ctypes.c_int), ("dst_id", ctypes.c_int), ("flags", ctypes.c_uint)]


def check(r: int, what: str) -> None:
    if r != 0:
        raise RuntimeError(f"{what} failed: CUresult {r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=4096, help="timed calls per kind and mode")
    ap.add_argument("--gap-us", type=int, default=1000, help="spaced mode: microseconds of spinning before each call")
    ap.add_argument("--bytes", type=int, default=64 << 10, help="bytes per copy (small: the queue never fills)")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("driver_calls: needs a CUDA GPU", file=sys.stderr)
        return 2

    mod = PTXModule(ROOT / "go/backend/cuda/moe_ffn.ptx", ["moe_answer"])
    cu = mod.cu
    stream = torch.cuda.Stream()
    s = ctypes.c_void_p(stream.cuda_stream)
    n = a.bytes
    dev = torch.empty(4 * n + 64, dtype=torch.uint8, device="cuda")
    d0 = dev.data_ptr()
    flag = d0 + 4 * n
    pinned = torch.empty(3 * n, dtype=torch.uint8).pin_memory()
    reg = ctypes.create_string_buffer(3 * n + 4096)
    reg_ptr = (ctypes.addressof(reg) + 4095) & ~4095
    check(cu.cuMemHostRegister_v2(ctypes.c_void_p(reg_ptr), ctypes.c_size_t(3 * n), 0), "cuMemHostRegister")
    ev = ctypes.c_void_p()
    check(cu.cuEventCreate(ctypes.byref(ev), 2), "cuEventCreate")  # CU_EVENT_DISABLE_TIMING
    done = ctypes.c_void_p()
    check(cu.cuEventCreate(ctypes.byref(done), 2), "cuEventCreate")
    check(cu.cuEventRecord(done, s), "cuEventRecord")
    stream.synchronize()

    fn = ctypes.c_void_p()
    q = ctypes.c_int()
    batch = None
    # cuMemcpyBatchAsync as the engine looks it up (ABI 12.8: CUDA 13's default has other parameters).
    cu.cuGetProcAddress_v2.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, U64, ctypes.c_void_p]
    if cu.cuGetProcAddress_v2(b"cuMemcpyBatchAsync", ctypes.byref(fn), 12080, 0, ctypes.byref(q)) == 0 and q.value == 0 and fn.value:
        batch = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)(fn.value)

    copy = cu.cuMemcpyHtoDAsync_v2
    copy.argtypes = [U64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    write = cu.cuStreamWriteValue32_v2
    write.argtypes = [ctypes.c_void_p, U64, ctypes.c_uint32, ctypes.c_uint]
    memset = cu.cuMemsetD32Async
    memset.argtypes = [U64, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p]
    answer = mod.fn["moe_answer"]
    args_v = [U64(0), U64(0), U64(flag), U64(1)]
    args = (ctypes.c_void_p * 4)(*[ctypes.addressof(v) for v in args_v])
    dsts = (U64 * 3)(d0, d0 + n, d0 + 2 * n)
    sizes = (U64 * 3)(n, n, n)
    fail = ctypes.c_size_t()
    attr_idx = ctypes.c_size_t(0)
    cur = ctypes.c_void_p()

    def copies(src: int, k: int):
        def f():
            for j in range(k):
                check(copy(d0 + j * n, src + j * n, n, s), "cuMemcpyHtoDAsync")
        return f

    def batched(src: int, order: int):
        srcs = (U64 * 3)(src, src + n, src + 2 * n)
        at = Attrs(order, 0, 0, 0, 0, 0)

        def f():
            check(batch(dsts, srcs, sizes, 3, ctypes.byref(at), ctypes.byref(attr_idx), 1, ctypes.byref(fail), s),
                  "cuMemcpyBatchAsync")
        return f

    kinds = {
        "null": lambda: cu.cuCtxGetCurrent(ctypes.byref(cur)),
        "copy_pinned": copies(pinned.data_ptr(), 1),
        "copy_registered": copies(reg_ptr, 1),
        "copy_x3": copies(reg_ptr, 3),
        "launch": lambda: check(cu.cuLaunchKernel(answer, 1, 1, 1, 128, 1, 1, 0, s, args, None), "cuLaunchKernel"),
        "write32": lambda: check(write(s, flag, 1, 0), "cuStreamWriteValue32"),
        "memset32": lambda: check(memset(flag, 1, 1, s), "cuMemsetD32Async"),
        "record": lambda: check(cu.cuEventRecord(ev, s), "cuEventRecord"),
        "query": lambda: check(cu.cuEventQuery(done), "cuEventQuery"),
    }
    if batch is not None:
        kinds["batch_x3"] = batched(reg_ptr, 1)
        kinds["batch_x3_any"] = batched(reg_ptr, 3)

    def measure(f, calls: int, gap_ns: int = 0) -> dict:
        ts = []
        for _ in range(2):  # warm-up
            f()
        stream.synchronize()
        while len(ts) < calls:
            for _ in range(32):
                if gap_ns:  # spin, as the engine's copy driver does between layers
                    end = time.perf_counter_ns() + gap_ns
                    while time.perf_counter_ns() < end:
                        pass
                t = time.perf_counter_ns()
                f()
                ts.append(time.perf_counter_ns() - t)
            stream.synchronize()
        ts.sort()
        return {"median_us": statistics.median(ts) / 1e3, "p90_us": ts[int(0.9 * len(ts))] / 1e3,
                "mean_us": sum(ts) / len(ts) / 1e3}

    # The busy loads: a graph of small kernels replayed back to back on
    # another stream by another thread (64 kernels; 2048 kernels, about a
    # decoded token's worth, so each launch holds the driver for long).
    side = torch.cuda.Stream()
    x = torch.zeros(1024, device="cuda")

    def graph(kernels: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            x.add_(1)
            side.synchronize()
            with torch.cuda.graph(g, stream=side):
                for _ in range(kernels):
                    x.add_(1)
        return g

    def busy(g, stop: threading.Event) -> None:
        with torch.cuda.stream(side):
            while not stop.is_set():
                g.replay()
                side.synchronize()

    # The link busy: 256 MiB host-to-device copies back to back on another
    # stream, as copy mode's calls are made while earlier copies stream in.
    big_src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    big_dst = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    class Copies:
        def replay(self) -> None:
            for _ in range(4):
                big_dst.copy_(big_src, non_blocking=True)

    modes = {"quiet": (None, 0), "spaced": (None, a.gap_us * 1000), "busy": (graph(64), 0), "busy_big": (graph(2048), 0),
             "link_busy": (Copies(), 0)}
    out = {"calls": a.calls, "spaced_calls": a.calls // 8, "gap_us": a.gap_us, "bytes_per_copy": n,
           "device": torch.cuda.get_device_name(), "batch_available": batch is not None}
    for mode, (g, gap) in modes.items():
        stop = threading.Event()
        th = threading.Thread(target=busy, args=(g, stop), daemon=True) if g is not None else None
        if th:
            th.start()
        try:
            out[mode] = {name: measure(f, a.calls // 8 if gap else a.calls, gap) for name, f in kinds.items()}
        finally:
            stop.set()
            if th:
                th.join()
    out["host"] = host_facts()
    for mode in modes:
        print(mode, " ".join(f"{k}={v['median_us']:.1f}/{v['p90_us']:.1f}" for k, v in out[mode].items()), "(median/p90 us)")
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
