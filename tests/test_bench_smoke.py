"""Smoke test of the decode benchmark harness on a tiny CPU configuration
(the harness runs, the JSON carries every field; no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_infinity._compat import cache_kwargs, output_cache

ROOT = Path(__file__).resolve().parents[1]

FIELDS = {
    "system", "preset", "policy", "prefetch", "decode_s_per_token", "ttft_s", "hit_rate", "misses_per_token",
    "bytes_moved_per_token", "stall_s_per_token", "overhead_ms_per_token", "compute_s_per_token", "floor_s_per_token",
    "ratio_to_floor", "slots", "expert_bytes", "host",
}


def test_decode_harness_tiny_cpu(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu",
           "--device-memory", "300KiB", "--prompt-len", "12", "--decode", "6", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["prefetch"]) for r in rows] == [("priority", True), ("lru", True), ("lfu", True), ("priority", False)]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["decoded_tokens"] == 6
        assert 0.0 <= r["hit_rate"] <= 1.0
        assert r["slots"] < 32, "the budget holds fewer experts than the model has"
        assert r["bytes_moved_per_token"] == r["misses_per_token"] * r["expert_bytes"] or r["prefetch"]
        assert r["host"]["cpus"] >= 1 and r["host"]["kernel"], "the machine's facts travel with its numbers"


def test_decode_harness_generated_routing_tiny_cpu(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu", "--no-ablations",
           "--device-memory", "300KiB", "--prompt-len", "12", "--decode", "4", "--routing", "generated", "--skew", "1.5",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["routing"].startswith("generated: L=4 E=8 k=2 requests=1 tokens=24 clusters=1 skew=1.5 seed=1")
    assert FIELDS <= set(row)
    # The prefill's link floor counts the distinct experts the prompt's 12
    # tokens use under the same trace (no link on the CPU, so no floor).
    from moe_infinity.bench import generated_routing

    ids = generated_routing(4, 8, 2, 24, 1.5, 1)[:12]
    assert row["prompt_experts"] == sum(len(set(ids[:, layer].ravel().tolist())) for layer in range(4))
    assert 2 * 4 <= row["prompt_experts"] <= 8 * 4
    assert row["ttft_link_floor_s"] is None


def test_decode_harness_bf16_and_fp8_in_one_run_tiny_cpu(tmp_path):
    """--expert-dtype bf16,fp8: both measured in one process on the same
    routing; the fp8 row stores (and moves) about half the bytes per expert
    and states its s/token against the bf16 row's."""
    out = tmp_path / "f.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu", "--no-ablations",
           "--device-memory", "300KiB", "--prompt-len", "12", "--decode", "4", "--routing", "generated", "--expert-dtype", "bf16,fp8",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    bf16, fp8 = json.loads(out.read_text())
    assert (bf16["expert_dtype"], fp8["expert_dtype"]) == ("bf16", "fp8")
    for r in (bf16, fp8):
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["decoded_tokens"] == 4
    assert bf16["routing"] == fp8["routing"] and fp8["routing"].startswith("generated:")
    assert 0.45 * bf16["expert_bytes"] <= fp8["expert_bytes"] <= 0.55 * bf16["expert_bytes"]
    assert fp8["bytes_moved_per_token"] == fp8["misses_per_token"] * fp8["expert_bytes"] or fp8["prefetch"]
    assert bf16["s_per_token_vs_bf16"] is None
    assert fp8["s_per_token_vs_bf16"] == fp8["decode_s_per_token"] / bf16["decode_s_per_token"]
    assert fp8["slots"] > bf16["slots"], "the same budget holds more FP8 experts"


