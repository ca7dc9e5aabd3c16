"""Measures tracing, prefetching and caching on the built-in trained model.

For held-out documents of each domain (the validation split of
tools/train_builtin.py), runs requests through the model with moe_infinity
(prompt of --prompt tokens, --decode greedy tokens), records the routing of
every MoE layer, and produces:

  * expert_heatmaps.png   per-domain expert activation frequency (layer × expert)
  * trace_mixed.json      requests of all domains interleaved (a recorded trace
                          for `go run ./go/cmd/moe-replay -trace ...`; a copy is
                          go/sim/testdata/builtin_mixed.json, the input of
                          TestTracePrefetchBeatsLRUOnBuiltinModel; refresh it
                          by hand after retraining and re-derive that test's
                          margins)
  * replay_mixed.txt/json hit rate of priority/lru/lfu with and without trace-
                          driven prefetching, and Belady's optimum, at 25/50/75%
                          of the experts; prefetch precision and recall
  * recovery.json         per-request hit rate after a switch of domain
                          (go requests, then python requests)
  * eamc_lookup.txt       cost of an EAMC prediction at capacities 100/1000/10000
  * summary.json

One "token" of a recorded trace is one engine step (the prefill, then each
decoded token); its layer groups are the distinct experts that step used,
which is the order in which the engine accesses them.

    python tools/measure_builtin.py --out benchmarks/results/builtin
Needs matplotlib (pip install matplotlib) and Go.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import train_builtin  # noqa: E402  (corpus split shared with training)

DOMAINS = train_builtin.DOMAINS


def prompts(tok, n: int, length: int, seed: int, domain_bytes: int) -> dict[str, list[torch.Tensor]]:
    """n held-out prompts of `length` tokens per domain."""
    corpus = train_builtin.collect(domain_bytes)
    rng = random.Random(seed)
    out = {}
    for dom in DOMAINS:
        ids = train_builtin.encode(tok, corpus[dom]["val"])
        starts = sorted(rng.sample(range(0, len(ids) - length - 1), n))
        out[dom] = [ids[s : s + length].view(1, -1) for s in starts]
    return out


def run_requests(model, reqs: list[torch.Tensor], decode: int) -> list[list[list[list[int]]]]:
    """Generates for each prompt and returns, per request, steps × layers ×
    distinct experts."""
    rt = model.moe_runtime
    L = len(rt.layers)
    out = []
    for ids in reqs:
        rt.routing_log = []
        model.generate(input_ids=ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
        steps: list[list[list[int]]] = []
        cur: list[list[int]] | None = None
        for layer, idx in rt.routing_log:
            if layer == 0:
                cur = [[] for _ in range(L)]
                steps.append(cur)
            assert cur is not None
            cur[layer] = sorted({int(x) for x in idx.reshape(-1)})
        out.append(steps)
        rt.routing_log = None
    return out


def activation(reqs_routing_counts: list[np.ndarray]) -> np.ndarray:
    return np.sum(reqs_routing_counts, axis=0)


def heatmaps(counts: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(counts), figsize=(4 * len(counts), 3.2), constrained_layout=True)
    for ax, (dom, m) in zip(axes, counts.items()):
        share = m / m.sum(axis=1, keepdims=True)
        im = ax.imshow(share, cmap="viridis", vmin=0, vmax=max(0.5, float(share.max())), aspect="auto")
        ax.set_title(f"{dom}: share of routed tokens")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)


def write_trace(path: Path, label: str, L: int, E: int, requests: list[tuple[int, list]]) -> None:
    data = {"label": label, "layers": L, "experts": E, "requests": [{"cluster": c, "tokens": t} for c, t in requests]}
    path.write_text(json.dumps(data))


def replay(trace: Path, out: Path, extra: list[str]) -> str:
    cmd = ["go", "run", "./go/cmd/moe-replay", "-trace", str(trace), "-json", str(out), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return res.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "builtin"))
    ap.add_argument("--model", help="model directory (default: the packaged built-in model)")
    ap.add_argument("--requests", type=int, default=24, help="requests per domain")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--domain-bytes", type=int, default=12000000)
    args = ap.parse_args()
    import moe_infinity as mi
    from moe_infinity.builtin import builtin_model_dir
    from transformers import AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = args.model or str(builtin_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = mi.from_pretrained(path, device="cpu", device_memory=1 << 30, dtype=torch.float32)
    L, E = len(model.moe_runtime.layers), model.moe_runtime.num_experts
    ps = prompts(tok, args.requests, args.prompt, args.seed, args.domain_bytes)
    routing = {dom: run_requests(model, ps[dom], args.decode) for dom in DOMAINS}
    model.close()

    counts = {}
    for dom, reqs in routing.items():
        m = np.zeros((L, E))
        for steps in reqs:
            for step in steps:
                for l, group in enumerate(step):
                    m[l, group] += 1
        counts[dom] = m
    heatmaps(counts, out / "expert_heatmaps.png")

    mixed = [(d, routing[DOMAINS[d]][i]) for i in range(args.requests) for d in range(len(DOMAINS))]
    label = f"recorded: built-in model, held-out {'/'.join(DOMAINS)} prompts interleaved, {args.requests} per domain, prompt {args.prompt} + {args.decode} tokens"
    write_trace(out / "trace_mixed.json", label, L, E, mixed)
    table = replay(out / "trace_mixed.json", out / "replay_mixed.json", ["-cache-frac", "0.25,0.5,0.75"])
    (out / "replay_mixed.txt").write_text(table)
    print(table)

    switch = [(0, r) for r in routing["go"]] + [(1, r) for r in routing["python"]]
    write_trace(out / "trace_switch.json", "recorded: built-in model, go requests then python requests", L, E, switch)
    rec = subprocess.run(
        ["go", "run", "./go/cmd/moe-recovery", "-trace", str(out / "trace_switch.json"), "-switch", str(args.requests), "-cache-frac", "0.25"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    (out / "recovery.json").write_text(rec.stdout)
    print(rec.stdout)

    bench = subprocess.run(
        ["go", "test", "-run", "^$", "-bench", "BenchmarkPredict", "-benchtime", "200x", "./go/trace/"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    (out / "eamc_lookup.txt").write_text(bench.stdout)
    print(bench.stdout)
    summary = {"layers": L, "experts": E, "requests_per_domain": args.requests, "prompt": args.prompt, "decode": args.decode,
               "expert_share": {d: (m / m.sum(axis=1, keepdims=True)).round(3).tolist() for d, m in counts.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
