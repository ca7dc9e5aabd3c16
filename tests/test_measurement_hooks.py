"""The runtime's public measurement hooks, on the CPU: the routing override,
the dense-only mode (experts_skipped), the expert-FFN probe (run_experts)
and set_mapped; and a guard that the benchmarks reach the runtime through
them only (no monkeypatching, no private calls)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_infinity as mi
import tiny_models as tm

ROOT = Path(__file__).resolve().parents[1]

#: The CPU backend's reference FFN stands in for the GPU kernels.
CPU_KERNELS = {"reference_kernels": True}


@pytest.fixture(scope="module")
def mixtral_path(tmp_path_factory):
    return tm.save(tm.build("mixtral", seed=3, dtype=torch.bfloat16), tmp_path_factory.mktemp("m") / "mixtral")


def _prompt(rows: int = 1, n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, tm.VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def _routing(model, prompt: torch.Tensor) -> list[tuple[int, np.ndarray]]:
    """Every MoE layer's routing of one forward, as the engine was handed it."""
    rt = model.moe_runtime
    rt.routing_log = []
    try:
        with torch.no_grad():
            model(input_ids=prompt)
        return rt.routing_log
    finally:
        rt.routing_log = None


def _expert_tokens(model) -> list[list[int]]:
    return [layer["expert_tokens"] for layer in model.moe_stats()["layers"]]


def test_routing_override_is_what_the_engine_sees_and_none_clears_it(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        rt = model.moe_runtime
        E, L = rt.num_experts, len(rt.layers)
        prompt = _prompt(rows=2, n=5)
        router = _routing(model, prompt)
        assert len(router) == L

        calls = []

        def last_two(layer_index, top_k_index, requests):
            calls.append((layer_index, tuple(top_k_index.shape), list(requests)))
            return torch.tensor([E - 2, E - 1]).expand_as(top_k_index).contiguous()

        rt.set_routing_override(last_two)
        assert rt.routing_override is last_two
        model.reset_moe_stats()
        forced = _routing(model, prompt)
        assert [c[0] for c in calls] == list(range(L)), "called once per MoE layer, in order"
        assert all(shape == (10, 2) for _, shape, _ in calls), "all rows' tokens together"
        reqs = calls[0][2]
        assert len(reqs) == 2 and len(set(reqs)) == 2, "one engine request per batch row"
        assert [i for i, _ in forced] == list(range(L))
        for _, idx in forced:
            assert (idx == np.array([E - 2, E - 1])).all(), "the engine was handed the override's routing"
        for counts in _expert_tokens(model):
            assert counts[: E - 2] == [0] * (E - 2) and counts[E - 2 :] == [10, 10], "the engine traced the forced experts"

        rt.set_routing_override(None)
        assert rt.routing_override is None
        again = _routing(model, prompt)
        assert len(calls) == L, "a cleared override is not called"
        for (i, want), (j, got) in zip(router, again):
            assert i == j and np.array_equal(got, want), "the router's choice is back"
        assert any(not np.array_equal(idx, np.array([E - 2, E - 1])) for _, want in router for idx in want), "the check can fail"
    finally:
        model.close()


def test_routing_override_follows_each_request_through_generate(mixtral_path):
    """The override's requests are the engine requests the runtime traces:
    a generate() call is one request from prefill to the last token."""
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        rt = model.moe_runtime
        seen: list[tuple[int, ...]] = []

        def identity(layer_index, top_k_index, requests):
            seen.append(tuple(requests))
            return top_k_index.to(torch.int64)

        rt.set_routing_override(identity)
        prompt = _prompt(n=4, seed=1)
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert len(seen) == 3 * len(rt.layers)
        assert len(set(seen)) == 1 and len(seen[0]) == 1, "one request for the whole generation"
    finally:
        model.close()


@pytest.mark.parametrize(
    "bad, says",
    [
        (lambda idx: idx.to(torch.int32), "torch.int32"),
        (lambda idx: torch.zeros(idx.shape[0], idx.shape[1] + 1, dtype=torch.int64), r"shape \(5, 3\)"),
        (lambda idx: idx.tolist(), "a list"),
    ],
)
def test_routing_override_of_the_wrong_shape_or_dtype_is_refused(mixtral_path, bad, says):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        rt = model.moe_runtime
        rt.set_routing_override(lambda layer_index, top_k_index, requests: bad(top_k_index))
        want = r"must return a torch\.int64 tensor of shape \(5, 2\)"
        with pytest.raises(mi.InvalidArgumentError, match=want) as err, torch.no_grad():
            model(input_ids=_prompt())
        assert re.search(says, str(err.value)), str(err.value)
        rt.set_routing_override(None)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=_prompt()).logits.float()).all(), "the model keeps working"
        with pytest.raises(mi.InvalidArgumentError, match="callable"):
            rt.set_routing_override(42)
    finally:
        model.close()


