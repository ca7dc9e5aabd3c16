"""Name options (cache_policy, graph_misses, backend, kernel_build) take exact lowercase
names: a blank, empty, differently cased or padded name is an error that
names the setting, from from_pretrained, moe_tune and Engine alike, never
a silent default (the engine once took cache_policy=" " as "priority")."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import moe_infinity as mi
from moe_infinity.builtin import builtin_model_dir

NEAR_MISSES = [" ", "", "\t", "LRU", " lru", "lru ", "lru\n", "Lru", "lru\x00", "fifo"]


@pytest.fixture(scope="module")
def builtin():
    return builtin_model_dir()


@pytest.mark.parametrize("policy", NEAR_MISSES)
def test_from_pretrained_rejects_a_policy_that_is_not_exactly_a_name(builtin, policy):
    with pytest.raises(mi.MoEInfinityError, match=r"policy: unknown cache policy .*\(supported: priority, lru, lfu") as exc:
        mi.from_pretrained(builtin, dtype=torch.float32, device="cpu", cache_policy=policy)
    assert isinstance(exc.value, mi.InvalidArgumentError)


def test_the_exact_failing_input_of_the_config_fuzzer(builtin):
    with pytest.raises(mi.InvalidArgumentError, match=r'policy: unknown cache policy " "'):
        mi.from_pretrained(builtin, dtype=torch.float32, device="cpu", cache_policy=" ")


@pytest.mark.parametrize("value", [" ", "", "AUTO", " copy", "read\n"])
def test_from_pretrained_rejects_a_graph_misses_that_is_not_exactly_a_name(builtin, value):
    with pytest.raises(mi.InvalidArgumentError, match=r"graph_misses: unknown graph-miss mode .*\(supported: auto, read, copy"):
        mi.from_pretrained(builtin, dtype=torch.float32, device="cpu", engine_options={"graph_misses": value})


@pytest.mark.parametrize(("key", "value"), [("policy", " "), ("policy", None), ("backend", " cpu"), ("backend", "CPU"), ("backend", "")])
def test_engine_rejects_names_that_are_not_exact(key, value):
    with pytest.raises(mi.InvalidArgumentError, match=rf"{key}: unknown "):
        mi.Engine(budget_bytes=1 << 20, **{key: value})


def test_case_hint_says_names_are_exact():
    with pytest.raises(mi.InvalidArgumentError, match="names are exact: lowercase, without spaces"):
        mi.Engine(budget_bytes=1 << 20, policy="LRU")


def test_moe_tune_rejects_near_misses_and_changes_nothing(builtin):
    model = mi.from_pretrained(builtin, dtype=torch.float32, device="cpu", device_memory="3MiB", cache_policy="lfu")
    try:
        for policy in NEAR_MISSES:
            with pytest.raises(mi.InvalidArgumentError, match="policy: unknown cache policy"):
                model.moe_tune(cache_policy=policy)
        with pytest.raises(mi.InvalidArgumentError, match="graph_misses: unknown graph-miss mode"):
            model.moe_tune(cache_policy="lru", graph_misses="Copy")
        assert model.moe_stats()["plan"]["policy"] == "lfu", "the reported plan is unchanged (the engine side: TestTuneRejectsBeforeChanging)"
        model.moe_tune(cache_policy="lru")
        assert model.moe_stats()["plan"]["policy"] == "lru"
    finally:
        model.close()


def test_unknown_engine_option_names_the_valid_keys():
    with pytest.raises(mi.InvalidArgumentError, match=r'unknown key "eamc_capacty" \(valid keys: .*eamc_capacity.*max_slots') as err:
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options={"eamc_capacty": 10})
    assert "graph_misses" in str(err.value)


def test_engine_options_of_numpy_scalars_reach_the_engine():
    import numpy as np

    model = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options={"eamc_capacity": np.int64(7), "admit_margin": np.float32(0.5)})
    try:
        assert model.moe_runtime.engine.config["eamc_capacity"] == 7
    finally:
        model.close()


def test_given_link_rates_reach_the_plan_and_are_validated():
    rates = {"dma_gbps": 52.0, "zero_copy_gbps": 33.0, "reaction_us": 20.0}
    model = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options={"link_rates": rates})
    try:
        plan = model.moe_stats()["plan"]
        assert plan["link_rates"] == rates
        assert plan["link_rates_source"] == "given"
        assert plan["graph_misses"] == "read", "the CPU backend has no copy mode"
        assert plan["executor"]["kernels"] is False
    finally:
        model.close()
    with pytest.raises(mi.InvalidArgumentError, match="link_rates needs dma_gbps > 0"):
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options={"link_rates": {"dma_gbps": 0, "zero_copy_gbps": 33}})


def test_model_link_needs_link_rates_and_keeps_the_tokens():
    """model_link slows the CPU backend's copies to the given link's pace;
    it changes when experts arrive, never what is computed."""
    with pytest.raises(mi.InvalidArgumentError, match="model_link needs link_rates"):
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options={"model_link": True})
    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    ids = torch.tensor([tok("The river")["input_ids"]])
    outs = []
    for opts in ({}, {"model_link": True, "link_rates": {"dma_gbps": 0.5, "zero_copy_gbps": 0.5, "reaction_us": 50.0}}):
        model = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options=opts)
        try:
            outs.append(model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist())
            assert model.moe_stats()["bytes_moved"] > 0
            assert model.moe_runtime.engine.config.get("model_link", False) is bool(opts)
        finally:
            model.close()
    assert outs[0] == outs[1]


def test_the_cpu_backend_measures_no_link_and_measure_link_is_checked():
    model = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB")
    try:
        plan = model.moe_stats()["plan"]
        assert plan["link_rates_source"] == "none", "the CPU backend has no host→device link to measure"
        assert plan["link_rates"] is None
    finally:
        model.close()
    with pytest.raises(mi.InvalidArgumentError, match="measure_link"):
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", engine_options={"measure_link": "off"})


@pytest.mark.parametrize("value", [" ", "", "SM89", " sm89", "sm89\n", "sm90", "89"])
def test_from_pretrained_rejects_a_kernel_build_that_is_not_exactly_a_name(builtin, value):
    with pytest.raises(mi.InvalidArgumentError, match=r"kernel_build: unknown kernel build .*\(supported: sm80, sm89"):
        mi.from_pretrained(builtin, dtype=torch.float32, device="cpu", engine_options={"kernel_build": value})


@pytest.mark.parametrize("value", [None, "sm80", "sm89"])
def test_the_cpu_backend_loads_no_kernel_build(builtin, value):
    """kernel_build picks the CUDA kernels' PTX; the CPU backend has none,
    accepts either name and reports "none"."""
    opts = {} if value is None else {"kernel_build": value}
    model = mi.from_pretrained(builtin, dtype=torch.float32, device="cpu", device_memory="2MiB", engine_options=opts)
    try:
        assert model.moe_stats()["plan"]["kernel_build"] == "none"
    finally:
        model.close()
