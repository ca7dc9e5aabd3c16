"""Soak: 2,000 ``generate`` calls of mixed batch sizes, prompt lengths and
new-token counts, greedy and sampling, on the built-in model (CPU, a cache
of a few experts, prefetching on), with ``moe_tune``/``reset_moe_stats`` in
between. Resident memory, open file descriptors, Python and OS threads,
Python objects and the engine's goroutines are sampled every 100 calls after
a warm-up; a least-squares slope per 1,000 calls is fitted to each and must
be flat. Closing the model must return goroutines and descriptors to what
they were before it was loaded.

Run alone: ``python tests/test_soak.py --calls 2000`` (prints the JSON
report; ``--json PATH`` also writes it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

CALLS = 2000
#: Calls before the first sample: the first calls grow caches, allocator
#: pools and the expert-activation matrix legitimately.
WARMUP = 200
#: Calls between samples.
EVERY = 100
#: The expert cache budget: 7 float32 experts (1.125 MiB each) of the
#: built-in model's 32, so layers evict, batches stream their experts through
#: the cache and the prefetcher works.
BUDGET = "8MiB"
#: Batch size and max_new_tokens of a call, drawn uniformly from these; short
#: calls, so that 2,000 of them take about 1.5 minutes on 2 shared cores.
BATCH = (1, 1, 2, 2, 3, 4)
NEW_TOKENS = (1, 1, 1, 1, 2, 2, 3, 4, 8)
#: Prompts are 1 to this many words (1 to ~30 tokens).
PROMPT_WORDS = 12

# Bounds on the least-squares slopes, per 1,000 calls after the warm-up. What
# leaking one thing per call costs, on the built-in model (4 layers, 2 KV
# heads x 64, vocab 4096, float32): a KV cache is 4 KiB per row and position,
# and a mean call has ~28 row-positions (2.2 rows), so ~110 MiB; the last
# step's logits (16 KiB a row) ~34 MiB; one expert ~1,100 MiB. Measured
# slopes are within +-0.5 MiB (the report this test writes), so 4 MiB is
# well clear of the noise and catches a leak of ~4 KiB per call.
RSS_SLOPE_MIB = 4.0
#: Same for the Go heap (sampled without forcing a collection, so it saws
#: by ~3 MiB between samples; the fitted slope's noise is ~0.5 MiB).
GO_HEAP_SLOPE_MIB = 4.0
#: One goroutine leaked per call would be 1,000; per 100 calls, 10.
GOROUTINE_SLOPE = 1.0
#: One Python object kept per call would be 1,000; measured: +-3 in all.
PY_OBJECT_SLOPE = 100.0
#: Go may start one more OS thread for a rare blocking moment and keeps it; a
#: thread per call would be ~1,800 more.
OS_THREAD_SLACK = 4

#: Go's runtime opens these once per process and keeps them (the netpoller,
#: and the cgroup CPU quota files it rereads to size GOMAXPROCS); they are
#: not the engine's.
GO_RUNTIME_FDS = ("anon_inode:[eventpoll]", "anon_inode:[eventfd]", "/sys/fs/cgroup/")

WORDS = (
    "func main ( ) { } return err nil if for range package import fmt the of and to in is that it "
    "with as for was on be by this are or from at which def self class None True print import os sys "
    "license copyright software permission notice warranty provided distribute modify file path buffer "
    "engine cache expert layer token slot prefetch trace request error value"
).split()


# -- measurement --------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


def open_fds() -> dict[int, str]:
    """Open descriptors of this process: number -> what it points at."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return out


def sample(calls: int) -> dict[str, Any]:
    from moe_infinity import _native

    gc.collect()
    rt = _native.runtime_stats()
    return {
        "calls": calls,
        "rss_mib": _status("VmRSS") / 1024,
        "fds": len(open_fds()),
        "py_threads": threading.active_count(),
        "os_threads": _status("Threads"),
        "py_objects": len(gc.get_objects()) + gc.get_freeze_count(),
        "goroutines": rt["goroutines"],
        "go_heap_mib": rt["heap_alloc"] / (1 << 20),
        "engines": rt["engines"],
    }


def slope_per_1000(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, per 1,000 calls."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return 1000.0 * sxy / sxx


# -- workload -----------------------------------------------------------------------------------


def _prompts(rng: random.Random, batch: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, PROMPT_WORDS))) for _ in range(batch)]


