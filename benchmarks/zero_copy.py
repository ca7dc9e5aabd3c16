"""Zero-copy expert reads: how fast the engine's FFN kernels run when a
missing expert is read straight from pinned host memory over PCIe, next to
copying it first (DMA) and to reading it from the GPU cache (HBM).

This decides the miss path of the decode hot loop: if the kernels read host
memory near the DMA bandwidth, a miss needs no copy, no event and no host
synchronisation — the kernel takes the expert's host address from the
layer's pointer table.

    python benchmarks/zero_copy.py --out benchmarks/results/zero_copy_h100.json

Loads the committed PTX (go/backend/cuda/moe_ffn.ptx) through the driver API
with ctypes; needs a CUDA GPU and torch. Times with CUDA events, median over
--reps launches, rotating through the experts so that nothing is served
from L2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptx_module import PTXModule, timed_ms as timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # name: experts, hidden, inter, top-k
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}
WARPS = 8


class Kernels(PTXModule):
    """moe_gate_up_swiglu and moe_down from the committed PTX."""

    def __init__(self) -> None:
        super().__init__(ROOT / "go/backend/cuda/moe_ffn.ptx", ["moe_gate_up_swiglu", "moe_down"])

    def ffn(self, x, topk, gu_tab, dn_tab, weights, h, out, T, K, H, I) -> None:
        """gu_tab holds [gate rows table; up rows table] (2 × E entries)."""
        P, E = T * K, dn_tab.numel()
        self.launch("moe_gate_up_swiglu", ((I + WARPS - 1) // WARPS, P), 32 * WARPS,
                    [x.data_ptr(), topk.data_ptr(), gu_tab.data_ptr(), gu_tab.data_ptr() + 8 * E, h.data_ptr(), P, K, H, I, 0, E])
        self.launch("moe_down", ((H + WARPS - 1) // WARPS, T), 32 * WARPS,
                    [h.data_ptr(), topk.data_ptr(), dn_tab.data_ptr(), weights.data_ptr(), out.data_ptr(), T, K, H, I, 0, E, 2])


def bench_shape(kern: Kernels, name: str, reps: int, pool: int | None) -> dict:
    E, H, I, K = SHAPES[name]
    n = E if pool is None else min(E, pool)
    dt = torch.bfloat16
    gu_host = (torch.randn(n, 2 * I, H) * 0.02).to(dt).pin_memory()
    dn_host = (torch.randn(n, H, I) * 0.02).to(dt).pin_memory()
    gu_dev, dn_dev = gu_host.cuda(), dn_host.cuda()
    expert_bytes = (gu_host[0].numel() + dn_host[0].numel()) * 2
    T = 1
    x = (torch.randn(T, H, device="cuda") * 0.5).to(dt)
    w = torch.full((T, K), 1.0 / K, device="cuda")
    h = torch.empty(T * K, I, device="cuda")
    out = torch.empty(T, H, device="cuda", dtype=dt)
    # Expert ids per rep: K distinct, rotating so consecutive reps differ.
    picks = [[(r * K + j) % n for j in range(K)] for r in range(max(reps, 1) + 1)]
    topks = [torch.tensor([p], device="cuda", dtype=torch.int64) for p in picks]
    # Tables indexed by the expert id within the pool.
    def table(t: torch.Tensor) -> torch.Tensor:
        return torch.tensor([t[e].data_ptr() for e in range(n)], device="cuda", dtype=torch.int64)

    def gate_up_table(t: torch.Tensor) -> torch.Tensor:  # gate rows, then up rows (I·H further)
        return torch.cat([table(t), table(t) + I * H * 2])

    tabs = {"hbm": (gate_up_table(gu_dev), table(dn_dev)), "zero_copy": (gate_up_table(gu_host), table(dn_host))}
    res = {"shape": name, "experts": E, "hidden": H, "inter": I, "top_k": K, "expert_bytes": expert_bytes, "pool": n}
    for mode, (gt, dtab) in tabs.items():
        ms = timed(lambda i=0: kern.ffn(x, topks[i % len(topks)], gt, dtab, w, h, out, T, K, H, I), reps)
        res[f"{mode}_ms"] = ms
        res[f"{mode}_GBps"] = K * expert_bytes / ms / 1e6
    # The same outputs either way.
    kern.ffn(x, topks[0], *tabs["hbm"], w, h, out, T, K, H, I)
    ref = out.clone()
    kern.ffn(x, topks[0], *tabs["zero_copy"], w, h, out, T, K, H, I)
    res["zero_copy_equal"] = bool(torch.equal(ref, out))
    # DMA of the same K experts (two copies each), then the HBM kernel.
    stage_gu = torch.empty(K, 2 * I, H, device="cuda", dtype=dt)
    stage_dn = torch.empty(K, H, I, device="cuda", dtype=dt)

    def dma(i: int = 0) -> None:
        for j, e in enumerate(picks[i % len(picks)]):
            stage_gu[j].copy_(gu_host[e], non_blocking=True)
            stage_dn[j].copy_(dn_host[e], non_blocking=True)

    ms = timed(dma, reps)
    res["dma_ms"] = ms
    res["dma_GBps"] = K * expert_bytes / ms / 1e6
    res["zero_copy_over_dma"] = res["zero_copy_ms"] / (res["dma_ms"] + res["hbm_ms"])
    return res


def host_costs(n: int = 2000) -> dict:
    """Microseconds per call of the host operations a MoE hook may make."""
    import time

    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    idx = torch.zeros(1, 8, device="cuda", dtype=torch.int64)
    pinned = torch.empty(1, 8, dtype=torch.int64, pin_memory=True)
    ops = {
        "empty_like": lambda: torch.empty_like(x),
        "empty_f32_scratch": lambda: torch.empty((8, 768), dtype=torch.float32, device="cuda"),
        "to_float32": lambda: idx.to(torch.float32),
        "current_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "data_ptr": lambda: x.data_ptr(),
        "routing_to_cpu": lambda: idx.to("cpu"),
        "copy_to_pinned_and_sync": lambda: (pinned.copy_(idx, non_blocking=True), torch.cuda.current_stream().synchronize()),
    }
    out = {}
    for name, f in ops.items():
        for _ in range(50):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            f()
        out[name] = (time.perf_counter_ns() - t0) / n / 1e3
        torch.cuda.synchronize()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("zero_copy: needs a CUDA GPU", file=sys.stderr)
        return 2
    kern = Kernels()
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__}]
    costs = host_costs()
    print(json.dumps({"host_us": costs}), flush=True)
    rows.append({"host_us": costs})
    for name in SHAPES:
        r = bench_shape(kern, name, args.reps, None)
        print(json.dumps(r), flush=True)
        rows.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
