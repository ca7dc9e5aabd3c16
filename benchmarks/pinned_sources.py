"""Host→device copy bandwidth by kind of host memory (GPU machine).

The decode benchmark's floor divides the bytes moved by the bandwidth of a
1 GiB ``pin_memory`` buffer, while the engine copies experts out of the
model's own tensors, page-locked in place with cuMemHostRegister. This
measures both, with copies of one expert's size (default 352 MB, the
Mixtral-8x7B shape) from offsets spread over a large buffer, so that the
difference (if any) between the floor's bandwidth and the engine's is a
number:

  python3 benchmarks/pinned_sources.py --out build/pinned_sources.json

Kinds: ``pin_memory`` (cudaHostAlloc through torch), ``registered`` (a
pageable torch tensor, touched, then cudaHostRegister), ``registered_thp``
(the same after madvise(MADV_HUGEPAGE) before the first touch, where the
kernel allows it). Each kind reports the median and the lowest GB/s of
``--reps`` copies of ``--copy-mb`` each, from offsets spread evenly over its
buffer (listed in offset order), timed with CUDA events, one at a time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import sys
from pathlib import Path

import torch

try:
    from moe_infinity._hostinfo import host_facts
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from moe_infinity._hostinfo import host_facts

MADV_HUGEPAGE = 14


def _copies(src: torch.Tensor, dst: torch.Tensor, n: int, reps: int) -> list[float]:
    """GB/s of reps copies of n bytes from offsets spread evenly over src,
    in offset order."""
    span = src.numel() - n
    stream = torch.cuda.Stream()
    rates = []
    with torch.cuda.stream(stream):
        for r in range(reps + 1):
            off = (max(r - 1, 0) * span // max(reps - 1, 1)) // 4096 * 4096
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst[:n].copy_(src[off : off + n], non_blocking=True)
            b.record()
            b.synchronize()
            if r:  # the first copy warms up
                rates.append(n / (a.elapsed_time(b) / 1e3) / 1e9)
    return rates


def _put(row: dict, kind: str, rates: list[float]) -> None:
    row[f"{kind}_GBps"] = statistics.median(rates)
    row[f"{kind}_GBps_min"] = min(rates)
    row[f"{kind}_GBps_by_offset"] = [round(r, 2) for r in rates]


def _pageable(nbytes: int, huge: bool) -> tuple[torch.Tensor, mmap.mmap]:
    """A pageable buffer from an anonymous mapping (optionally advised to
    use huge pages before it is touched), touched, as a uint8 tensor."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(m, "madvise"):
        m.madvise(MADV_HUGEPAGE)
    t = torch.frombuffer(m, dtype=torch.uint8)
    t.fill_(1)
    return t, m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buffer-gib", type=float, default=8.0, help="size of each registered buffer")
    ap.add_argument("--copy-mb", type=float, default=352.321536, help="bytes per copy, in MB (one Mixtral expert)")
    ap.add_argument("--reps", type=int, default=12, help="copies per kind, from offsets spread evenly over the buffer")
    ap.add_argument("--pin-gib", type=float, default=1.0, help="size of the pin_memory buffer (the decode floor's: 1 GiB)")
    ap.add_argument("--registered-only", action="store_true", help="skip the huge-page variant")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pinned_sources: needs a CUDA GPU")
    nbytes = int(args.buffer_gib * (1 << 30)) // 4096 * 4096
    n = int(args.copy_mb * 1e6) // 4096 * 4096
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    cudart = torch.cuda.cudart()
    row: dict = {
        "device": torch.cuda.get_device_name(),
        "host": host_facts(),
        "buffer_bytes": nbytes,
        "copy_bytes": n,
        "reps": args.reps,
    }
    src = torch.empty(max(int(args.pin_gib * (1 << 30)) // 4096 * 4096, n), dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    _put(row, "pin_memory", _copies(src, dst, n, args.reps))
    del src
    kinds = (("registered", False), ("registered_thp", True))
    for kind, huge in kinds[: 1 if args.registered_only else 2]:
        t, m = _pageable(nbytes, huge)
        ptr = ctypes.c_void_p(t.data_ptr())
        err = cudart.cudaHostRegister(ptr.value, nbytes, 0)
        if int(err) != 0:
            row[f"{kind}_GBps"] = None
            row[f"{kind}_error"] = int(err)
        else:
            _put(row, kind, _copies(t, dst, n, args.reps))
            cudart.cudaHostUnregister(ptr.value)
        del t
        m.close()
    print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
