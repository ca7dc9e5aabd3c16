"""Mapped mode's Python hot path, on the CPU.

On a GPU, mapped mode is the default decode path (the engine's kernels read
each expert from its slot or, when missing, from host memory, and the
routing is traced asynchronously). The CPU backend implements the same
protocol with its reference FFN, so the runtime's mapped hook — buffers,
reused scratch, request ids, bfloat16 routing weights read as they are —
is checked here against the synchronous kernel path on the same model:
identical tokens and logits, the same expert uses traced, and the cache
still admitting and evicting while layers compute."""

from __future__ import annotations

import pytest
import torch

import moe_infinity as mi
import tiny_models as tm
from moe_infinity._compat import cache_kwargs, output_cache

FAMILIES = ["mixtral", "qwen3_moe", "olmoe"]


#: The CPU backend offers its reference FFN and mapped mode to the engine's
#: executor, as the CUDA backend offers its kernels.
CPU_KERNELS = {"reference_kernels": True}


def _mapped_calls(model) -> int:
    """How many layer calls the engine's executor ran mapped so far."""
    return model.moe_stats()["paths"]["mapped"]


def _decode(model, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode by hand (one token per step), returning the tokens and
    every step's logits."""
    ids, logits = prompt, []
    with torch.no_grad(), model.moe_runtime.requests(prompt.shape[0]):
        out = model(input_ids=prompt, use_cache=True)
        pkv = output_cache(out)
        for _ in range(new):
            nxt = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1].float())
            ids = torch.cat([ids, nxt], dim=1)
            out = model(input_ids=nxt, **cache_kwargs(model, pkv), use_cache=True)
            pkv = output_cache(out)
    return ids, torch.stack(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_mapped_layers_match_the_synchronous_kernel_path(family, tmp_path):
    path = tm.save(tm.build(family, seed=5, dtype=torch.bfloat16), tmp_path / family)
    E = tm.num_experts(family)
    # Half the experts fit (at least one layer's, so that the synchronous
    # path never falls back to transformers' code): misses are read in
    # place, admissions and evictions run while the next layers compute.
    probe = mi.from_pretrained(path, dtype=torch.bfloat16)
    slot = probe.moe_stats()["plan"]["slot_bytes"]
    probe.close()
    # LRU admits every miss, so slots change hands while layers compute.
    model = mi.from_pretrained(path, dtype=torch.bfloat16, device_memory=max(E, E * tm.moe_layers(family) // 2) * slot,
                               cache_policy="lru", engine_options=CPU_KERNELS)
    try:
        rt = model.moe_runtime
        assert rt.kernels and rt.mapped
        prompt = torch.randint(3, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))

        rt.set_mapped(False)
        model.reset_moe_stats()
        want_ids, want_logits = _decode(model, prompt, 12)
        sync = model.moe_stats()

        assert sync["paths"]["mapped"] == 0
        rt.set_mapped(True)
        model.moe_tune(flush=True, reset_stats=True)
        got_ids, got_logits = _decode(model, prompt, 12)
        mapped = model.moe_stats()

        assert mapped["paths"]["mapped"] >= 13 * tm.moe_layers(family), "prefill and every decode step ran mapped"
        assert torch.equal(got_ids, want_ids)
        assert torch.equal(got_logits, want_logits), "the same reference FFN, whether experts come from slots or host memory"
        assert mapped["hits"] + mapped["misses"] == sync["hits"] + sync["misses"], "every expert use traced once"
        assert mapped["misses"] > 0 and mapped["evictions"] > 0, "the cache churned"
        assert mapped["eamc_size"] == sync["eamc_size"] + 2, "both requests of each run were traced into the EAMC"
        assert mapped["phase_ns"]["trace_async"] > 0
    finally:
        model.close()


def test_mapped_errors_reach_the_caller(tmp_path):
    """A routing id out of range is reported with the engine's message and
    the model keeps working. On the CPU the routing is in host memory, so
    the executor rejects it at once; on a GPU, where mapped layers read
    the routing only on the device, the computation skips the pair and the
    tracer reports it by a later call, at the latest when the request
    ends (tests/test_gpu.py)."""
    path = tm.save(tm.build("mixtral", seed=2, dtype=torch.bfloat16), tmp_path / "m")
    model = mi.from_pretrained(path, dtype=torch.bfloat16, engine_options=CPU_KERNELS)
    try:
        rt = model.moe_runtime
        layer = rt.layers[0]
        x = torch.randn(1, model.config.hidden_size).to(torch.bfloat16)
        bad = torch.tensor([[0, rt.num_experts + 3]])
        w = torch.full((1, 2), 0.5, dtype=torch.bfloat16)
        ok = torch.tensor([[0, 1]])
        with pytest.raises(mi.InvalidArgumentError, match=f"routes to expert {rt.num_experts + 3}, out of range"), rt.requests(1):
            rt.run_fused(layer, x, bad, w, None)
        with pytest.raises(mi.InvalidArgumentError), rt.requests(3):
            rt.run_fused(layer, x, bad, w, None)
        assert model.moe_stats()["active_requests"] == 0, "every request of the batch was ended"
        with rt.requests(1):
            good = rt.run_fused(layer, x, ok, w, None)
        assert model.moe_stats()["paths"]["mapped"] == 1, "the good routing ran mapped"
        assert good.shape == x.shape and torch.isfinite(good.float()).all()
    finally:
        model.close()


def test_mapped_generation_modes_match_the_synchronous_kernel_path(tmp_path):
    """generate() with left-padded batches, beam search and seeded
    sampling gives the same sequences through mapped layers as through
    the synchronous kernel path."""
    path = tm.save(tm.build("qwen3_moe", seed=8, dtype=torch.bfloat16), tmp_path / "q")
    model = mi.from_pretrained(path, dtype=torch.bfloat16, engine_options=CPU_KERNELS)
    try:
        rt = model.moe_runtime
        ids = torch.randint(3, tm.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding
        modes = {
            "greedy batch": dict(do_sample=False),
            "beams": dict(do_sample=False, num_beams=2),
            "sampling": dict(do_sample=True, top_k=20),
        }
        for name, kw in modes.items():
            outs = []
            for mapped in (False, True):
                rt.set_mapped(mapped)
                before = _mapped_calls(model)
                torch.manual_seed(11)
                outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, **kw))
                calls = _mapped_calls(model) - before
                assert (calls >= 9 * tm.moe_layers("qwen3_moe")) == mapped, f"{name}: {calls} mapped calls"
            assert torch.equal(outs[0], outs[1]), name
    finally:
        model.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_a_prefill_loaded_are_read_from_their_slots(family, tmp_path):
    """A long prompt runs through the synchronous path (more tokens than the
    kernels take), which loads its experts into the cache before any mapped
    layer ran. Decode steps in mapped mode must find them resident: with
    every expert fitting, a second pass over the same prompt misses
    nothing. (Mapped mode used to start with the first mapped layer, its
    tables pointing at host memory, so the experts the prefill had loaded
    were counted — and, on a GPU, read over the link — as misses for as
    long as they stayed cached.)"""
    path = tm.save(tm.build(family, seed=4, dtype=torch.bfloat16), tmp_path / family)
    model = mi.from_pretrained(path, dtype=torch.bfloat16, device_memory="1GiB", engine_options=CPU_KERNELS)
    try:
        rt = model.moe_runtime
        rt.set_mapped(True)
        prompt = torch.randint(3, tm.VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
        first, _ = _decode(model, prompt, 6)
        assert _mapped_calls(model) == 6 * tm.moe_layers(family), "the prefill ran synchronously, every decode step mapped"
        model.reset_moe_stats()
        again, _ = _decode(model, prompt, 6)
        st = model.moe_stats()
        assert torch.equal(again, first)
        assert st["hits"] > 0
        assert st["misses"] == 0 and st["loads"] == 0, "everything the first pass used stayed resident"
    finally:
        model.close()


def test_graph_misses_setting_is_validated_resolved_and_tunable(tmp_path):
    """graph_misses picks how CUDA-graph steps get missed experts; "auto"
    resolves by expert size (tiny experts: read in place), a bad value is
    an InvalidArgumentError at load and at tune, and moe_tune switches it
    for the next capture."""
    path = tm.save(tm.build("mixtral", seed=3, dtype=torch.bfloat16), tmp_path / "m")
    with pytest.raises(mi.InvalidArgumentError, match="graph_misses"):
        mi.from_pretrained(path, dtype=torch.bfloat16, engine_options={"graph_misses": "dma"})
    model = mi.from_pretrained(path, dtype=torch.bfloat16)
    try:
        assert model.moe_stats()["graph_misses"] == "read"
        assert model.moe_stats()["plan"]["graph_misses"] == "read"
        model.moe_tune(graph_misses="copy")
        assert model.moe_stats()["graph_misses"] == "copy"
        assert model.moe_stats()["plan"]["graph_misses"] == "copy"
        with pytest.raises(mi.InvalidArgumentError, match="graph_misses"):
            model.moe_tune(graph_misses="both")
        model.moe_tune(graph_misses="auto")
        assert model.moe_stats()["plan"]["graph_misses"] == "read"
    finally:
        model.close()