def test_decode_harness_mxfp4_preset_tiny_cpu(tmp_path):
    """The MXFP4 presets (gpt-oss-120b; gpt-oss-tiny here) build the experts
    as gpt-oss ships them and serve them compressed: about 4.25 bits a
    weight in the slot (blocks and e8m0 scales, bf16 biases)."""
    out = tmp_path / "m.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "gpt-oss-tiny", "--device", "cpu", "--no-ablations",
           "--device-memory", "200KiB", "--prompt-len", "8", "--decode", "4", "--routing", "generated", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert FIELDS <= set(row), FIELDS - set(row)
    assert row["expert_dtype"] == "mxfp4" and row["decoded_tokens"] == 4
    H = I = 64
    packed = (3 * H * I) // 2 + (3 * H * I) // 32 + (2 * I + H) * 2  # blocks, scales, biases
    assert packed <= row["expert_bytes"] < packed + 4 * 256, "the slot holds the expert as stored (plus alignment)"
    for extra in (["--expert-dtype", "fp8"], ["--accelerate"]):
        bad = subprocess.run(cmd[:-2] + extra, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "gpt-oss-tiny" in bad.stderr, bad.stderr[-2000:]


def test_decode_harness_refuses_unknown_dtypes():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--device", "cpu", "--expert-dtype", "bf16,int4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--expert-dtype" in res.stderr, res.stderr[-2000:]


def test_generated_routing_draws_distinct_skewed_experts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import decode

    ids = decode.generated_routing(L=3, E=16, k=4, tokens=400, skew=1.5, seed=2)
    assert ids.shape == (400, 3, 4)
    assert ((ids >= 0) & (ids < 16)).all()
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4).tolist()), "k distinct experts per token and layer"
    assert (decode.generated_routing(3, 16, 4, 400, 1.5, 2) == ids).all(), "seeded"
    for layer in range(3):
        counts = sorted((ids[:, layer] == x).sum() for x in range(16))
        assert counts[-1] > 3 * counts[0] + 1, "skewed popularity"
    flat = decode.generated_routing(L=1, E=16, k=4, tokens=2000, skew=0.0, seed=3)
    counts = [(flat == x).sum() for x in range(16)]
    assert max(counts) < 1.3 * min(counts), "skew 0 is uniform"


def test_forced_routing_follows_the_trace_through_prefill_and_decode():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import decode
    import numpy as np
    import torch
    import moe_infinity as mi

    model, cfg = decode.build("tiny", "cpu")
    model = mi.offload(model, device="cpu", device_memory="300KiB")
    try:
        rt = model.moe_runtime
        ids = decode.generated_routing(len(rt.layers), rt.num_experts, cfg.num_experts_per_tok, 16, 1.0, 5)
        forced = decode.ForcedRouting(rt, ids, torch.device("cpu"))
        assert rt.routing_override is forced
        rt.routing_log = seen = []  # what the engine was handed, per layer call
        prompt = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
            model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, output_cache(out)), use_cache=True)
        L = len(rt.layers)
        assert len(seen) == 2 * L
        for i, (layer, got) in enumerate(seen):
            rows = range(0, 5) if i < L else range(5, 6)
            assert np.array_equal(got, ids[list(rows), layer]), (i, layer)
        forced.reset()
        assert int(forced.cursor) == 0
        forced.remove()
        assert rt.routing_override is None
    finally:
        model.close()


