"""Engine expert-FFN kernels vs torch matmuls on the same cache slots (GPU).

For each shape, the experts of one MoE layer are made resident in the
engine's GPU cache, then one decode step's expert FFN (T tokens, top-k) is
timed two ways on the same slot memory:

* kernel: one moe_layer_ffn call (two launches over every expert);
* torch:  transformers' eager loop (F.linear gate_up, silu·up, F.linear
  down, weighted index_add) on torch views of the slots.

Prints one JSON line per shape and writes them to --out when given.

    python benchmarks/kernel_ffn.py [--out results.json] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import moe_infinity as mi

SHAPES = {
    # name: (experts, hidden, intermediate, top_k)
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3-like": (64, 2048, 1408, 6),
}


class _Dev:
    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None}


def bench(name: str, E: int, H: int, I: int, K: int, T: int, iters: int) -> dict:
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    n_exp = min(E, max(K * T, K))  # experts touched by this step
    gate_up = (torch.randn(n_exp, 2 * I, H, generator=g) / H**0.5).to(dt)
    down = (torch.randn(n_exp, H, I, generator=g) / I**0.5).to(dt)
    eng = mi.Engine(budget_bytes=1 << 40, backend="cuda", prefetch=False)
    eng.add_host_tensor("model.layers.0.mlp.experts.gate_up_proj", gate_up)
    eng.add_host_tensor("model.layers.0.mlp.experts.down_proj", down)
    plan = eng.configure({"regions": [{"name": "gate_up_proj", "parts": ["gate_up_proj"], "dtype": "bfloat16"}, {"name": "down_proj", "parts": ["down_proj"], "dtype": "bfloat16"}]})
    stream = torch.cuda.current_stream().cuda_stream
    experts = list(range(n_exp))
    slots, lease = eng.acquire(0, experts, stream)  # resident before timing
    eng.release(lease, stream)
    addr, size = eng.arena()
    arena = torch.as_tensor(_Dev(addr, size), device="cuda")
    regs = {r["name"]: r for r in plan["layout"]["regions"]}
    views = {}
    for e, s in zip(experts, slots):
        base = s * plan["slot_bytes"]
        views[e] = {k: arena[base + r["offset"] : base + r["offset"] + r["bytes"]].view(dt).view(r["shape"]) for k, r in regs.items()}
    rng = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n_exp, generator=rng)[:K] for _ in range(T)]).cuda()
    w = torch.softmax(torch.randn(T, K, generator=rng), -1).cuda()
    x = torch.randn(T, H, generator=rng).to(dt).cuda()
    out = torch.empty_like(x)
    scratch = torch.empty(T * K, I, dtype=torch.float32, device="cuda")
    topk = idx.to(torch.int64).contiguous()
    weights = w.float().contiguous()
    needed = torch.unique(idx).tolist()

    def kernel():
        eng.layer_ffn(0, needed, stream=stream, x=x.data_ptr(), out=out.data_ptr(), scratch=scratch.data_ptr(),
                      topk=topk.data_ptr(), weights=weights.data_ptr(), tokens=T, k=K, dtype=0)
        return out

    def eager():
        final = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, pos = torch.where(idx == e)
            gate, up = F.linear(x[tok], views[e]["gate_up_proj"]).chunk(2, dim=-1)
            h = F.silu(gate) * up
            y = F.linear(h, views[e]["down_proj"]) * w[tok, pos, None]
            final.index_add_(0, tok, y.to(final.dtype))
        return final

    def timed(fn) -> tuple[float, float]:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / iters
        return start.elapsed_time(end) / iters, wall * 1e3

    k_gpu, k_wall = timed(kernel)
    t_gpu, t_wall = timed(eager)
    a, b = kernel().float(), eager().float()
    rel = ((a - b).norm() / b.norm()).item()
    weight_bytes = len(torch.unique(idx)) * 3 * I * H * 2
    eng.close()
    return {
        "shape": name, "experts": E, "hidden": H, "inter": I, "top_k": K, "tokens": T,
        "kernel_ms": round(k_gpu, 4), "kernel_wall_ms": round(k_wall, 4),
        "torch_ms": round(t_gpu, 4), "torch_wall_ms": round(t_wall, 4),
        "speedup": round(t_gpu / k_gpu, 2),
        "kernel_GBps": round(weight_bytes / (k_gpu * 1e-3) / 1e9, 1),
        "rel_diff_vs_torch": rel,
        "device": torch.cuda.get_device_name(0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tokens", default="1,4")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not mi.engine_version().endswith("(cuda)"):
        print("needs a GPU and the CUDA build of the engine", file=sys.stderr)
        return 2
    torch.cuda.init()
    rows = []
    for name, (E, H, I, K) in SHAPES.items():
        for T in (int(t) for t in args.tokens.split(",")):
            r = bench(name, E, H, I, K, T, args.iters)
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
