"""Where the time of a replayed decode step goes: profiles CUDA-graph decode
steps (moe_infinity.graphs.GraphDecoder) of a preset from decode.py and
writes a breakdown — GPU interval per token, kernels per token, the sum of
kernel times, the time the GPU is busy (union of kernel and copy
intervals), the idle gaps in between, the engine's own kernels and copies,
and the top kernels by time.

    python benchmarks/profile_step.py --preset qwen3-30b-a3b --device-memory 24GiB --out build/profile.json

Needs a CUDA device. The decode benchmark's floor counts GPU compute as the
sum of kernel times; this script shows how much of a replayed step is
kernel time, copy time and idle gaps between kernels. In copy mode (the
default for experts of 32 MiB and more, e.g. --preset mixtral-8x7b) it also
splits the time layers wait for their copies into copying and not copying
(before the first copy, between copies, after the last): "copy_mode".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402  (the benchmark's presets and model builder)

ENGINE_KERNELS = ("moe_gate_up_swiglu", "moe_down", "moe_table_set3")


def union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals (µs)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def gpu_events(prof) -> list[dict[str, Any]]:
    """Kernels and copies the profiler saw on the GPU: name, start, end (µs)."""
    out = []
    for ev in prof.events():
        dt = str(getattr(ev, "device_type", ""))
        if "CUDA" not in dt:
            continue
        tr = ev.time_range
        out.append({"name": ev.name, "start": tr.start, "end": tr.end})
    return out


def breakdown(events: list[dict[str, Any]], tokens: int, top: int = 15) -> dict[str, Any]:
    """Per-token figures of a profiled run of `tokens` replays."""
    if not events:
        return {"error": "the profiler saw no GPU activity (CUPTI unavailable?)"}
    copies, kernels = [], []
    for e in events:
        is_copy = "memcpy" in e["name"].lower() or "memset" in e["name"].lower()
        (copies if is_copy else kernels).append(e)
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = union([(e["start"], e["end"]) for e in events])
    ksum = sum(e["end"] - e["start"] for e in kernels)
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in events:
        by_name[e["name"]].append(e["end"] - e["start"])
    eng = {n: sum(v) for n, v in by_name.items() if any(k in n for k in ENGINE_KERNELS)}
    tops = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    per = lambda x: x / tokens / 1e3  # µs in total -> ms per token
    return {
        "tokens": tokens,
        "span_ms_per_token": per(span),
        "busy_ms_per_token": per(busy),
        "idle_ms_per_token": per(span - busy),
        "kernel_sum_ms_per_token": per(ksum),
        "copy_sum_ms_per_token": per(sum(e["end"] - e["start"] for e in copies)),
        "kernels_per_token": len(kernels) / tokens,
        "copies_per_token": len(copies) / tokens,
        "mean_idle_us_per_kernel": (span - busy) / max(1, len(kernels)),
        "engine_kernels_ms_per_token": {n: per(v) for n, v in eng.items()},
        "top": [{"name": n[:120], "calls_per_token": len(v) / tokens, "ms_per_token": per(sum(v)), "mean_us": statistics.fmean(v)} for n, v in tops],
    }


def copy_waits(events: list[dict[str, Any]], tokens: int) -> dict[str, Any] | None:
    """Copy mode, per token: the GPU time replayed layers waited
    (moe_publish_wait) split into the time host→device copies were running
    and the time they were not — before the layer's first copy (the host's
    reaction), between its copies, and after its last (the answer's
    latency) — plus waits with no copy at all (every expert resident: the
    reaction and the answer alone) and copy time outside any wait.
    None when the step has no copy-mode waits."""
    waits = sorted((e for e in events if "moe_publish_wait" in e["name"]), key=lambda e: e["start"])
    if not waits:
        return None
    copies = sorted((e for e in events if "htod" in e["name"].lower()), key=lambda e: e["start"])
    acc = defaultdict(float)
    used = [False] * len(copies)
    j = 0
    for w in waits:
        while j < len(copies) and copies[j]["end"] <= w["start"]:
            j += 1
        inside = []
        k = j
        while k < len(copies) and copies[k]["start"] < w["end"]:
            inside.append((max(copies[k]["start"], w["start"]), min(copies[k]["end"], w["end"])))
            used[k] = True
            k += 1
        dur = w["end"] - w["start"]
        acc["wait"] += dur
        if not inside:
            acc["waits_without_copies"] += dur
            acc["layers_without_copies"] += 1
            continue
        first, last = inside[0][0], max(e for _, e in inside)
        busy = union(inside)
        acc["copying"] += busy
        acc["before_first_copy"] += first - w["start"]
        acc["between_copies"] += (last - first) - busy
        acc["after_last_copy"] += w["end"] - last
        acc["copies"] += len(inside)
    acc["copy_outside_waits"] = sum(c["end"] - c["start"] for c, u in zip(copies, used) if not u)
    out = {f"{k}_ms_per_token": v / tokens / 1e3 for k, v in acc.items() if k not in ("copies", "layers_without_copies")}
    out["layers_per_token"] = len(waits) / tokens
    out["layers_without_copies_per_token"] = acc["layers_without_copies"] / tokens
    out["copies_per_token"] = acc["copies"] / tokens
    out["before_first_copy_us_per_copying_layer"] = acc["before_first_copy"] / max(1, len(waits) - acc["layers_without_copies"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(decode.PRESETS))
    ap.add_argument("--device-memory", default="24GiB")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--admit-margin", type=float)
    ap.add_argument("--pipelined-only", action="store_true", help="skip the step-by-step replays")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA device", file=sys.stderr)
        return 2
    import moe_infinity as mi
    from moe_infinity.graphs import GraphDecoder
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    model, cfg = decode.build(args.preset, "cuda")
    opts = {} if args.admit_margin is None else {"admit_margin": args.admit_margin}
    model = mi.offload(model, device=device, device_memory=args.device_memory, engine_options=opts)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
    dec = GraphDecoder(model, max_len=args.prompt_len + args.decode + 2)
    results: dict[str, Any] = {"preset": args.preset, "device": torch.cuda.get_device_name(device), "device_memory": args.device_memory,
                               # the decode floor's bandwidth, in this process: compare with copy_mode's copy_GBps_while_waiting
                               "pinned_h2d_GBps": decode.pinned_bandwidth(device), "host": decode.host_facts()}
    modes = (("pipelined", True), ("stepwise", False))
    for mode, pipeline in modes[:1] if args.pipelined_only else modes:
        model.moe_tune(flush=True, reset_stats=True)
        dec.generate(prompt, max_new_tokens=args.decode + 1, on_prefill=model.reset_moe_stats, pipeline=pipeline)  # capture / warm up
        unprofiled = statistics.median(dec.step_s)
        hit_unprofiled = model.moe_stats()["hit_rate"]
        prof = profile(activities=[ProfilerActivity.CUDA])

        def start() -> None:  # after the prefill: profile the replays only
            model.reset_moe_stats()
            torch.cuda.synchronize()
            prof.start()

        dec.generate(prompt, max_new_tokens=args.decode + 1, on_prefill=start, pipeline=pipeline)
        torch.cuda.synchronize()
        prof.stop()
        n = args.decode
        steps = statistics.median(dec.step_s)
        events = gpu_events(prof)
        row = breakdown(events, n)
        cw = copy_waits(events, n)
        if cw is not None:
            # Bandwidth of the copies while layers waited: bytes moved over the time they ran.
            moved = model.moe_stats()["bytes_moved"] / n
            cw["copy_GBps_while_waiting"] = moved / (cw["copying_ms_per_token"] / 1e3) / 1e9 if cw["copying_ms_per_token"] else None
            row["copy_mode"] = cw
        row["decode_s_per_token"] = steps
        row["decode_s_per_token_unprofiled"] = unprofiled
        row["hit_rate_unprofiled"] = hit_unprofiled
        row["hit_rate"] = model.moe_stats()["hit_rate"]
        results[mode] = row
        print(json.dumps({mode: {k: v for k, v in row.items() if k != "top"}}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
