"""The user-facing API: argument forms, errors that name the setting to
change, offload() of in-memory models, the MoE config-dict interface, Hub ids
from the local cache, offload_dir fingerprints, dtypes and close()."""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_infinity as mi
import tiny_models as tm
from moe_infinity.memory import format_bytes, parse_memory


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    path = tm.save(tm.build("mixtral", seed=5), tmp_path_factory.mktemp("mixtral"))
    tm.write_tokenizer(path)
    return path


def _greedy(model, n=16):
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    return model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize(
    "value,total,want",
    [
        (1024, None, 1024),
        ("24GiB", None, 24 * 2**30),
        ("500MB", None, 500 * 10**6),
        ("1.5 GB", None, 1_500_000_000),
        ("2kib", None, 2048),
        ("123456", None, 123456),
        (0.75, 1000, 750),
        ("0.5", 1000, 500),
        (1.0, 4096, 4096),
    ],
)
def test_parse_memory(value, total, want):
    assert parse_memory(value, total) == want


@pytest.mark.parametrize(
    "value,match",
    [(0, "must be positive"), (-5, "must be positive"), (1.5, r"must lie in \(0, 1\]"), ("lots", "is not a size"), (True, "must be a size"), ([1], "must be an int, float or str"), ("0B", "must be positive")],
)
def test_parse_memory_rejects(value, match):
    with pytest.raises(mi.InvalidArgumentError, match=match):
        parse_memory(value, 100)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


@pytest.mark.parametrize("device_memory", [1 << 20, "1MiB", "2MB", 0.001])
def test_device_memory_forms(mixtral, device_memory):
    model = mi.from_pretrained(mixtral, device_memory=device_memory)
    try:
        plan = model.moe_stats()["plan"]
        assert plan["arena_bytes"] <= parse_memory(device_memory, mi.memory.host_memory_bytes())
        assert plan["slots"] >= 1
    finally:
        model.close()


def test_budget_below_one_expert_says_how_much_is_needed(mixtral):
    with pytest.raises(mi.BudgetError, match=r"holds no expert: one expert slot needs .*raise device_memory to at least \d+ bytes"):
        mi.from_pretrained(mixtral, device_memory=100)


def test_budget_check_sizes_slots_with_the_engines_layout(mixtral, monkeypatch):
    """Before configuring, the budget check asks the engine how big a slot
    is (its layout, alignment included: stated once, in Go): the size the
    plan then has. On a GPU, device_memory must also hold the dense
    weights and a workspace, and the error says how much in all."""
    from moe_infinity import loading

    seen = []
    real = loading._cache_budget

    def spy(device_memory, model, device, slot_bytes):
        seen.append(slot_bytes())
        return real(device_memory, model, device, slot_bytes)

    monkeypatch.setattr(loading, "_cache_budget", spy)
    model = mi.from_pretrained(mixtral, device_memory=1 << 20)
    try:
        assert seen == [model.moe_stats()["plan"]["slot_bytes"]]
    finally:
        model.close()
    dense = torch.nn.Linear(4, 4)
    need = 20 * 4 + loading.WORKSPACE_MIN + seen[0]
    with pytest.raises(mi.BudgetError, match=rf"at least one expert slot .*raise device_memory to at least {need} bytes"):
        real(need - 1, dense, torch.device("cuda"), lambda: seen[0])
    assert real(need, dense, torch.device("cuda"), lambda: seen[0]) == seen[0]


def test_unknown_cache_policy(mixtral):
    with pytest.raises(mi.InvalidArgumentError, match=r'unknown cache policy "fifo" \(supported: priority, lru, lfu\)'):
        mi.from_pretrained(mixtral, cache_policy="fifo")


