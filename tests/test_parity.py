"""Token parity with Hugging Face transformers on CPU (float32), for every
supported family and both on-disk layouts, at three cache budgets, with
prefetch on and off, under each eviction policy."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tiny_models as tm

NEW_TOKENS = 32

CASES = [(f, "per_expert") for f in tm.CONFIGS] + [(f, "fused") for f in sorted(tm.FUSED_IN_MEMORY) if f != "gpt_oss"]


@dataclass
class Ref:
    path: Path
    family: str
    prompt: torch.Tensor
    tokens: torch.Tensor
    logits: torch.Tensor
    slot_bytes: int
    total_experts: int
    layout: str = "per_expert"
    # Plain transformers' logits with every expert weight moved to freshly
    # allocated (64-byte-aligned) memory, as the cache slots are (NOT_BITWISE).
    logits_aligned: torch.Tensor | None = None
    # Plain transformers' expert parameters whose data is not 16-byte aligned.
    unaligned: tuple[str, ...] = ()


def _gen_kwargs(family: str, prompt: torch.Tensor) -> dict:
    return dict(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def _forward(model, family: str, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if family in tm.SEQ2SEQ:
            return model(input_ids=prompt, decoder_input_ids=prompt[:, :4]).logits
        return model(input_ids=prompt).logits


@pytest.fixture(scope="session", params=CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def ref(request, tmp_path_factory) -> Ref:
    family, layout = request.param
    model = tm.build(family)
    path = tm.save(model, tmp_path_factory.mktemp(f"{family}-{layout}"), fused=(layout == "fused"))
    names = tm.expert_names(path)
    if layout == "fused" or family == "gpt_oss":
        assert not any(".experts.0." in n or ".experts.expert_0." in n for n in names), names[:4]
    else:
        assert any(".experts.0." in n or ".experts.expert_0." in n for n in names), names[:4]
    plain = tm.plain(path)
    prompt = tm.to_device(torch.randint(3, tm.VOCAB, (1, 7), generator=torch.Generator().manual_seed(1)))
    tokens = plain.generate(**_gen_kwargs(family, prompt))
    logits = _forward(plain, family, prompt)
    experts = [(n, p) for n, p in plain.named_parameters() if ".experts." in n]
    unaligned = tuple(n for n, p in experts if p.data_ptr() % 16)
    with torch.no_grad():
        for _, p in experts:
            p.data = p.data.clone()
    logits_aligned = _forward(plain, family, prompt)
    del plain
    probe = tm.load(path)
    slot_bytes = probe.moe_stats()["plan"]["slot_bytes"]
    probe.close()
    return Ref(path, family, prompt, tokens, logits, slot_bytes, tm.num_experts(family) * tm.moe_layers(family), layout, logits_aligned, unaligned)


BUDGETS = ["one_slot", "half", "all"]


def _slots(r: Ref, which: str) -> int:
    return {"one_slot": 1, "half": max(1, r.total_experts // 2), "all": r.total_experts}[which]


#: Family/layout pairs whose offloaded logits are not bit-identical to plain
#: transformers on the CPU (they agree to 1e-5; greedy tokens are identical),
#: also with every expert resident. Every other pair must stay bitwise there
#: (on a GPU, run by scripts/gpu_check.sh, the bound is 1e-5).
#:
#: The difference is in plain transformers' memory, not in our computation:
#:
#: * transformers keeps a checkpoint tensor that needs no conversion as a
#:   zero-copy view of the memory-mapped safetensors file (ModuleDict experts
#:   in either layout; fused 3D expert tensors in the fused layout; the
#:   per-expert tensors of fused families are stacked into fresh memory).
#:   safetensors aligns tensor data to 8 bytes only, so such a weight can
#:   start at an address that is 8 mod 16.
#: * MKL's SGEMM, torch's float32 matmul on the CPU, rounds a one-row product
#:   x·Wᵀ (an expert computing a single token, in transformers' eager loop or
#:   in one group of grouped_mm) differently depending on W's address mod 16
#:   (MKL's conditional numerical reproducibility is off by default; with
#:   MKL_CBWR=COMPATIBLE the product is the same at every address and all
#:   pairs here are bitwise). Products of several rows did not depend on it
#:   in our measurements.
#: * The cache slots' regions are 256-byte aligned (the stacked copies of the
#:   grouped_mm path 64), so an expert that computes one token in a layer and
#:   whose plain weight is 8 mod 16 differs in the last bits. Here: Switch's
#:   per-expert tensors all lie 8 mod 16 and its top-1 routing leaves experts
#:   with one token; the fused Qwen3-MoE tensors lie 8 mod 16 and 3 of its 12
#:   (layer, expert) pairs get one token of the 7. (Fused Mixtral and
#:   Qwen2-MoE, and GPT-OSS, have unaligned expert weights too, but no expert
#:   with a single token on this prompt.)
#:
#: Matching plain transformers would mean placing every expert in its slot at
#: its file offset mod 16 (and knowing which tensors transformers happens to
#: keep zero-copy), i.e. copying an accident of the file layout into the
#: cache; we do not. The test checks the explanation instead: every pair's
#: logits are bit for bit plain transformers' once its expert weights are in
#: freshly allocated memory, and each pair listed here has unaligned ones.
NOT_BITWISE = {("switch_transformers", "per_expert"), ("qwen3_moe", "fused")}


def test_logits_bitwise_where_stated(ref: Ref):
    model = tm.load(ref.path, ref.total_experts, ref.slot_bytes)
    try:
        logits = _forward(model, ref.family, ref.prompt)
    finally:
        model.close()
    if tm.DEVICE != "cpu":
        torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)
        return
    diff = f"max |diff| {(logits - ref.logits).abs().max().item():.3g}"
    assert torch.equal(logits, ref.logits_aligned), f"not bitwise even with plain's expert weights aligned: max |diff| {(logits - ref.logits_aligned).abs().max().item():.3g}"
    if (ref.family, ref.layout) in NOT_BITWISE:
        assert ref.unaligned, f"{ref.family}/{ref.layout}: plain transformers' expert weights are all 16-byte aligned, so NOT_BITWISE's explanation no longer applies ({diff})"
        torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)
    else:
        assert torch.equal(logits, ref.logits), diff


@pytest.mark.parametrize("budget,prefetch,policy", list(itertools.product(BUDGETS, [True, False], ["priority", "lru", "lfu"])))
def test_greedy_tokens_identical(ref: Ref, budget: str, prefetch: bool, policy: str):
    model = tm.load(ref.path, _slots(ref, budget), ref.slot_bytes, prefetch=prefetch, cache_policy=policy)
    try:
        out = model.generate(**_gen_kwargs(ref.family, ref.prompt))
        assert out.shape[-1] - (0 if ref.family in tm.SEQ2SEQ else ref.prompt.shape[-1]) >= NEW_TOKENS - 1
        assert torch.equal(out, ref.tokens)
        logits = _forward(model, ref.family, ref.prompt)
        torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)
        st = model.moe_stats()
        assert st["plan"]["slots"] == _slots(ref, budget)
        assert st["hits"] + st["misses"] > 0
        assert sum(layer["hits"] + layer["misses"] for layer in st["layers"]) == st["hits"] + st["misses"]
    finally:
        model.close()


def test_hits_plus_misses_equal_expert_uses_and_warm_cache_has_no_misses(ref: Ref):
    model = tm.load(ref.path, _slots(ref, "all"), ref.slot_bytes)
    uses = 0
    eng = model.moe_engine
    original = eng.acquire

    def counting(layer, experts, stream=0):
        nonlocal uses
        xs = list(experts)
        uses += len(set(xs))
        return original(layer, xs, stream)

    eng.acquire = counting
    try:
        model.generate(**_gen_kwargs(ref.family, ref.prompt))
        st = model.moe_stats()
        assert st["hits"] + st["misses"] == uses
        model.reset_moe_stats()
        model.generate(**_gen_kwargs(ref.family, ref.prompt))
        st = model.moe_stats()
        assert st["misses"] == 0, st
        assert st["hits"] > 0
        assert st["bytes_moved"] == 0
    finally:
        model.close()


def test_the_engine_counts_every_routed_pair(ref: Ref):
    """The engine traces each MoE layer's routing as the hooks receive it
    (fused layers: top_k_index; ModuleDict layers: the router's selection,
    tokens dropped by capacity counting for nothing): its per-expert token
    counts are the routed (token, expert) pairs."""
    import torch.nn.functional as F

    model = tm.load(ref.path)
    rt = model.moe_runtime
    E = tm.num_experts(ref.family)
    want = torch.zeros(tm.moe_layers(ref.family), E, dtype=torch.float64)
    fused, moduledict = rt.run_fused, rt.run_moduledict

    def run_fused(layer, hidden, top_k_index, top_k_weights, original):
        want[layer.index] += torch.bincount(top_k_index.reshape(-1).cpu(), minlength=E).double()
        return fused(layer, hidden, top_k_index, top_k_weights, original)

    def run_moduledict(layer, original, hidden, mask, *rest):
        onehot = mask if mask.dim() == 3 and mask.shape[-1] == E else F.one_hot(mask.long(), num_classes=E)
        want[layer.index] += onehot.reshape(-1, E).sum(0).double().cpu()
        return moduledict(layer, original, hidden, mask, *rest)

    rt.run_fused, rt.run_moduledict = run_fused, run_moduledict
    try:
        model.generate(**_gen_kwargs(ref.family, ref.prompt))
        got = torch.tensor([layer["expert_tokens"] for layer in model.moe_stats()["layers"]], dtype=torch.float64)
    finally:
        model.close()
    assert want.sum() > 0
    assert torch.equal(got, want)


def test_switch_dropping_tokens_at_capacity_matches_and_traces_only_routed_pairs(tmp_path):
    """SwitchTransformers with an expert capacity of one token: the router
    drops most tokens (their routing has empty places, MOE_ROUTING_GAP), so
    a layer's tokens have fewer experts than k. Tokens and logits match
    transformers as in the parity tests above, and the engine counts only
    the pairs routed."""
    import torch.nn.functional as F

    from moe_infinity import _native

    family = "switch_transformers"
    path = tm.save(tm.build(family, expert_capacity=1), tmp_path / family)
    prompt = tm.to_device(torch.randint(3, tm.VOCAB, (1, 7), generator=torch.Generator().manual_seed(1)))
    plain = tm.plain(path)
    want_tokens = plain.generate(**_gen_kwargs(family, prompt))
    want_logits = _forward(plain, family, prompt)
    del plain
    model = tm.load(path)
    rt, E = model.moe_runtime, tm.num_experts(family)
    want = torch.zeros(tm.moe_layers(family), E, dtype=torch.float64)
    gaps = 0
    moduledict, layer_call = rt.run_moduledict, rt.engine.layer

    def run_moduledict(layer, original, hidden, mask, *rest):
        onehot = mask if mask.dim() == 3 and mask.shape[-1] == E else F.one_hot(mask.long(), num_classes=E)
        want[layer.index] += onehot.reshape(-1, E).sum(0).double().cpu()
        return moduledict(layer, original, hidden, mask, *rest)

    def counting_layer(a):
        nonlocal gaps
        gaps += sum(a.topk_host[i] == _native.ROUTING_GAP for i in range(a.tokens * a.k))
        return layer_call(a)

    rt.run_moduledict, rt.engine.layer = run_moduledict, counting_layer
    try:
        tokens = model.generate(**_gen_kwargs(family, prompt))
        got = torch.tensor([layer["expert_tokens"] for layer in model.moe_stats()["layers"]], dtype=torch.float64)
        routed = want.clone()  # the generation's pairs
        logits = _forward(model, family, prompt)
    finally:
        model.close()
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert routed.sum() > 0
    assert torch.equal(got, routed)
    if gaps == 0:
        import transformers

        # transformers 5.0's SwitchTransformers router keeps every token at
        # expert_capacity=1 (later releases drop them); the newest-release job
        # runs this test, and the Go tests cover the gap path on any release.
        pytest.skip(f"transformers {transformers.__version__}'s SwitchTransformers drops no token at expert_capacity=1")
