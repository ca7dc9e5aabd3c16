"""How fast SMs read pinned host memory over PCIe, by access pattern, next to
the copy engine (DMA) on the same buffer.

Mapped mode reads a missed expert in place. On the H100 the FFN kernels do
that at ~92% of the DMA bandwidth (BENCHMARKS.md, zero-copy section), and on
the Mixtral shape that gap is most of the distance to the transfer floor.
This separates the access pattern from the mechanism:

- ``rows``: the FFN kernels' pattern — a warp per weight row (8 KiB gate/up
  rows and 28 KiB down rows of Mixtral), lanes striding 16-byte loads;
- ``chunks``: each block a contiguous 64 KiB chunk, four 16-byte loads in
  flight per thread;
- ``bulk``: Hopper's bulk asynchronous copy (TMA, ``cp.async.bulk``) of
  16 KiB chunks into shared memory, double-buffered, one thread issuing.

    python benchmarks/pcie_read.py --out benchmarks/results/pcie_read_h100.json

Kernels: cuda/pcie_read.cu, built to benchmarks/pcie_read.ptx with
``clang-16 -x cuda --cuda-device-only -nocudainc -nocudalib
--cuda-gpu-arch=sm_90 -O3 -S -Icuda`` and the PTX version raised to 8.0
(the bulk copy needs it; clang 16 writes 7.8). Needs a CUDA GPU (bulk:
sm_90) and torch; times with CUDA events, median over --reps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptx_module import PTXModule, timed_ms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THREADS = 256
BULK = 16384


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps (CUDA events), after one warm-up."""
    return timed_ms(lambda _i: fn(), reps) / 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="bytes read per measurement (MiB)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("pcie_read: needs a CUDA device", file=sys.stderr)
        return 2
    k = PTXModule(ROOT / "benchmarks/pcie_read.ptx", ["pr_rows", "pr_chunks", "pr_bulk"])
    n = args.mib << 20
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.view(torch.int32).random_()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        rows[name] = n / seconds / 1e9
        print(f"{name:28s} {rows[name]:6.1f} GB/s", flush=True)

    record("dma_copy", timed(lambda: dst.copy_(src, non_blocking=True), args.reps))
    for row_bytes in (8192, 28672):
        nrows = n // row_bytes
        record(f"rows_{row_bytes // 1024}KiB",
               timed(lambda: k.launch("pr_rows", ((nrows + THREADS // 32 - 1) // (THREADS // 32), 1), THREADS, [src.data_ptr(), nrows, row_bytes // 16, sink.data_ptr()]), args.reps))
    chunk = 64 << 10
    record("chunks_64KiB_unroll4", timed(lambda: k.launch("pr_chunks", (n // chunk, 1), THREADS, [src.data_ptr(), chunk // 16, sink.data_ptr()]), args.reps))
    record("hbm_chunks_64KiB (reference)", timed(lambda: k.launch("pr_chunks", (n // chunk, 1), THREADS, [dst.data_ptr(), chunk // 16, sink.data_ptr()]), args.reps))
    for per_sm in (2, 4, 8):
        try:
            record(f"bulk_16KiB_{per_sm}_blocks_per_SM",
                   timed(lambda: k.launch("pr_bulk", (sms * per_sm, 1), THREADS, [src.data_ptr(), n // BULK, sink.data_ptr()]), args.reps))
        except RuntimeError as exc:  # e.g. no sm_90, or the bulk copy refused host memory
            rows[f"bulk_16KiB_{per_sm}_blocks_per_SM"] = None
            print(f"bulk: {exc}", flush=True)
            break
    result = {"device": torch.cuda.get_device_name(0), "bytes": n, "GBps": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
