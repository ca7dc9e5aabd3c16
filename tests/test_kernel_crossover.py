"""The kernel crossover measured on this machine: the runtime times one
layer's experts with the engine's kernels and with transformers' code on
slot views (OffloadRuntime.probe_kernel_crossover, run at load on a GPU)
and hands the engine the most tokens for which the kernels won
(moe_tune(kernel_max_tokens=N)); the engine decides with it. On the CPU the
reference kernels stand in for the CUDA ones, so the probe's whole sequence
runs here (its timings, not its result, are the machine's)."""

from __future__ import annotations

import pytest
import torch

import moe_infinity as mi
import tiny_models as tm


@pytest.fixture(scope="module")
def mixtral_path(tmp_path_factory):
    return tm.save(tm.build("mixtral", seed=2, dtype=torch.bfloat16), tmp_path_factory.mktemp("crossover") / "m")


def test_the_probe_hands_the_engine_a_measured_crossover(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16, engine_options={"reference_kernels": True})
    try:
        rt = model.moe_runtime
        assert rt.plan["executor"]["kernel_crossover"] == "default", "a CPU load does not probe"
        p = rt.probe_kernel_crossover(reps=2)
        assert p["tokens"] == [2, 4, 8, 16]
        assert len(p["kernel_s"]) == len(p["torch_s"]) == 4 and min(p["kernel_s"] + p["torch_s"]) > 0
        calls = len(p["tokens"]) * 3  # a warm-up and two timed calls per count and side
        assert p["paths"] == {"kernels": calls, "host-stream": calls}, "each side ran the path it times"
        # The rule: the most tokens up to which the kernels won every count.
        want = 1
        for T, k, t in zip(p["tokens"], p["kernel_s"], p["torch_s"]):
            if k >= t:
                break
            want = T
        assert p["kernel_max_tokens"] == want
        ex = model.moe_stats()["plan"]["executor"]
        assert (ex["kernel_crossover"], ex["kernel_max_tokens"]) == ("measured", want)
        assert rt.plan["kernel_probe"] == p
        st = model.moe_stats()
        assert st["hits"] == st["misses"] == 0 and not any(st["paths"].values()), "the probe's calls are not the user's"

        model.moe_tune(kernel_max_tokens=0)
        ex = model.moe_stats()["plan"]["executor"]
        assert (ex["kernel_crossover"], ex["kernel_max_tokens"]) == ("default", 16)
        for bad in (-1, 17):
            with pytest.raises(mi.InvalidArgumentError, match="kernel_max_tokens"):
                model.moe_tune(kernel_max_tokens=bad)
        with pytest.raises(mi.InvalidArgumentError, match="kernel_max_tokens"):
            model.moe_tune(kernel_max_tokens="4")
        for bad in ({"tokens": (1, 2)}, {"tokens": (32,)}, {"tokens": ()}, {"reps": 0}, {"layer_index": 99}):
            with pytest.raises(mi.InvalidArgumentError, match="probe_kernel_crossover"):
                rt.probe_kernel_crossover(**bad)
    finally:
        model.close()


def test_a_measured_crossover_decides_the_path_of_a_layer_call(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16, engine_options={"reference_kernels": True})
    try:
        ids = torch.randint(3, tm.VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
        model.moe_runtime.set_mapped(False)

        def prefill_paths() -> dict[str, int]:
            model.moe_tune(reset_stats=True)
            with torch.no_grad():
                model(input_ids=ids)
            return {p: n for p, n in model.moe_stats()["paths"].items() if n}

        layers = len(model.moe_runtime.layers)
        assert prefill_paths() == {"kernels": layers}, "by default small experts take four tokens on the kernels"
        model.moe_tune(kernel_max_tokens=2)
        assert prefill_paths() == {"host-stream": layers}, "measured: two at most"
        model.moe_tune(kernel_max_tokens=4)
        assert prefill_paths() == {"kernels": layers}
    finally:
        model.close()


def test_the_probe_and_the_crossover_need_the_kernels(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        with pytest.raises(mi.UnsupportedError, match="needs the engine's expert kernels"):
            model.moe_runtime.probe_kernel_crossover()
        with pytest.raises(mi.UnsupportedError, match="kernel_max_tokens: the expert kernels do not serve this model"):
            model.moe_tune(kernel_max_tokens=2)
        model.moe_tune(kernel_max_tokens=0)  # the default needs none
    finally:
        model.close()


def test_the_probe_pauses_the_cpu_side_and_resumes_it_as_it_was(mixtral_path):
    """With hybrid execution on, the probe's warm-up misses would be
    computed on the CPU and its timings would not be the kernels': the
    CPU's part is paused while it runs and resumed on the same threads."""
    opts = {"reference_kernels": True, "cpu_experts": 2, "link_rates": {"dma_gbps": 0.001, "zero_copy_gbps": 0.001}}
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16, engine_options=opts)
    try:
        before = model.moe_stats()["plan"]["executor"]
        assert before["hybrid"] and before["cpu_threads"] == 2, before.get("hybrid_off")
        p = model.moe_runtime.probe_kernel_crossover(tokens=(2,), reps=1)
        assert p["paths"] == {"kernels": 2, "host-stream": 2}
        after = model.moe_stats()["plan"]["executor"]
        assert (after["hybrid"], after["cpu_threads"], after["hybrid_costs"]) == (True, 2, before["hybrid_costs"]), "resumed, not measured again"
        assert model.moe_stats()["cpu_scale_calls"] == 0, "the CPU computed no expert of the probe's calls"
    finally:
        model.close()