def test_routing_override_is_refused_for_moduledict_experts(tmp_path):
    path = tm.save(tm.build("switch_transformers", seed=1), tmp_path / "switch")
    model = tm.load(path)
    try:
        with pytest.raises(mi.UnsupportedError, match="fused experts"):
            model.moe_runtime.set_routing_override(lambda i, idx, reqs: idx)
        assert model.moe_runtime.routing_override is None
        model.moe_runtime.set_routing_override(None)  # clearing is always fine
    finally:
        model.close()


def test_experts_skipped_gives_zeros_without_the_engine_and_restores(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        rt = model.moe_runtime
        layer = rt.layers[0]
        x = torch.randn(3, model.config.hidden_size).to(torch.bfloat16)
        idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
        w = torch.full((3, 2), 0.5, dtype=torch.bfloat16)
        with torch.no_grad(), rt.requests(1):
            normal = layer.module(x, idx, w)
        assert normal.abs().sum() > 0
        model.reset_moe_stats()
        with torch.no_grad(), rt.experts_skipped():
            with rt.requests(1):
                zeros = layer.module(x, idx, w)
            model(input_ids=_prompt())
            with rt.experts_skipped():  # nests
                pass
            with rt.requests(1):
                assert layer.module(x, idx, w).abs().sum() == 0, "still skipped after the inner block"
        assert zeros.shape == x.shape and zeros.dtype == x.dtype and zeros.abs().sum() == 0
        st = model.moe_stats()
        assert st["hits"] + st["misses"] == 0 and st["hook_calls"] == 0, "the engine was not called"
        with pytest.raises(RuntimeError, match="boom"), rt.experts_skipped():
            raise RuntimeError("boom")
        with torch.no_grad(), rt.requests(1):
            assert torch.equal(layer.module(x, idx, w), normal), "restored, also after an exception"
        assert model.moe_stats()["hits"] + model.moe_stats()["misses"] > 0
    finally:
        model.close()


def test_experts_skipped_and_override_together(mixtral_path):
    """Skipping wins while both are on; the override stays installed."""
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        rt = model.moe_runtime
        calls = []
        rt.set_routing_override(lambda i, idx, reqs: calls.append(i) or idx.to(torch.int64))
        with torch.no_grad():
            with rt.experts_skipped():
                model(input_ids=_prompt())
            assert calls == []
            model(input_ids=_prompt())
        assert calls == list(range(len(rt.layers)))
    finally:
        model.close()


def test_run_experts_matches_the_executor_on_the_same_experts(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16, engine_options=CPU_KERNELS)
    try:
        rt = model.moe_runtime
        assert rt.kernels
        g = torch.Generator().manual_seed(4)
        x = torch.randn(2, model.config.hidden_size, generator=g).to(torch.bfloat16)
        idx = torch.tensor([[1, 3], [3, 0]])
        w = torch.softmax(torch.randn(2, 2, generator=g), -1).to(torch.bfloat16)
        for layer in rt.layers:
            with torch.no_grad(), rt.requests(1):
                want = layer.module(x, idx, w)
            got = rt.run_experts(layer.index, x, idx, w, [0, 1, 3])
            assert got.shape == x.shape and got.dtype == x.dtype
            assert torch.equal(got, want), layer.index
        assert not torch.equal(rt.run_experts(0, x, torch.tensor([[2, 1], [3, 0]]), w, [0, 1, 2, 3]), rt.run_experts(0, x, idx, w, [0, 1, 3]))
        with pytest.raises(mi.InvalidArgumentError, match="layer_index 7"):
            rt.run_experts(7, x, idx, w, [0, 1, 3])
        with pytest.raises(mi.InvalidArgumentError, match=r"hidden must be \[T, 32\] torch.bfloat16"):
            rt.run_experts(0, x.float(), idx, w, [0, 1, 3])
        with pytest.raises(mi.InvalidArgumentError, match=r"\[T, k\]"):
            rt.run_experts(0, x, idx[:1], w, [0, 1, 3])
    finally:
        model.close()


def test_run_experts_needs_the_kernels(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16)
        with pytest.raises(mi.UnsupportedError, match="reference_kernels"):
            model.moe_runtime.run_experts(0, x, torch.tensor([[0, 1]]), torch.ones(1, 2), [0, 1])
    finally:
        model.close()


def test_set_mapped_turns_mapped_mode_off_and_on_where_offered(mixtral_path):
    model = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16, engine_options=CPU_KERNELS)
    try:
        rt = model.moe_runtime
        assert rt.mapped
        rt.set_mapped(False)
        assert not rt.mapped
        with torch.no_grad():
            model(input_ids=_prompt(n=2))
        assert model.moe_stats()["paths"]["mapped"] == 0
        rt.set_mapped(True)
        with torch.no_grad():
            model(input_ids=_prompt(n=2))
        assert model.moe_stats()["paths"]["mapped"] == len(rt.layers)
        with pytest.raises(mi.InvalidArgumentError, match="True or False"):
            rt.set_mapped(1)
        with pytest.raises(AttributeError):
            rt.mapped = False
    finally:
        model.close()
    plain = mi.from_pretrained(mixtral_path, dtype=torch.bfloat16)
    try:
        assert not plain.moe_runtime.mapped
        with pytest.raises(mi.UnsupportedError, match="kernels are off"):
            plain.moe_runtime.set_mapped(True)
        plain.moe_runtime.set_mapped(False)
        assert not plain.moe_runtime.mapped
    finally:
        plain.close()