def test_non_moe_model_is_refused_naming_the_supported_ones(tmp_path):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(mi.UnsupportedError, match=r"'llama' is not a Mixture-of-Experts architecture .*supported: .*mixtral.*qwen3_moe"):
        mi.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    model = tm.build("qwen3_moe")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(mi.NotFoundError, match=rf"shard \"{shards[1].name}\" \(holding tensor .*\) cannot be opened"):
        mi.from_pretrained(tmp_path)


def test_missing_directory_and_no_safetensors(tmp_path):
    with pytest.raises(mi.NotFoundError, match="does not exist"):
        mi.from_pretrained(tmp_path / "nope" / "deeper")
    (tmp_path / "config.json").write_text(json.dumps(tm.make_config("mixtral").to_dict()))
    with pytest.raises(mi.NotFoundError, match="no .safetensors files"):
        mi.from_pretrained(tmp_path)


def test_offload_an_in_memory_model():
    model = tm.build("qwen2_moe", seed=11)
    plain = copy.deepcopy(model)
    want = _greedy(plain)
    ours = mi.offload(model, device_memory=1 << 20)
    try:
        assert not any(".experts." in n for n, _ in ours.named_parameters())
        assert torch.equal(_greedy(ours), want)
        assert ours.moe_stats()["misses"] > 0
    finally:
        ours.close()


