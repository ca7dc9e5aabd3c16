"""Serving load benchmark: continuous batching under concurrent clients and
Poisson arrivals, in one process (the scheduler the HTTP server runs, without
HTTP in the measurement).

    python benchmarks/serve_load.py --preset qwen3-30b-a3b --device cuda --device-memory 24GiB \
        --routing generated --clusters 4 --concurrency 1,4,16,32 --out results.json

Routing: ``model`` keeps the router's choice (random weights: near-uniform);
``generated`` replaces it per request, like go/sim's generator with several
request clusters: requests of cluster c draw each token's k experts by rank
from c's own per-layer ranking of the experts, with probability ∝
(rank+1)^-skew. Requests are assigned to clusters in turn. This is where
request-level tracing can pay: a request's first layers tell the EAMC which
cluster it is in.

Rows (JSON lines with --out) state every setting: preset, device, batching
(stacked, stacked-fast or threads, the scheduler modes; --batching runs
several in one process), mapped (--mapped on,off runs both), cpu_experts
(--cpu-experts off,auto runs both on one model; with hybrid, whether the
CPU's part was on, and cpu_computed_per_token: the experts it computed;
an exact stacked step never gives it any),
device_memory, routing, clusters, skew, policy, prefetch, concurrency or
arrival rate, prompt and output lengths. Each configuration is measured after
a warm-up phase of the same load (not recorded); the EAMC keeps what it
learned across configurations of one run, in the order they are listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import moe_infinity  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import moe_infinity as mi  # noqa: E402
from moe_infinity.bench import PRESETS, add_hybrid_arguments, build, cpu_setting, hybrid_arguments, hybrid_options  # noqa: E402
from moe_infinity.serving import SamplingParams, Scheduler  # noqa: E402


class ClusterRouting:
    """Per-request generated routing (see the module doc), installed as the
    runtime's routing override: each engine request (each batch row of a
    forward: a request's prefill, or its token in a stacked decode step;
    one per worker thread with threads batching) gets its own token stream."""

    def __init__(self, rt: Any, k: int, clusters: int, skew: float, seed: int, max_tokens: int):
        self.rt = rt
        self.L, self.E, self.k = len(rt.layers), rt.num_experts, k
        self.skew, self.max_tokens = skew, max_tokens
        rng = np.random.default_rng(seed)
        self.perms = np.stack([np.stack([rng.permutation(self.E) for _ in range(self.L)]) for _ in range(clusters)])  # [C, L, E]
        self.seed = seed
        self.lock = threading.Lock()
        self.next = 0
        self.streams: dict[int, list] = {}  # engine request id → [ids [n, L, k] tensor, cursor]
        rt.set_routing_override(self)

    def _stream(self, req: int) -> list:
        s = self.streams.get(req)
        if s is None:
            with self.lock:
                n = self.next
                self.next += 1
            c = n % len(self.perms)
            rng = np.random.default_rng((self.seed, n))
            inv_w = np.arange(1, self.E + 1, dtype=np.float64) ** self.skew
            keys = rng.exponential(size=(self.max_tokens, self.L, self.E)) * inv_w
            ranks = np.argsort(keys, axis=-1)[..., : self.k]
            ids = np.take_along_axis(np.broadcast_to(self.perms[c], (self.max_tokens, self.L, self.E)), ranks, axis=-1)
            s = self.streams[req] = [torch.as_tensor(ids, dtype=torch.int64), 0]
        return s

    def __call__(self, layer_index: int, top_k_index: torch.Tensor, requests: list[int]) -> torch.Tensor:
        reqs = requests or [0]
        per = top_k_index.shape[0] // len(reqs)  # tokens of each request (row) in this forward
        parts = []
        for r in reqs:
            s = self._stream(r)
            parts.append(s[0][(torch.arange(per) + s[1]) % s[0].shape[0], layer_index])
            if layer_index == self.L - 1:
                s[1] += per
        return torch.cat(parts).to(top_k_index.device)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(np.percentile(np.asarray(xs), q))


def _summary(reqs: list, wall: float) -> dict[str, Any]:
    done = [r for r in reqs if r.finish_reason in ("length", "stop")]
    errors = [r for r in reqs if r.finish_reason == "error"]
    toks = sum(len(r.tokens) for r in done)
    tpot = [(r.finished - r.first_token) / (len(r.tokens) - 1) for r in done if len(r.tokens) > 1 and r.first_token]
    ttft = [r.first_token - r.submitted for r in done if r.first_token]
    return {
        "requests": len(reqs),
        "completed": len(done),
        "errors": len(errors),
        "wall_s": wall,
        "output_tokens": toks,
        "tokens_per_s": toks / wall if wall > 0 else None,
        "tpot_p50_ms": _pct([t * 1e3 for t in tpot], 50),
        "tpot_p99_ms": _pct([t * 1e3 for t in tpot], 99),
        "ttft_p50_ms": _pct([t * 1e3 for t in ttft], 50),
        "ttft_p99_ms": _pct([t * 1e3 for t in ttft], 99),
    }


def closed_loop(s: Scheduler, prompts: list[list[int]], concurrency: int, per_client: int, max_tokens: int) -> tuple[list, float]:
    """``concurrency`` clients, each sending ``per_client`` requests one after
    another."""
    reqs: list = []
    lock = threading.Lock()
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def client(c: int) -> None:
        for i in range(per_client):
            r = s.submit(prompts[(c * per_client + i) % len(prompts)], sp)
            with lock:
                reqs.append(r)
            r.wait()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return reqs, time.perf_counter() - t0


def poisson(s: Scheduler, prompts: list[list[int]], rate: float, n: int, max_tokens: int, seed: int) -> tuple[list, float]:
    """``n`` requests arriving as a Poisson process of ``rate`` requests/s
    (open loop: arrivals do not wait for answers)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = []
    t0 = time.perf_counter()
    at = t0
    for i in range(n):
        at += gaps[i]
        time.sleep(max(0.0, at - time.perf_counter()))
        reqs.append(s.submit(prompts[i % len(prompts)], sp))
    for r in reqs:
        r.wait()
    return reqs, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--device-memory", default="24GiB")
    ap.add_argument("--routing", choices=["model", "generated"], default="generated")
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16,32", help="closed-loop client counts")
    ap.add_argument("--per-client", type=int, default=2, help="requests each closed-loop client sends")
    ap.add_argument("--rates", default="", help="Poisson arrival rates (requests/s), comma-separated")
    ap.add_argument("--poisson-requests", type=int, default=32)
    ap.add_argument("--configs", default="priority:on", help="policy:prefetch pairs, e.g. priority:on,priority:off,lru:on")
    ap.add_argument("--warmup", type=int, default=4, help="requests run (not recorded) before each configuration")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batching", default="stacked", help="scheduler modes to run, comma-separated: stacked (exact), stacked-fast (exact=False), threads")
    ap.add_argument("--mapped", default="", help="mapped mode for each run, comma-separated: on, off (default: the engine's choice, once)")
    add_hybrid_arguments(ap)
    ap.add_argument("--out", help="append JSON rows here")
    args = ap.parse_args(argv)
    try:
        cpu_modes = hybrid_arguments(args)
    except ValueError as e:
        ap.error(str(e))

    device = torch.device(args.device)
    model, cfg = build(args.preset, "cuda" if device.type == "cuda" else "cpu")
    model = mi.offload(model, device=device, device_memory=args.device_memory,
                       engine_options=hybrid_options(cpu_modes, args.measure_link, args.link_rates, args.model_link))
    rt = model.moe_runtime
    k = int(getattr(cfg, "num_experts_per_tok", 2))
    routing = f"model (random weights)"
    if args.routing == "generated":
        ClusterRouting(rt, k, args.clusters, args.skew, args.seed, args.prompt_len + args.max_tokens + 8)
        routing = f"generated: L={len(rt.layers)} E={rt.num_experts} k={k} clusters={args.clusters} skew={args.skew} seed={args.seed} (serve_load.py)"
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(64)]
    conc = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    base = {
        "bench": "serve_load", "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_memory": args.device_memory, "routing": routing, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "max_batch": args.max_batch, "engine": mi.engine_version(),
        "link_rates": args.link_rates, "model_link": args.model_link,
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = []
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    for mapped in args.mapped.split(",") if args.mapped else [None]:
        if mapped is not None:
            rt.set_mapped(mapped == "on")
        for cpu in cpu_modes:
            if cpu is not None:  # one loaded model: the CPU's part paused or resumed
                model.moe_tune(cpu_experts=cpu_setting(cpu))
            for batching in args.batching.split(","):
                with Scheduler(model, max_batch=args.max_batch, max_queue=4096, batching=batching.removesuffix("-fast"), exact=not batching.endswith("-fast")) as s:
                    rows += _run_configs(s, model, args, {**base, "cpu_experts": cpu}, prompts, conc, rates, out)
    if out:
        out.close()
    _print_ratios(rows)
    model.close()
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def _run_configs(s: Scheduler, model: Any, args: Any, base: dict, prompts: list, conc: list[int], rates: list[float], out: Any) -> list[dict]:
    """Every policy:prefetch configuration's closed-loop and Poisson rows
    with one scheduler."""
    rows = []
    for pair in args.configs.split(","):
        policy, pf = pair.split(":")
        model.moe_tune(cache_policy=policy, prefetch=pf == "on", flush=True, reset_stats=True)
        closed_loop(s, prompts, min(4, args.warmup) or 1, max(1, args.warmup // 4), args.max_tokens)
        for mode, values in (("closed", conc), ("poisson", rates)):
            for v in values:
                model.moe_tune(reset_stats=True)
                before = s.stats()["batch"]
                if mode == "closed":
                    reqs, wall = closed_loop(s, prompts, v, args.per_client, args.max_tokens)
                else:
                    reqs, wall = poisson(s, prompts, v, args.poisson_requests, args.max_tokens, args.seed)
                after = s.stats()["batch"]
                st = model.moe_stats()
                steps = after["steps"] - before["steps"]
                row = {
                    **base, "batching": s.batching, "exact": s.exact, "mapped": model.moe_runtime.mapped, "policy": policy, "prefetch": pf == "on", "load": mode,
                    ("concurrency" if mode == "closed" else "rate_rps"): v,
                    **_summary(reqs, wall),
                    "steps": steps,
                    "hit_rate": st["hit_rate"], "bytes_moved": st["bytes_moved"], "stall_s": st["stall_seconds"],
                    "hybrid": bool(st["plan"]["executor"].get("hybrid")),
                    "cpu_computed": st["cpu_computed"], "cpu_s": st["cpu_seconds"],
                    "skew": args.skew, "clusters": args.clusters,
                    "hook_phase_s": {k: round(v, 3) for k, v in st["hook_phase_seconds"].items()},
                }
                row["cpu_computed_per_token"] = row["cpu_computed"] / max(1, row["output_tokens"])
                one = [r for r in rows if r.get("concurrency") == 1 and r["policy"] == policy and r["prefetch"] == (pf == "on")]
                if mode == "poisson" and one and one[0]["tpot_p99_ms"] and row["tpot_p99_ms"] is not None:
                    # The issue's saturation point: where p99 TPOT passes 2x batch-1's.
                    row["tpot_p99_vs_batch1"] = row["tpot_p99_ms"] / one[0]["tpot_p99_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    return rows


def _print_ratios(rows: list[dict]) -> None:
    """Each closed-loop row's throughput against batch 1 of its own
    configuration (same process)."""
    key = lambda r: (r["batching"], r["exact"], r["mapped"], r["cpu_experts"], r["policy"], r["prefetch"])  # noqa: E731
    for cfg in sorted({key(r) for r in rows}, key=str):
        one = [r for r in rows if key(r) == cfg and r.get("concurrency") == 1]
        if one and one[0]["tokens_per_s"]:
            for r in rows:
                if key(r) == cfg and r.get("concurrency"):
                    name = cfg[0] + ("" if cfg[1] else "-fast") + ("" if cfg[2] else " unmapped") + (f" cpu={cfg[3]}" if cfg[3] else "")
                    print(f"{name:>21} {cfg[4]:>8} prefetch={cfg[5]!s:5} x{r['concurrency']:<3} {r['tokens_per_s']:.1f} tok/s = {r['tokens_per_s'] / one[0]['tokens_per_s']:.2f}x batch-1, "
                          f"TPOT p50 {r['tpot_p50_ms']:.1f} ms p99 {r['tpot_p99_ms']:.1f} ms, hit rate {r['hit_rate']:.3f}")
        arrivals = sorted((r for r in rows if key(r) == cfg and "tpot_p99_vs_batch1" in r), key=lambda r: r["rate_rps"])
        if arrivals:
            past = [r for r in arrivals if r["tpot_p99_vs_batch1"] > 2.0]
            where = f"passes 2x batch-1 at {past[0]['rate_rps']:g} req/s ({past[0]['tokens_per_s']:.1f} tok/s)" if past else f"stays within 2x batch-1 up to {arrivals[-1]['rate_rps']:g} req/s"
            ratios = ", ".join(f"{r['rate_rps']:g} req/s: {r['tpot_p99_vs_batch1']:.2f}x" for r in arrivals)
            print(f"{'':>21} {cfg[4]:>8} prefetch={cfg[5]!s:5} Poisson: p99 TPOT {where} ({ratios})")


if __name__ == "__main__":
    sys.exit(main())