#: What measurement code may not do to the runtime: reach its private names,
#: replace its methods, write its mode attributes, or call the private
#: native layer.
FORBIDDEN = {
    r"\bmoe_runtime\._": "a private runtime name",
    r"\brt\._": "a private runtime name",
    r"\.run_fused\s*=(?!=)": "monkeypatching run_fused (use set_routing_override / experts_skipped)",
    r"\.run_moduledict\s*=(?!=)": "monkeypatching run_moduledict",
    r"\brt\.mapped\s*=(?!=)": "writing rt.mapped (use set_mapped)",
    r"\bmoe_runtime\.mapped\s*=(?!=)": "writing moe_runtime.mapped (use set_mapped)",
    r"\b_native\b": "the private native layer (moe_infinity.engine_version, Engine)",
}


def test_benchmarks_use_the_runtime_through_public_apis_only():
    files = [ROOT / "python" / "moe_infinity" / "bench.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    assert len(files) > 5
    bad = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for pat, what in FORBIDDEN.items():
                if re.search(pat, line):
                    bad.append(f"{f.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_the_guard_catches_what_it_forbids():
    lines = ["rt.run_fused = self", "x = model.moe_runtime._run_kernel(1)", "rt.mapped = False", "rt._meet(a)",
             "from moe_infinity import _native", "model.moe_runtime.mapped=True"]
    for line in lines:
        assert any(re.search(p, line) for p in FORBIDDEN), line
    for line in ["rt.set_mapped(False)", "if rt.mapped == want:", "rt.run_experts(0, x, i, w, e)", '"mapped": bool(rt.mapped),']:
        assert not any(re.search(p, line) for p in FORBIDDEN), line