def test_offload_moduledict_model():
    model = tm.build("switch_transformers", seed=2)
    plain = copy.deepcopy(model)
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    kw = dict(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    want = plain.generate(**kw)
    ours = mi.offload(model, device_memory=1 << 20, cache_policy="lru")
    try:
        assert torch.equal(ours.generate(**kw), want)
        assert "offloaded expert 0 of MoE layer 0" in repr(ours)
    finally:
        ours.close()


def test_moe_config_dict_interface(mixtral, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(mixtral).eval()
    with mi.MoE(mixtral, {"offload_path": str(tmp_path / "off"), "device_memory_ratio": 0.001}) as moe:
        ids = torch.tensor([[5, 9, 11, 40, 7]])
        got = moe.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(got, plain.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False))
        assert moe.config.model_type == "mixtral"
        assert moe.device.type == "cpu"
        assert moe(ids).logits.shape == (1, 5, tm.VOCAB)
        assert moe.moe_stats()["misses"] > 0
    assert (tmp_path / "off" / "trace.bin").exists(), "the trace is written to offload_path at close"
    with pytest.raises(mi.InvalidArgumentError, match="unknown MoE config keys"):
        mi.MoE(mixtral, {"offload_path": "x", "gpu_ratio": 1})


def test_hub_id_from_the_local_cache_offline(mixtral, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-mixtral" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(mixtral, snap)
    (cache / "models--tiny-org--tiny-mixtral" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-mixtral" / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = mi.from_pretrained("tiny-org/tiny-mixtral", device_memory=1 << 20, cache_dir=str(cache))
    try:
        assert torch.equal(_greedy(model), _greedy(AutoModelForCausalLM.from_pretrained(mixtral).eval()))
    finally:
        model.close()
    with pytest.raises(mi.NotFoundError, match="cannot find 'tiny-org/absent'"):
        mi.from_pretrained("tiny-org/absent", cache_dir=str(cache))


def test_offload_dir_fingerprint_detects_another_model(mixtral, tmp_path):
    off = tmp_path / "off"
    m = mi.from_pretrained(mixtral, offload_dir=off, device_memory=1 << 20)
    _greedy(m)
    m.close()
    assert (off / "trace.bin").exists()
    m = mi.from_pretrained(mixtral, offload_dir=off, device_memory=1 << 20)
    assert m.moe_stats()["eamc_size"] == 1, "the same model reuses its trace"
    m.close()
    other = tm.save(tm.build("mixtral", seed=99), tmp_path / "other")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = mi.from_pretrained(other, offload_dir=off, device_memory=1 << 20)
    try:
        assert any("made for another model" in str(x.message) for x in w)
        assert m.moe_stats()["eamc_size"] == 0, "another model's trace is never reused"
    finally:
        m.close()


def test_trace_path_round_trip(mixtral, tmp_path):
    trace = tmp_path / "t.bin"
    m = mi.from_pretrained(mixtral, trace_path=trace, device_memory=1 << 20)
    _greedy(m)
    _greedy(m)
    m.save_moe_trace(tmp_path / "copy.bin")
    m.close()
    assert trace.exists() and (tmp_path / "copy.bin").exists()
    m = mi.from_pretrained(mixtral, trace_path=trace, device_memory=1 << 20)
    try:
        assert m.moe_stats()["eamc_size"] == 2
    finally:
        m.close()


def test_bfloat16_dtype_matches_transformers(mixtral):
    plain = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.bfloat16).eval()
    ours = mi.from_pretrained(mixtral, dtype=torch.bfloat16, device_memory=1 << 20)
    try:
        assert ours.dtype == torch.bfloat16
        assert torch.equal(_greedy(ours), _greedy(plain))
        ids = torch.tensor([[5, 9, 11]])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, plain(ids).logits, rtol=0, atol=0)
    finally:
        ours.close()


def test_stats_per_layer(mixtral):
    m = mi.from_pretrained(mixtral, device_memory=1 << 20)
    try:
        _greedy(m, 4)
        st = m.moe_stats()
        assert [layer["module"] for layer in st["layers"]] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        for key in ("hits", "misses", "prefetch_hits", "bytes_moved", "stall_ns", "wasted_prefetches", "cpu_computed", "cpu_ns", "cpu_seconds"):
            assert key in st and all(key in layer for layer in st["layers"])
        assert 0.0 <= st["hit_rate"] <= 1.0
        assert st["stall_seconds"] == st["stall_ns"] / 1e9
        assert st["cpu_computed"] == 0 and st["cpu_seconds"] == 0.0, "cpu_experts \"auto\" is off on the CPU"
        assert "is off on the CPU backend" in st["plan"]["executor"]["hybrid_off"]
        ex = st["plan"]["executor"]
        assert not ex["graph_hand_off"] and ex["graph_hand_off_off"].startswith("hybrid execution is off: ")
    finally:
        m.close()


def test_cpu_experts_threads_turn_hybrid_execution_on(mixtral):
    m = mi.from_pretrained(mixtral, dtype=torch.bfloat16, device_memory=1 << 20, engine_options={"cpu_experts": 2})
    try:
        _greedy(m, 4)
        st = m.moe_stats()
        ex = st["plan"]["executor"]
        assert ex["hybrid"], ex.get("hybrid_off")
        assert ex["hybrid_costs"]["cpu_gbps"] > 0
        assert ex["graph_hand_off"], ex.get("graph_hand_off_off")  # the CPU backend's copy-mode stand-in has it
        assert 0 <= st["cpu_computed"] <= st["misses"]
        assert st["cpu_computed"] == sum(layer["cpu_computed"] for layer in st["layers"])
        assert st["cpu_seconds"] == st["cpu_ns"] / 1e9
        assert all(layer["cpu_seconds"] == layer["cpu_ns"] / 1e9 for layer in st["layers"])
        # Paused by moe_tune, the CPU computes nothing and the plan says why;
        # resumed, it is on again (one loaded model, as the benchmarks compare).
        m.moe_tune(cpu_experts="off", flush=True, reset_stats=True)
        ex = m.moe_stats()["plan"]["executor"]
        assert not ex["hybrid"] and "paused by tune" in ex["hybrid_off"]
        assert not ex["graph_hand_off"]
        _greedy(m, 4)
        st = m.moe_stats()
        assert st["cpu_computed"] == 0 and st["misses"] > 0
        m.moe_tune(cpu_experts="auto", flush=True, reset_stats=True)
        ex = m.moe_stats()["plan"]["executor"]
        assert ex["hybrid"] and ex["graph_hand_off"] and "hybrid_off" not in ex
        assert ex["cpu_threads"] == 2, "auto on the CPU resumes the count the model was loaded with"
        # A thread count: the CPU side measured again on it, its calibration
        # (how much longer than the probe its experts took) started over.
        _greedy(m, 4)
        st = m.moe_stats()
        assert (st["cpu_scale_calls"] > 0) == (st["cpu_computed"] > 0), "each call the CPU computed in is observed"
        m.moe_tune(cpu_experts=1)
        st = m.moe_stats()
        assert st["plan"]["executor"]["cpu_threads"] == 1 and st["plan"]["executor"]["hybrid"]
        assert st["cpu_scale_calls"] == 0 and st["cpu_scale"] == 1.0
        _greedy(m, 4)
        with pytest.raises(mi.InvalidArgumentError, match="cpu_experts: unknown CPU expert mode"):
            m.moe_tune(cpu_experts="on")
        with pytest.raises(mi.InvalidArgumentError, match="neither"):
            m.moe_tune(cpu_experts=0)
    finally:
        m.close()


def test_prefill_takes_part_in_hybrid_execution(mixtral):
    # A prompt longer than the kernels take runs the host path
    # (transformers' code on slot views). With the link's rate given slow
    # (0.001 GB/s) the cost model sends every miss to the CPU: the engine
    # computes them into the partial, transformers' code skips them and
    # computes the experts already resident (a one-token step loaded
    # them); the CPU's experts are then offered to the cache, and some are
    # copied in behind the calls. The layer's output is the same model's with cpu_experts
    # "off" within bfloat16 rounding (the CPU's SIMD kernel sums in
    # float32, transformers in bfloat16: at most 1/32 of the output's
    # largest value, where computing a CPU expert twice is off by about
    # all of it); the greedy tokens are the same.
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    m = mi.from_pretrained(mixtral, dtype=torch.bfloat16, device_memory=1 << 20, engine_options={"cpu_experts": 2, "link_rates": {"dma_gbps": 0.001, "zero_copy_gbps": 0.001}})
    seen = []
    hook = m.model.layers[0].mlp.experts.register_forward_hook(lambda mod, args, out: seen.append(out.float()))
    try:
        m.moe_tune(cpu_experts="off", flush=True)
        with torch.no_grad():
            m(input_ids=ids[:, :1])  # the kernels' path: its experts become resident
        m.moe_tune(cpu_experts="auto", reset_stats=True)
        seen.clear()
        with torch.no_grad():
            m(input_ids=ids)
        st = m.moe_stats()
        assert st["paths"]["host-stream"] == 2 and st["paths"]["kernels"] == st["paths"]["mapped"] == 0, "prefill: the host path"
        assert st["hits"] > 0, "transformers' code computed the resident experts"
        assert st["cpu_computed"] == st["misses"] > 0, "every miss computed on the CPU"
        assert 0 < st["loads"] <= st["cpu_computed"], "the link brought only admissions of experts the CPU computed, behind the calls"
        assert st["cpu_ns"] > 0
        hybrid = seen[0]
        tokens = m.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)

        m.moe_tune(cpu_experts="off", flush=True, reset_stats=True)
        seen.clear()
        with torch.no_grad():
            m(input_ids=ids)
        assert m.moe_stats()["cpu_computed"] == 0
        torch.testing.assert_close(hybrid, seen[0], atol=seen[0].abs().max().item() / 32, rtol=0)
        assert torch.equal(tokens, m.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False))
    finally:
        hook.remove()
        m.close()