def test_profile_copy_waits_split_each_wait_into_copying_and_idle():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_step

    def ev(name, start, end):
        return {"name": name, "start": float(start), "end": float(end)}

    copy = "Memcpy HtoD (Pinned -> Device)"
    events = [
        # Layer 1 waits 0..100 µs: idle 10, copies 10..40 and 50..90 (gap 10), answer 10.
        ev("moe_publish_wait", 0, 100), ev(copy, 10, 40), ev(copy, 50, 90),
        # Layer 2 waits 200..210 µs with nothing to copy.
        ev("moe_publish_wait", 200, 210),
        # A copy outside any wait (a prefetch) and an unrelated kernel.
        ev(copy, 300, 320), ev("moe_down", 100, 150),
        # Layer 3: a copy that began before the wait counts only inside it.
        ev(copy, 390, 420), ev("moe_publish_wait", 400, 430),
    ]
    out = profile_step.copy_waits(events, tokens=1)
    ms = lambda us: us / 1e3
    assert out["wait_ms_per_token"] == ms(100 + 10 + 30)
    assert out["copying_ms_per_token"] == ms(30 + 40 + 20)
    assert out["before_first_copy_ms_per_token"] == ms(10 + 0)
    assert out["between_copies_ms_per_token"] == ms(10)
    assert out["after_last_copy_ms_per_token"] == ms(10 + 10)
    assert out["waits_without_copies_ms_per_token"] == ms(10)
    assert out["copy_outside_waits_ms_per_token"] == ms(20)
    assert out["layers_per_token"] == 3 and out["layers_without_copies_per_token"] == 1
    assert out["copies_per_token"] == 3
    parts = ("copying", "before_first_copy", "between_copies", "after_last_copy", "waits_without_copies")
    assert abs(sum(out[f"{p}_ms_per_token"] for p in parts) - out["wait_ms_per_token"]) < 1e-12, "the parts add up to the wait"
    assert profile_step.copy_waits([ev("moe_down", 0, 1)], tokens=1) is None


def test_driver_calls_benchmark_times_every_call_or_refuses_without_gpu(tmp_path):
    """benchmarks/driver_calls.py: on a GPU machine a short run reports every
    call kind in every mode; without one it refuses in one line (exit 2)."""
    import torch

    out = tmp_path / "d.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "driver_calls.py"), "--calls", "64", "--gap-us", "50", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if not torch.cuda.is_available():
        assert res.returncode == 2, res.stderr[-2000:]
        assert "needs a CUDA GPU" in res.stderr
        assert not out.exists()
        return
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(out.read_text())
    kinds = {"null", "copy_pinned", "copy_registered", "copy_x3", "launch", "write32", "memset32", "record", "query"}
    for mode in ("quiet", "spaced", "busy", "busy_big", "link_busy"):
        assert kinds <= set(d[mode]), (mode, kinds - set(d[mode]))
        for k, v in d[mode].items():
            assert 0 < v["median_us"] <= v["p90_us"], (mode, k, v)
    assert d["host"]["cpus"] >= 1


def test_serve_load_harness_tiny_cpu(tmp_path):
    """The serving load benchmark runs closed-loop and Poisson loads through
    the scheduler, and each row states its settings."""
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--preset", "tiny", "--device-memory", "300KiB",
           "--concurrency", "1,3", "--per-client", "1", "--rates", "50", "--poisson-requests", "3", "--max-tokens", "5",
           "--configs", "priority:on,lru:off", "--warmup", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["policy"], r["prefetch"], r["load"], r.get("concurrency", r.get("rate_rps"))) for r in rows] == [
        ("priority", True, "closed", 1), ("priority", True, "closed", 3), ("priority", True, "poisson", 50.0),
        ("lru", False, "closed", 1), ("lru", False, "closed", 3), ("lru", False, "poisson", 50.0),
    ]
    for r in rows:
        assert r["errors"] == 0 and r["completed"] == r["requests"]
        assert r["output_tokens"] == 5 * r["requests"]
        assert r["routing"].startswith("generated: L=4 E=8 k=2 clusters=4")
        assert {"preset", "device", "device_memory", "max_batch", "tpot_p99_ms", "hit_rate", "steps"} <= set(r)
    # Poisson rows carry their p99 TPOT against batch 1 of the same configuration.
    for r in rows:
        if r["load"] == "poisson":
            one = next(o for o in rows if o.get("concurrency") == 1 and o["policy"] == r["policy"])
            assert r["tpot_p99_vs_batch1"] == pytest.approx(r["tpot_p99_ms"] / one["tpot_p99_ms"])
    assert "Poisson: p99 TPOT " in res.stdout
    closed3 = [r for r in rows if r.get("concurrency") == 3]
    assert all(r["steps"] < r["output_tokens"] for r in closed3), "three clients decode in shared steps"