def soak(calls: int = CALLS, warmup: int = WARMUP, every: int = EVERY, seed: int = 0) -> dict[str, Any]:
    """Runs the soak and returns its report (samples, slopes, teardown)."""
    import moe_infinity as mi
    from moe_infinity import _native
    from moe_infinity.builtin import builtin_model_dir
    from transformers import AutoTokenizer

    assert calls > warmup + 2 * every, "too few calls to fit a slope after the warm-up"
    path = builtin_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id is not None, "the built-in tokenizer has no pad token: batches cannot be padded"
    tok.padding_side = "left"  # decoder-only: new tokens follow the prompt directly

    gc.collect()
    before_fds, before_rt = open_fds(), _native.runtime_stats()
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    mix = {"greedy": 0, "sample": 0, "tokens": 0, "tune": 0, "reset": 0}
    t0 = time.monotonic()
    # On a small shared machine torch's intra-op pool spinning against other
    # processes made each call >10x slower; one thread keeps 2,000 calls short.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mi.from_pretrained(path, device_memory=BUDGET, dtype=torch.float32, prefetch=True)
            try:
                slots = model.moe_engine.plan["slots"]
                probe = tok(["func main() { return"], return_tensors="pt")
                first = None
                policies = ("priority", "lru", "lfu")
                for i in range(1, calls + 1):
                    batch = rng.choice(BATCH)
                    new = rng.choice(NEW_TOKENS)
                    enc = tok(_prompts(rng, batch), return_tensors="pt", padding=True)
                    kw: dict[str, Any] = {"max_new_tokens": new, "pad_token_id": tok.pad_token_id}
                    if rng.random() < 0.5:
                        kw["do_sample"] = False
                        mix["greedy"] += 1
                    else:
                        kw.update(do_sample=True, temperature=rng.choice((0.7, 1.0, 1.3)), top_k=rng.choice((0, 20, 50)), top_p=rng.choice((1.0, 0.9)))
                        mix["sample"] += 1
                    out = model.generate(**enc, **kw)
                    mix["tokens"] += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
                    if i % 250 == 0:
                        model.moe_tune(cache_policy=policies[(i // 250) % 3], flush=(i % 500 == 0), reset_stats=True)
                        mix["tune"] += 1
                    elif i % 50 == 0:
                        model.reset_moe_stats()
                        mix["reset"] += 1
                    if i == warmup:
                        first = model.generate(**probe, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
                    if i >= warmup and i % every == 0:
                        st = model.moe_stats()
                        assert st["active_requests"] == 0, f"call {i}: {st['active_requests']} requests still active"
                        assert st["resident"] <= slots, f"call {i}: {st['resident']} experts resident in {slots} slots"
                        samples.append(sample(i))
                        # What lived through the warm-up stays: frozen, full collections
                        # at later samples skip it (0.3 s each otherwise).
                        gc.freeze()
                last = model.generate(**probe, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
                same_output = bool(torch.equal(first, last))
            finally:
                gc.unfreeze()
                model.close()
        del model
        gc.collect()
        after_fds, after_rt = open_fds(), _native.runtime_stats()
    finally:
        torch.set_num_threads(threads)
    elapsed = time.monotonic() - t0

    xs = [s["calls"] for s in samples]
    metrics = ("rss_mib", "fds", "py_threads", "os_threads", "py_objects", "goroutines", "go_heap_mib")
    slopes = {m: round(slope_per_1000(xs, [s[m] for s in samples]), 3) for m in metrics}
    leftover = {fd: t for fd, t in after_fds.items() if before_fds.get(fd) != t}
    return {
        "calls": calls,
        "warmup": warmup,
        "every": every,
        "budget": BUDGET,
        "slots": slots,
        "mix": mix,
        "seconds": round(elapsed, 1),
        "slopes_per_1000_calls": slopes,
        "samples": samples,
        "same_greedy_output": same_output,
        "before_load": {"goroutines": before_rt["goroutines"], "engines": before_rt["engines"], "fds": len(before_fds)},
        "after_close": {"goroutines": after_rt["goroutines"], "engines": after_rt["engines"], "fds": len(after_fds)},
        "fds_left_open": {str(fd): t for fd, t in sorted(leftover.items())},
    }


# -- the test -----------------------------------------------------------------------------------


def check(r: dict[str, Any]) -> list[str]:
    """The report's failures (empty when the soak is flat)."""
    s, samples = r["slopes_per_1000_calls"], r["samples"]
    warm = samples[0]
    fails = []
    if abs(s["goroutines"]) > GOROUTINE_SLOPE:
        fails.append(f"goroutines slope {s['goroutines']:+.3f}/1000 calls (bound {GOROUTINE_SLOPE})")
    if max(x["goroutines"] for x in samples) > warm["goroutines"] + 2:
        fails.append(f"goroutines grew: {[x['goroutines'] for x in samples]}")
    if len({x["fds"] for x in samples}) != 1:
        fails.append(f"open descriptors changed: {[x['fds'] for x in samples]}")
    if s["rss_mib"] > RSS_SLOPE_MIB:
        fails.append(f"RSS slope {s['rss_mib']:+.2f} MiB/1000 calls (bound {RSS_SLOPE_MIB})")
    if s["go_heap_mib"] > GO_HEAP_SLOPE_MIB:
        fails.append(f"Go heap slope {s['go_heap_mib']:+.2f} MiB/1000 calls (bound {GO_HEAP_SLOPE_MIB})")
    if s["py_objects"] > PY_OBJECT_SLOPE:
        fails.append(f"Python objects slope {s['py_objects']:+.0f}/1000 calls (bound {PY_OBJECT_SLOPE})")
    if max(x["py_threads"] for x in samples) > warm["py_threads"]:
        fails.append(f"Python threads grew: {[x['py_threads'] for x in samples]}")
    if max(x["os_threads"] for x in samples) > warm["os_threads"] + OS_THREAD_SLACK:
        fails.append(f"OS threads grew: {[x['os_threads'] for x in samples]}")
    if any(x["engines"] != r["before_load"]["engines"] + 1 for x in samples):
        fails.append(f"open engines during the soak: {[x['engines'] for x in samples]} (before load: {r['before_load']['engines']})")
    if not r["same_greedy_output"]:
        fails.append("the probe prompt's greedy output changed between the warm-up and the end")
    b, a = r["before_load"], r["after_close"]
    if a["engines"] != b["engines"] or a["goroutines"] > b["goroutines"]:
        fails.append(f"after close: engines {a['engines']}, goroutines {a['goroutines']}; before load {b['engines']}, {b['goroutines']}")
    stray = {fd: t for fd, t in r["fds_left_open"].items() if not t.startswith(GO_RUNTIME_FDS)}
    if stray:
        fails.append(f"descriptors opened during the soak and still open after close: {stray}")
    return fails


def _summary(r: dict[str, Any], path: Path | None = None) -> str:
    s = r["slopes_per_1000_calls"]
    where = f"; report {path}" if path else ""
    return (
        f"soak {r['calls']} calls in {r['seconds']} s ({r['mix']}); slopes per 1000 calls after {r['warmup']}: "
        f"RSS {s['rss_mib']:+.2f} MiB, fds {s['fds']:+.2f}, goroutines {s['goroutines']:+.3f}, "
        f"Python threads {s['py_threads']:+.3f}, OS threads {s['os_threads']:+.2f}, Python objects {s['py_objects']:+.0f}, "
        f"Go heap {s['go_heap_mib']:+.3f} MiB; goroutines {r['before_load']['goroutines']} before load, "
        f"{r['samples'][0]['goroutines']}..{max(x['goroutines'] for x in r['samples'])} during, {r['after_close']['goroutines']} after close; "
        f"fds {r['before_load']['fds']} -> {r['after_close']['fds']} (Go runtime: {sorted(r['fds_left_open'].values())}){where}"
    )


@pytest.mark.slow
def test_soak_is_flat(tmp_path):
    r = soak()
    path = tmp_path / "soak.json"
    path.write_text(json.dumps(r, indent=1))
    summary = _summary(r, path)
    print(summary)
    fails = check(r)
    assert not fails, summary + "\n" + "\n".join(fails)


def _synthetic(**per_call: float) -> dict[str, Any]:
    """A flat soak report, plus ``per_call`` growth of the named metrics."""
    base = {"rss_mib": 840.0, "fds": 9, "py_threads": 2, "os_threads": 11, "py_objects": 438000, "goroutines": 4, "go_heap_mib": 2.0, "engines": 1}
    samples = [{"calls": c, **{k: v + per_call.get(k, 0) * (c - WARMUP) for k, v in base.items()}} for c in range(WARMUP, CALLS + 1, EVERY)]
    xs = [x["calls"] for x in samples]
    slopes = {k: slope_per_1000(xs, [x[k] for x in samples]) for k in base if k != "engines"}
    return {
        "samples": samples,
        "slopes_per_1000_calls": slopes,
        "same_greedy_output": True,
        "before_load": {"goroutines": 1, "engines": 0, "fds": 5},
        "after_close": {"goroutines": 1, "engines": 0, "fds": 9},
        "fds_left_open": {"3": "/sys/fs/cgroup/cpu.max", "6": "anon_inode:[eventpoll]", "7": "anon_inode:[eventfd]"},
    }


@pytest.mark.parametrize(
    ("leak", "message"),
    [
        ({"rss_mib": 110 / 1000}, "RSS slope"),  # one KV cache per call
        ({"rss_mib": 8 / 1000}, "RSS slope"),  # 8 KiB per call
        ({"go_heap_mib": 1.125 / 100}, "Go heap slope"),  # an expert per 100 calls
        ({"goroutines": 1 / 100}, "goroutines"),
        ({"fds": 1 / 1000}, "open descriptors changed"),
        ({"py_objects": 1 / 5}, "Python objects"),
        ({"py_threads": 1 / 1000}, "Python threads grew"),
        ({"os_threads": 1 / 200}, "OS threads grew"),
    ],
)
def test_check_flags_leaks(leak, message):
    assert check(_synthetic()) == []
    fails = check(_synthetic(**leak))
    assert any(message in f for f in fails), fails


def test_check_flags_teardown_leftovers():
    r = _synthetic()
    r["after_close"]["goroutines"] = 3
    r["fds_left_open"]["12"] = "/x/model.safetensors"
    r["same_greedy_output"] = False
    fails = check(r)
    assert any("after close" in f for f in fails) and any("model.safetensors" in f for f in fails) and any("greedy output" in f for f in fails), fails


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=CALLS, help=f"generate calls (default {CALLS}; fewer give noisier slopes, and at least {WARMUP + 2 * EVERY + 1})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    r = soak(calls=args.calls, seed=args.seed)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))
    print(_summary(r, args.json))
    fails = check(r)
    for f in fails:
        print("FAIL:", f)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