def test_moe_tune_cannot_resume_cpu_experts_configure_left_off(mixtral):
    m = mi.from_pretrained(mixtral, dtype=torch.bfloat16, device_memory=1 << 20)
    try:
        m.moe_tune(cpu_experts="off")
        with pytest.raises(mi.InvalidArgumentError, match='not set up at configure: cpu_experts "auto" is off on the CPU backend'):
            m.moe_tune(cpu_experts="auto")
    finally:
        m.close()


def test_close_then_use_raises_and_gc_closes(mixtral):
    m = mi.from_pretrained(mixtral, device_memory=1 << 20)
    eng = m.moe_engine
    m.close()
    m.close()
    with pytest.raises(mi.ClosedError, match="was closed"):
        _greedy(m)
    with pytest.raises(mi.ClosedError):
        m.moe_stats()
    m2 = mi.from_pretrained(mixtral, device_memory=1 << 20)
    eng2 = m2.moe_engine
    del m2
    gc.collect()
    assert eng.closed and eng2.closed


def test_loading_does_not_materialise_experts(tmp_path):
    """Peak RSS while loading stays near dense weights + cache, far below the
    expert bytes (measured in a fresh process)."""
    model = tm.build("mixtral", num_local_experts=16, intermediate_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    path = tm.save(model, tmp_path / "big")
    warm = tm.save(tm.build("mixtral"), tmp_path / "warm")
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    dense_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." not in n)
    del model
    budget = 4 * 2 * 1024 * 256 * 4 * 3 // 2  # about four experts
    ours = _load_rss(f"m = mi.from_pretrained(PATH, device_memory={budget}); extra = m.moe_stats()['plan']['arena_bytes']", path, warm)
    plain = _load_rss("m = transformers.AutoModelForCausalLM.from_pretrained(PATH); extra = 0", path, warm)
    print(
        f"experts {expert_bytes / 2**20:.1f} MiB, dense {dense_bytes / 2**20:.1f} MiB, cache {ours['extra'] / 2**20:.1f} MiB; "
        f"peak RSS growth while loading: moe_infinity {ours['growth'] / 2**20:.1f} MiB, transformers {plain['growth'] / 2**20:.1f} MiB"
    )
    assert ours["growth"] < dense_bytes + ours["extra"] + 64 * 2**20
    assert ours["growth"] < expert_bytes / 2
    assert plain["growth"] > expert_bytes / 2, "the measurement sees materialised experts"


def _load_rss(load: str, path: Path, warm: Path) -> dict:
    """Peak RSS growth (bytes) of a fresh process while it runs `load` on
    PATH, measured with VmHWM after resetting it through /proc/self/clear_refs.
    The same load runs first on a tiny model so that code imported lazily on
    first use is not counted."""
    code = f"""
import json, gc, torch, transformers, moe_infinity as mi
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
PATH = {str(warm)!r}
{load}
m.close() if hasattr(m, "close") else None
del m
PATH = {str(path)!r}
gc.collect()
open('/proc/self/clear_refs', 'w').write('5')
base = status('VmRSS:')
{load}
print(json.dumps({{"growth": status('VmHWM:') - base, "extra": extra}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_graph_decoder_needs_a_gpu_model_in_mapped_mode(tmp_path):
    """GraphDecoder refuses what it cannot replay, with a clear error."""
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                                  num_local_experts=2))
    with pytest.raises(mi.StateError, match="loaded by moe_infinity"):
        mi.GraphDecoder(plain, max_len=8)
    path = tm.save(tm.build("mixtral", seed=1), tmp_path / "m")
    model = mi.from_pretrained(path, device_memory="64MiB")
    try:
        assert not model.moe_runtime.mapped, "mapped mode needs the GPU kernels"
        with pytest.raises(mi.UnsupportedError, match="CUDA device"):
            mi.GraphDecoder(model, max_len=8)
    finally:
        model.close()


def test_engine_tuning_keywords_reach_the_engine():
    eng = mi.Engine(1 << 20, admit_margin=0.25, prefetch_min_token_share=-1, prefetch_confidence=3, prefetch_min_evidence=8)
    try:
        assert eng.config["admit_margin"] == 0.25 and eng.config["prefetch_min_token_share"] == -1.0
    finally:
        eng.close()
    with pytest.raises(mi.InvalidArgumentError, match="admit_margin must be a finite number >= 0"):
        mi.Engine(1 << 20, admit_margin=-1)