def test_serve_load_cpu_experts_off_and_on_in_one_run_tiny_cpu(tmp_path):
    """--cpu-experts runs each setting on one loaded model and the rows say
    which, whether the CPU's part was on, and what it computed: with a link
    slow enough that the CPU takes misses, plain stacked steps give it
    their misses, exact ones do not (only the requests' prefills do), and
    with it off nothing is computed there."""
    out = tmp_path / "h.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--preset", "qwen3-tiny", "--device-memory", "8MiB",
           "--prompt-len", "2", "--max-tokens", "12", "--per-client", "1", "--warmup", "1", "--concurrency", "3",
           "--batching", "stacked,stacked-fast", "--cpu-experts", "off,2", "--link-rates", "0.05,0.05,20", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["cpu_experts"], r["exact"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows, key=str) == sorted([("off", True), ("off", False), ("2", True), ("2", False)], key=str)
    for (cpu, _), r in rows.items():
        assert r["hybrid"] is (cpu == "2")
        assert r["cpu_computed_per_token"] == r["cpu_computed"] / r["output_tokens"]
    assert rows["off", True]["cpu_computed"] == rows["off", False]["cpu_computed"] == 0
    assert rows["2", False]["cpu_computed_per_token"] > 2 * rows["2", True]["cpu_computed_per_token"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--cpu-experts", "some"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--cpu-experts" in bad.stderr


def test_decode_harness_model_link_takes_the_links_time_tiny_cpu(tmp_path):
    """--model-link: the CPU backend's copies take the given link's time, so
    a decode step lasts at least its bytes at the link's rate (5 MB/s here:
    ~60 ms a token, where the unmodelled copies take ~20 ms in all), and the
    row says so; --model-link without --link-rates is refused."""
    out = tmp_path / "m.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu", "--device-memory", "300KiB",
           "--prompt-len", "4", "--decode", "6", "--no-ablations", "--link-rates", "0.005,0.005,0", "--model-link", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["model_link"] is True and row["link_rates_source"] == "given"
    assert row["bytes_moved_per_token"] > 0
    assert row["decode_s_per_token"] >= 0.9 * row["bytes_moved_per_token"] / 0.005e9
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--model-link"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model-link needs --link-rates" in bad.stderr


def test_stacked_step_harness_counts_each_modes_calls_tiny_cpu(tmp_path):
    """The stacked step's host-cost benchmark: a row per mode and row
    count, with its settings; a lone row is the same forward in both modes,
    and an exact step of three requests makes more calls than a plain one
    (its per-request splits)."""
    out = tmp_path / "st.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stacked_step.py"), "--preset", "qwen3-tiny", "--rows", "1,3",
           "--reps", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["batching"], r["rows"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [("exact", 1), ("exact", 3), ("fast", 1), ("fast", 3)]
    for r in rows.values():
        assert {"preset", "device", "hidden", "experts", "threads", "calls_per_step", "step_ms_p50", "step_ms_min"} <= set(r)
        assert r["preset"] == "qwen3-tiny" and r["device"] == "cpu" and r["step_ms_min"] > 0
    assert rows["exact", 1]["calls_per_step"] == rows["fast", 1]["calls_per_step"]
    assert rows["exact", 3]["calls_per_step"] > rows["fast", 3]["calls_per_step"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stacked_step.py"), "--rows", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rows takes positive integers" in bad.stderr


def test_decode_harness_kernel_builds_in_one_run_tiny_cpu(tmp_path):
    """--kernel-build sm80,sm89: one row per build, in one process, each
    carrying the build the engine loaded (none on the CPU, which ignores the
    option); s_per_token_vs_sm80 only where an sm89 row has an sm80 twin."""
    out = tmp_path / "k.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu", "--no-ablations",
           "--device-memory", "300KiB", "--prompt-len", "12", "--decode", "4", "--expert-dtype", "fp8", "--kernel-build", "sm80,sm89",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["expert_dtype"] for r in rows] == ["fp8", "fp8"]
    assert [r["kernel_build"] for r in rows] == ["none", "none"]
    assert [r["s_per_token_vs_sm80"] for r in rows] == [None, None]


def test_decode_harness_refuses_unknown_kernel_builds():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--device", "cpu", "--kernel-build", "sm80,sm90"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--kernel-build" in res.stderr, res.stderr[-2000:]


def test_decode_harness_cpu_experts_off_and_on_in_one_run_tiny_cpu(tmp_path):
    """--cpu-experts off,2,1: one loaded model measured with the CPU's part
    paused, then on two threads, then on one; each row states the knob,
    what the engine made of it and what the CPU computed, and the "on" rows
    their s/token against the "off" row's."""
    out = tmp_path / "c.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu", "--no-ablations",
           "--device-memory", "300KiB", "--prompt-len", "12", "--decode", "6", "--routing", "generated", "--cpu-experts", "off,2,1",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    off, on, one = json.loads(out.read_text())
    assert (off["cpu_experts"], on["cpu_experts"], one["cpu_experts"]) == ("off", "2", "1")
    assert (on["cpu_threads"], one["cpu_threads"]) == (2, 1), "a count measures the CPU side again on that many threads"
    assert one["hybrid"] and one["s_per_token_vs_cpu_off"] == one["decode_s_per_token"] / off["decode_s_per_token"]
    assert on["cpu_scale"] > 0 and one["cpu_scale"] > 0
    assert not off["hybrid"] and "paused by tune" in off["hybrid_off"]
    assert on["hybrid"] and on["hybrid_costs"]["cpu_gbps"] > 0, on["hybrid_off"]
    assert off["cpu_computed_per_token"] == 0 and off["misses_per_token"] > 0
    assert on["cpu_computed_per_token"] <= on["misses_per_token"]
    assert off["s_per_token_vs_cpu_off"] is None
    assert on["s_per_token_vs_cpu_off"] == on["decode_s_per_token"] / off["decode_s_per_token"]
    assert on["link_rates_source"] == off["link_rates_source"] == "none"
    assert on["gpu_only_floor_s_per_token"] == on["floor_s_per_token"]
    assert off["hybrid_floor_s_per_token"] is None, "paused, the cost model planned nothing"
    assert on["hybrid_floor_s_per_token"] is None or on["hybrid_floor_s_per_token"] > on["compute_s_per_token"]
    for bad in ("on", "off,x", "0", "auto,auto"):
        res = subprocess.run(cmd[:-4] + ["--cpu-experts", bad], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "--cpu-experts" in res.stderr, (bad, res.stderr[-2000:])


def test_decode_harness_link_rates_given_qwen3_shape_tiny_cpu(tmp_path):
    """--link-rates: the link's rates given to the engine instead of
    measured, stated in the row. On the CPU backend a link 20 times slower
    than any CPU sends the CPU every miss of Qwen3's routing shape
    (qwen3-tiny: 128 experts, 8 a token); the CPU's experts are still
    offered to the cache, so experts cross the link behind the calls."""
    out = tmp_path / "l.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "qwen3-tiny", "--device", "cpu", "--no-ablations",
           "--device-memory", "4MiB", "--prompt-len", "16", "--decode", "6", "--routing", "generated", "--cpu-experts", "1",
           "--link-rates", "0.05,0.05,20", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["routing"].startswith("generated: L=8 E=128 k=8")
    assert row["link_rates"] == {"dma_gbps": 0.05, "zero_copy_gbps": 0.05, "reaction_us": 20.0}
    assert row["link_rates_source"] == "given"
    assert row["hybrid"] and row["hybrid_costs"]["link_gbps"] == 0.05, row["hybrid_off"]
    assert 0 < row["cpu_computed_per_token"] == row["misses_per_token"], "the CPU took every miss"
    assert row["bytes_moved_per_token"] > 0, "and the cache admitted some of them behind the calls"
    for bad in ("1,1", "0,1,20", "1,1,-1", "a,b,c", "1,1,nan"):
        res = subprocess.run(cmd[:-4] + ["--link-rates", bad], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "--link-rates" in res.stderr, (bad, res.stderr[-2000:])
