"""The CUDA backend on a GPU: the build, GPU memory accounting, the bf16
kernel path against transformers on the GPU, and teardown. The f32 parity
suites (test_parity.py, test_generation_modes.py) run on the GPU too when
MOE_INFINITY_TEST_DEVICE=cuda (scripts/gpu_check.sh sets it).

Skipped, with the reason, on machines without a usable GPU.
"""

from __future__ import annotations

import gc

import pytest
import torch

import moe_infinity as mi
import tiny_models as tm
from moe_infinity import _native
from moe_infinity._compat import cache_kwargs, output_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _native.cuda_usable(),
        reason="needs a CUDA GPU (runs on the H100 machine through scripts/gpu_check.sh)",
    ),
]

KERNEL_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
BIG = dict(hidden_size=256)


def _big(family: str) -> dict:
    over = dict(BIG)
    if family == "mixtral":
        over["intermediate_size"] = 512
    elif family in ("qwen2_moe", "qwen3_moe", "deepseek_v3"):
        over["moe_intermediate_size"] = 384
    elif family == "olmoe":
        over["intermediate_size"] = 384
    if family == "deepseek_v3":
        over.update(kv_lora_rank=64, q_lora_rank=64)
    return over


def test_cuda_build_is_loaded():
    assert _native.variant() == "cuda", _native.library_path()
    assert mi.engine_version().endswith("(cuda)")
    total, free = _native.device_memory(torch.cuda.current_device())
    assert abs(total - torch.cuda.get_device_properties(0).total_memory) < 2 << 30
    assert 0 < free <= total


def _used() -> int:
    total, free = _native.device_memory(torch.cuda.current_device())
    return total - free


def test_budget_is_respected_by_from_pretrained(tmp_path):
    path = tm.save(tm.build("mixtral", dtype=torch.bfloat16, num_local_experts=16, **_big("mixtral")), tmp_path / "m")
    budget = 300 << 20
    model = mi.from_pretrained(path, device="cuda", device_memory=budget)
    try:
        plan = model.moe_stats()["plan"]
        assert plan["backend"] == "cuda"
        dense = sum(p.numel() * p.element_size() for p in model.parameters())
        assert plan["arena_bytes"] + dense <= budget
        ids = torch.tensor([[5, 9, 11, 40, 7]], device="cuda")
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert torch.cuda.max_memory_allocated() + plan["arena_bytes"] <= budget
    finally:
        model.close()


def test_engine_gpu_memory_returns_to_zero_after_close():
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    E, H, I = 16, 2048, 2048
    gate_up = torch.randn(E, 2 * I, H).to(torch.bfloat16)
    down = torch.randn(E, H, I).to(torch.bfloat16)
    base = _used()
    budget = 400 << 20
    eng = mi.Engine(budget_bytes=budget, backend="cuda", prefetch=False)
    eng.add_host_tensor("model.layers.0.mlp.experts.gate_up_proj", gate_up)
    eng.add_host_tensor("model.layers.0.mlp.experts.down_proj", down)
    plan = eng.configure({"regions": [{"name": "gate_up_proj", "parts": ["gate_up_proj"]}, {"name": "down_proj", "parts": ["down_proj"]}]})
    stream = torch.cuda.current_stream().cuda_stream
    for x in range(E):
        _, lease = eng.acquire(0, [x], stream)
        eng.release(lease, stream)
    torch.cuda.synchronize()
    during = _used()
    arena = plan["arena_bytes"]
    assert arena <= budget
    assert during - base >= arena
    assert during - base <= budget + (32 << 20), "the engine allocates no more than its budget (plus kernel images and tables)"
    eng.close()
    after = _used()
    print(f"GPU memory used: before {base >> 20} MiB, engine open {during >> 20} MiB (arena {arena >> 20} MiB), after close {after >> 20} MiB")
    assert after - base <= 4 << 20, "engine-held GPU memory returns to zero"


def test_too_small_device_memory_names_the_dense_weights(tmp_path):
    path = tm.save(tm.build("qwen3_moe", dtype=torch.bfloat16), tmp_path / "q")
    with pytest.raises(mi.BudgetError, match=r"must hold the dense weights .* raise device_memory to at least \d+ bytes"):
        mi.from_pretrained(path, device="cuda", device_memory=1 << 20)


def _teacher_forced(model, seq: torch.Tensor, prefix: int = 8) -> torch.Tensor:
    """Logits of every position of every row, decoding one token at a time
    after the prefix."""
    got = []
    with torch.no_grad():
        out = model(input_ids=seq[:, :prefix], use_cache=True)
        got.append(out.logits.float())
        pkv = output_cache(out)
        for i in range(prefix, seq.shape[1]):
            out = model(input_ids=seq[:, i : i + 1], **cache_kwargs(model, pkv), use_cache=True)
            pkv = output_cache(out)
            got.append(out.logits.float())
    return torch.cat(got, dim=1).reshape(-1, tm.VOCAB)


def _agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    rel = ((got - want).norm() / want.norm()).item()
    return agree, rel


@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_bf16_kernel_teacher_forced_agreement(family, tmp_path):
    model = tm.train_briefly(tm.build(family, seed=21, **_big(family))).to(torch.bfloat16)
    path = tm.save(model, tmp_path / family)
    plain = tm.auto_class(family).from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    # A prompt the model knows (its training rule) and one it does not.
    known, v = [], 11
    for _ in range(8):
        known.append(v + 3)
        v = (5 * v + 3) % (tm.VOCAB - 3)
    known = torch.tensor([known])
    unknown = torch.randint(3, tm.VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    prompt = torch.cat([known, unknown]).cuda()
    seq = plain.generate(input_ids=prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    want = _teacher_forced(plain, seq)
    del plain
    # The noise floor: transformers' own eager experts against its default
    # (grouped_mm) on the same GPU, same dtype.
    eager = tm.auto_class(family).from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", experts_implementation="eager").eval()
    floor = _agreement(_teacher_forced(eager, seq), want)
    del eager
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16)
    try:
        assert ours.moe_runtime.kernels and ours.moe_runtime.mapped
        got = _teacher_forced(ours, seq)
        paths = ours.moe_stats()["paths"]
        calls = paths["mapped"] + paths["kernels"]
        assert calls >= tm.moe_layers(family) * 64, f"decode steps ran the engine's kernels: {paths}"
        agree, rel = _agreement(got, want)
        print(
            f"{family}: kernel vs transformers: top-1 agreement {agree:.4f}, logits relative error {rel:.2e} "
            f"(transformers eager vs grouped_mm: {floor[0]:.4f}, {floor[1]:.2e}); kernel calls {calls}"
        )
        assert agree >= 0.99
        assert rel <= 1e-2
    finally:
        ours.close()


def test_kernel_and_torch_paths_agree_on_gpu(tmp_path):
    path = tm.save(tm.build("mixtral", seed=4, dtype=torch.bfloat16, **_big("mixtral")), tmp_path / "m")
    ids = torch.randint(3, tm.VOCAB, (1, 6), generator=torch.Generator().manual_seed(3)).cuda()
    outs = {}
    for kernels in (True, False):
        m = mi.from_pretrained(path, device="cuda", device_memory="1GiB", kernels=kernels)
        outs[kernels] = m.generate(input_ids=ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        m.close()
    assert (outs[True] == outs[False]).float().mean().item() >= 0.9


def test_a_cuda_load_measures_the_kernel_crossover(tmp_path):
    """At load the runtime times one layer with the kernels and with
    transformers' code (probe_kernel_crossover) and the engine decides with
    the crossover it measured; the probe's calls leave no trace in the
    counters."""
    path = tm.save(tm.build("mixtral", seed=4, dtype=torch.bfloat16, **_big("mixtral")), tmp_path / "m")
    m = mi.from_pretrained(path, device="cuda", device_memory="1GiB")
    try:
        p = m.moe_runtime.plan["kernel_probe"]
        ex = m.moe_stats()["plan"]["executor"]
        assert (ex["kernel_crossover"], ex["kernel_max_tokens"]) == ("measured", p["kernel_max_tokens"])
        assert p["paths"] == {"kernels": 16, "host-stream": 16}, "four counts, a warm-up and three timed calls each, on each side"
        assert min(p["kernel_s"] + p["torch_s"]) > 0
        st = m.moe_stats()
        assert st["hits"] == st["misses"] == 0
        print(f"kernel crossover: {p}")
    finally:
        m.close()


def test_streaming_through_one_slot_on_gpu(tmp_path):
    path = tm.save(tm.build("qwen3_moe", seed=5, dtype=torch.bfloat16, **_big("qwen3_moe")), tmp_path / "q")
    plain = tm.auto_class("qwen3_moe").from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.randint(3, tm.VOCAB, (1, 24), generator=torch.Generator().manual_seed(8)).cuda()
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    m = mi.from_pretrained(path, device="cuda", device_memory="1GiB", kernels=False, engine_options={"max_slots": 1})
    try:
        with torch.no_grad():
            got = m(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert m.moe_stats()["plan"]["slots"] == 1
    finally:
        m.close()


def test_a_slot_is_not_overwritten_while_a_kernel_still_reads_it(tmp_path):
    """The copy of a new expert into a slot waits for the work that read the
    old one (recorded by release on the compute stream), also when mapped
    mode updates the slot's table entry first: a 0.1 s sleep on the compute
    stream before a read of the slot leaves the next copy plenty of time to
    overwrite it if it did not wait. (Mapped mode's table update used to
    re-record the slot's free event on the copy stream, dropping that
    dependency, whenever no mapped layer had run yet.)"""
    path = tm.save(tm.build("qwen3_moe", seed=6, dtype=torch.bfloat16, **_big("qwen3_moe")), tmp_path / "q")
    m = mi.from_pretrained(path, device="cuda", device_memory="1GiB", engine_options={"max_slots": 1})
    try:
        rt, eng = m.moe_runtime, m.moe_runtime.engine
        # A stream of its own: the legacy default stream would order the
        # engine's copies after the sleep implicitly and hide the race.
        side = torch.cuda.Stream()
        s = side.cuda_stream
        region = next(iter(rt.views[0]))
        want = []
        with torch.cuda.stream(side):
            for e in (0, 1):
                slots, lease = eng.acquire(0, [e], s)
                want.append(rt.views[slots[0]][region].clone())
                eng.release(lease, s)
                side.synchronize()
            assert not torch.equal(want[0], want[1])
            for _ in range(3):
                slots, lease = eng.acquire(0, [0], s)
                torch.cuda._sleep(200_000_000)
                seen = rt.views[slots[0]][region].clone()  # runs after the sleep
                eng.release(lease, s)
                _, lease = eng.acquire(0, [1], s)  # evicts expert 0 from the only slot
                eng.release(lease, s)
                torch.cuda.synchronize()
                assert torch.equal(seen, want[0]), "expert 1 was copied over expert 0 before the read"
    finally:
        m.close()


def _eager_static_tokens(ours, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy tokens of the same decode step run eagerly on a StaticCache
    (the graph decoder's reference)."""
    from transformers import StaticCache

    cache = StaticCache(config=ours.config, max_cache_len=prompt.shape[1] + new + 2)
    toks = [prompt]
    with torch.no_grad(), ours.moe_runtime.requests(1):
        P = prompt.shape[1]
        out = ours(input_ids=prompt, **cache_kwargs(ours, cache), cache_position=torch.arange(P, device="cuda"), use_cache=True)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        toks.append(nxt)
        for i in range(new - 1):
            out = ours(input_ids=nxt, **cache_kwargs(ours, cache), cache_position=torch.tensor([P + i], device="cuda"), use_cache=True)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            toks.append(nxt)
    return torch.cat(toks, dim=1)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_graph_decoder_replays_exactly_and_keeps_tracing(family, tmp_path):
    """A decode step captured in a CUDA graph (mapped MoE layers) gives the
    same tokens as running the same step eagerly on the same StaticCache,
    and the engine traces every replayed layer."""
    from moe_infinity.graphs import GraphDecoder

    model = tm.train_briefly(tm.build(family, seed=31, **_big(family))).to(torch.bfloat16)
    path = tm.save(model, tmp_path / family)
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16)
    try:
        prompt = torch.randint(3, tm.VOCAB, (1, 12), generator=torch.Generator().manual_seed(4)).cuda()
        new = 20
        want = _eager_static_tokens(ours, prompt, new)
        dec = GraphDecoder(ours, max_len=prompt.shape[1] + new + 2)
        ours.reset_moe_stats()
        got = dec.generate(prompt, max_new_tokens=new)
        assert dec.layers_captured == tm.moe_layers(family)
        assert torch.equal(got, want), f"graph {got.tolist()} vs eager {want.tolist()}"
        st = ours.moe_stats()
        k = ours.config.num_experts_per_tok
        # Prefill, two warm-up steps, then replays: each replay traces every
        # layer's k experts (distinct per token).
        assert st["hits"] + st["misses"] >= (new - 1) * tm.moe_layers(family) * k
        again = dec.generate(prompt, max_new_tokens=new)
        assert torch.equal(again, want), "the graph is reused across calls"
        piped = dec.generate(prompt, max_new_tokens=new, pipeline=True)
        assert torch.equal(piped, want), "replays queued ahead of the token readback give the same tokens"
        assert len(dec.step_s) == new - 1 and all(t > 0 for t in dec.step_s)
        # Host timings per replay: the graph launch and the engine call are parts of the submit.
        assert len(dec.host_s) == len(dec.launch_s) == len(dec.engine_s) == new - 1
        assert all(0 < l + e <= h for h, l, e in zip(dec.host_s, dec.launch_s, dec.engine_s))
        # An end-of-sequence id stops decoding at its first occurrence, stepwise and pipelined.
        P = prompt.shape[1]
        eos = int(want[0, P + 3])
        first = P + [int(t) for t in want[0, P:]].index(eos)
        for pipeline in (False, True):
            ended = dec.generate(prompt, max_new_tokens=new, pipeline=pipeline, eos_token_id=[eos])
            assert torch.equal(ended, want[:, : first + 1]), (pipeline, ended.tolist(), want.tolist())
    finally:
        ours.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_mapped_reads_of_checkpoint_experts_match_their_slots(family, tmp_path):
    """Every expert of a saved checkpoint, read in place from host memory by
    a mapped layer (cold cache), gives exactly the output of the same
    expert copied into a slot."""
    model = tm.build(family, seed=41, dtype=torch.bfloat16, **_big(family))
    path = tm.save(model, tmp_path / family)
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16)
    try:
        rt = ours.moe_runtime
        assert rt.mapped
        _assert_mapped_reads_equal_slot_reads(ours, torch.bfloat16)
    finally:
        ours.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_graph_decoder_in_copy_mode_matches_eager_while_every_layer_evicts(family, tmp_path):
    """graph_misses="copy": each replayed layer waits inside the graph while
    the engine copies its misses into slots. With one layer's worth of
    slots every layer evicts another's experts, so the tables, the slots
    and the waits must agree exactly for the tokens to match eager ones."""
    from moe_infinity.graphs import GraphDecoder

    model = tm.train_briefly(tm.build(family, seed=33, **_big(family))).to(torch.bfloat16)
    E = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    path = tm.save(model, tmp_path / family)
    opts = {"graph_misses": "copy", "max_slots": E}
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16, engine_options=opts)
    try:
        prompt = torch.randint(3, tm.VOCAB, (1, 12), generator=torch.Generator().manual_seed(5)).cuda()
        new = 16
        want = _eager_static_tokens(ours, prompt, new)
        dec = GraphDecoder(ours, max_len=prompt.shape[1] + new + 2)
        got = dec.generate(prompt, max_new_tokens=new)
        assert torch.equal(got, want), f"copy-mode graph {got.tolist()} vs eager {want.tolist()}"
        for pipeline in (False, True):
            got = dec.generate(prompt, max_new_tokens=new, pipeline=pipeline, on_prefill=ours.reset_moe_stats)
            assert torch.equal(got, want), (pipeline, got.tolist(), want.tolist())
            st = ours.moe_stats()
            assert st["graph_misses"] == "copy"
            assert st["copy_late"] == 0, "no layer gave up waiting for its copies"
            assert st["loads"] > 0 and st["evictions"] > 0
            assert st["hits"] + st["misses"] >= (new - 1) * tm.moe_layers(family) * ours.config.num_experts_per_tok
            assert st["phase_ns"]["serve"] > 0
        # Switching back to in-place reads takes a new capture.
        ours.moe_tune(graph_misses="read")
        dec = GraphDecoder(ours, max_len=prompt.shape[1] + new + 2)
        assert torch.equal(dec.generate(prompt, max_new_tokens=new, pipeline=True), want)
        assert ours.moe_stats()["graph_misses"] == "read"
    finally:
        ours.close()


def _trained_fp8(family: str, directory):
    """A briefly trained tiny model saved as its FP8 release ships (block-scaled
    experts and projections, test_quantized's builders' layout)."""
    import test_quantized as tq

    model = tm.train_briefly(tm.build(family, seed=21, **_big(family))).to(torch.bfloat16)
    sd = tq._saved_state(model, directory)
    qc = tq.QWEN3_FP8_QC if family == "qwen3_moe" else tq.DEEPSEEK_V3_QC
    quantize = (lambda k: k.endswith("proj.weight")) if family == "qwen3_moe" else (lambda k: "proj" in k and not k.endswith(("embed_tokens.weight", "head.weight")))
    return tq._write(directory, tq._fp8_all(sd, quantize), qc)


def _views_of(model, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The dequantized view of one expert, copied to the CPU."""
    rt = model.moe_runtime
    slots, lease = rt.engine.acquire(layer, [expert], rt.stream())
    try:
        got = {k: v.cpu().clone() for k, v in rt.views[slots[0]].items()}
    finally:
        rt.engine.release(lease, rt.stream())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return got


@pytest.mark.parametrize("name", ["qwen3_moe-fp8", "deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_quantized_experts_on_the_gpu_are_dequantized_there_as_on_the_cpu(name, tmp_path):
    """Quantized checkpoints as they ship, on the GPU with the kernels off
    (quantized_kernels false; gpt-oss's default, FP8's is the kernels):
    the slots hold the compressed bytes, the backend's view kernels
    dequantize them in device memory, and transformers' own expert code
    runs on the views. Every expert's device view equals, bit for bit, the
    CPU backend's (the Go dequantizer, itself bit for bit transformers'
    dequantizing load); logits agree with transformers' dequantizing load
    on the GPU."""
    import test_quantized as tq
    from transformers import AutoModelForCausalLM

    path = tq.BUILDERS[name](tmp_path / "m")
    gpu = mi.from_pretrained(path, device="cuda", device_memory="1GiB", engine_options={"quantized_kernels": False})
    cpu = mi.from_pretrained(path, device="cpu", device_memory="1GiB")
    try:
        plan = gpu.moe_runtime.plan
        assert plan["views"]["dequant"] == name.split("-")[1] and not plan["executor"]["kernels"], plan["executor"]
        n_layers, n_experts = len(plan["layers"]), int(plan["num_experts"])
        for layer in range(n_layers):
            for x in range(n_experts):
                g, c = _views_of(gpu, layer, x), _views_of(cpu, layer, x)
                for region in c:
                    assert torch.equal(g[region].view(torch.uint8), c[region].view(torch.uint8)), (layer, x, region)
        prompt = torch.randint(3, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = gpu(input_ids=prompt.cuda()).logits.float().cpu()
        ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=tq.DEQUANTIZE[name](dequantize=True), device_map="cuda").eval()
        with torch.no_grad():
            want = ref(input_ids=prompt.cuda()).logits.float().cpu()
        rel = ((got - want).norm() / want.norm()).item()
        print(f"{name}: views on the GPU equal the CPU's; logits vs transformers' dequantizing load on the GPU: rel {rel:.2e}")
        assert rel <= 1e-2
        assert gpu.moe_stats()["misses"] > 0
    finally:
        gpu.close()
        cpu.close()


def test_link_rates_are_measured_at_start_up_and_decide_graph_misses(tmp_path):
    """Without link_rates the engine measures this machine's link when it
    loads (DMA and zero-copy bandwidth, copy mode's reaction) and chooses
    graph_misses "auto" from those figures (engine.ChooseGraphMisses: copy
    when reaction + bytes/DMA < bytes/zero-copy); given rates win and are
    not measured."""
    path = tm.save(tm.build("mixtral", dtype=torch.bfloat16, **_big("mixtral")), tmp_path / "m")
    model = mi.from_pretrained(path, device="cuda", device_memory="1GiB", engine_options={"measure_link": True})
    try:
        plan = model.moe_stats()["plan"]
    finally:
        model.close()
    rates, b = plan["link_rates"], plan["slot_bytes"]
    print(f"link rates measured: {rates}, expert {b} bytes, graph_misses {plan['graph_misses']}")
    assert plan["link_rates_source"] == "measured", plan
    assert rates["dma_gbps"] > 0 and rates["zero_copy_gbps"] > 0 and rates["reaction_us"] > 0, rates
    copy = rates["reaction_us"] * 1e-6 + b / (rates["dma_gbps"] * 1e9) < b / (rates["zero_copy_gbps"] * 1e9)
    assert plan["graph_misses"] == ("copy" if copy else "read")

    given = {"dma_gbps": 50.0, "zero_copy_gbps": 0.001, "reaction_us": 0.0}
    model = mi.from_pretrained(path, device="cuda", device_memory="1GiB", engine_options={"link_rates": given})
    try:
        plan = model.moe_stats()["plan"]
        assert plan["link_rates_source"] == "given"
        assert plan["link_rates"] == given
        assert plan["graph_misses"] == "copy", "reading at 1 MB/s loses to any copy"
    finally:
        model.close()
    model = mi.from_pretrained(path, device="cuda", device_memory="1GiB")  # measure_link off by default (until validated)
    try:
        plan = model.moe_stats()["plan"]
        assert plan["link_rates_source"] == "none" and plan["link_rates"] is None
        assert plan["graph_misses"] == ("copy" if b >= 32 << 20 else "read"), "by expert size"
    finally:
        model.close()


def test_hybrid_cpu_hand_off_on_the_gpu_matches_the_gpu_alone(tmp_path):
    """cpu_experts on CUDA (the eager hand-off, engine.layerHybrid): on the
    synchronous kernel path (mapped mode off), the CPU computes the cold
    misses the cost model sends it from the host tier while the others are
    copied, and the kernels add its float32 partial output to their sum.
    The link rates are given, slow (1 GB/s), so that the CPU takes misses
    whatever this machine's CPU measures. Logits and greedy tokens match
    cpu_experts "off" within bfloat16 rounding (the CPU's pairs are summed
    apart from the device's and added before the one rounding)."""
    path = tm.save(tm.build("mixtral", seed=6, dtype=torch.bfloat16, num_local_experts=16, **_big("mixtral")), tmp_path / "m")
    ids = torch.randint(3, tm.VOCAB, (1, 8), generator=torch.Generator().manual_seed(12)).cuda()
    slow = {"dma_gbps": 1.0, "zero_copy_gbps": 1.0, "reaction_us": 0.0}
    logits, tokens, stats = {}, {}, {}
    for cpu in ("off", 4):
        m = mi.from_pretrained(path, device="cuda", device_memory="1GiB", prefetch=False,
                               engine_options={"cpu_experts": cpu, "link_rates": slow})
        try:
            m.moe_runtime.set_mapped(False)
            with torch.no_grad():
                logits[cpu] = m(input_ids=ids).logits.float()
            tokens[cpu] = m.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            stats[cpu] = m.moe_stats()
        finally:
            m.close()
    off, on = stats["off"]["plan"]["executor"], stats[4]["plan"]["executor"]
    assert not off["hybrid"] and off["hybrid_off"] == "cpu_experts is off"
    assert on["hybrid"], on.get("hybrid_off")
    assert on["hybrid_costs"]["hand_off_fixed_us"] == 0.0, "2 × the given reaction"
    print(f"hybrid on the GPU: cost model {on['hybrid_costs']}, experts computed on the CPU {stats[4]['cpu_computed']} "
          f"of {stats[4]['misses']} misses, CPU time {stats[4]['cpu_seconds']:.4f} s")
    assert stats[4]["cpu_computed"] > 0, "the CPU computed some experts"
    assert stats["off"]["cpu_computed"] == 0
    rel = ((logits[4] - logits["off"]).norm() / logits["off"].norm()).item()
    assert rel <= 1e-2, f"logits relative error {rel:.2e}"
    assert (tokens[4] == tokens["off"]).float().mean().item() >= 0.9


@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_hybrid_teacher_forced_agreement(family, tmp_path):
    """Hybrid decode on every family the kernels serve: trained tiny
    models (confident top-1, as real ones), the eager hand-off (mapped
    off) with the link given slow so that the CPU computes the cold
    misses, against transformers on the GPU: teacher-forced top-1
    agreement >= 99% and logits within 1e-2, as the kernel path alone."""
    model = tm.train_briefly(tm.build(family, seed=21, **_big(family))).to(torch.bfloat16)
    path = tm.save(model, tmp_path / family)
    plain = tm.auto_class(family).from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    prompt = torch.randint(3, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(5)).cuda()
    seq = plain.generate(input_ids=prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    want = _teacher_forced(plain, seq)
    del plain
    slow = {"dma_gbps": 1.0, "zero_copy_gbps": 1.0, "reaction_us": 0.0}
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16, prefetch=False,
                              engine_options={"cpu_experts": 4, "link_rates": slow})
    try:
        ours.moe_runtime.set_mapped(False)
        ex = ours.moe_runtime.plan["executor"]
        assert ex["hybrid"], ex.get("hybrid_off")
        got = _teacher_forced(ours, seq)
        st = ours.moe_stats()
    finally:
        ours.close()
    agree, rel = _agreement(got, want)
    print(f"{family}: hybrid vs transformers: top-1 agreement {agree:.4f}, logits relative error {rel:.2e}; "
          f"experts computed on the CPU {st['cpu_computed']} of {st['misses']} misses")
    assert st["cpu_computed"] > 0, "the CPU computed some experts"
    assert agree >= 0.99
    assert rel <= 1e-2


def test_prefill_hybrid_on_the_gpu_matches_the_gpu_alone(tmp_path):
    """cpu_experts on CUDA during prefill (engine hostPartial): a 64-token
    prompt takes the host path (transformers' code on slot views); with
    the link given slow the CPU computes the misses of few tokens from the
    host tier, the eager hand-off uploads its float32 partial into the
    hook's buffer, transformers' code skips those experts' pairs and the
    hook adds the partial. Logits match cpu_experts "off" within bfloat16
    rounding."""
    path = tm.save(tm.build("mixtral", seed=6, dtype=torch.bfloat16, num_local_experts=16, **_big("mixtral")), tmp_path / "m")
    ids = torch.randint(3, tm.VOCAB, (1, 64), generator=torch.Generator().manual_seed(13)).cuda()
    slow = {"dma_gbps": 1.0, "zero_copy_gbps": 1.0, "reaction_us": 0.0}
    logits, stats = {}, {}
    for cpu in ("off", 4):
        m = mi.from_pretrained(path, device="cuda", device_memory="1GiB", prefetch=False,
                               engine_options={"cpu_experts": cpu, "link_rates": slow})
        try:
            with torch.no_grad():
                logits[cpu] = m(input_ids=ids).logits.float()
            stats[cpu] = m.moe_stats()
        finally:
            m.close()
    on = stats[4]
    assert on["plan"]["executor"]["hybrid"], on["plan"]["executor"].get("hybrid_off")
    assert on["paths"]["host-stream"] > 0, "prefill took the host path"
    print(f"prefill hybrid on the GPU: experts computed on the CPU {on['cpu_computed']} of {on['misses']} misses, "
          f"CPU time {on['cpu_seconds']:.4f} s")
    assert on["cpu_computed"] > 0, "the CPU computed some experts"
    assert stats["off"]["cpu_computed"] == 0
    rel = ((logits[4] - logits["off"]).norm() / logits["off"].norm()).item()
    assert rel <= 1e-2, f"logits relative error {rel:.2e}"


def test_graph_hand_off_in_copy_mode_matches_graph_decode_without_it(tmp_path):
    """cpu_experts in CUDA-graph replays (the graph hand-off, engine
    graphhandoff.go): each captured layer publishes its activations and
    routing weights to a pinned mailbox, the engine's copy driver has the
    CPU compute the cold misses the cost model sends it and names them on
    the layer's skip list, and the layer's kernels skip them and add the
    CPU's partial when the answer came in time. The link rates are given,
    slow (1 GB/s), so that the CPU takes misses whatever this machine's CPU
    measures. A random model routes every token to the same few experts,
    which a layer's worth of slots would hold after the prefill (no miss
    left for the replays to hand off), so the routing is the decode
    benchmark's generated trace (uniform over the experts, the same in
    both runs): every replayed layer misses. Logits and greedy tokens match
    graph decode with cpu_experts "off" within bfloat16 rounding."""
    from moe_infinity.bench import ForcedRouting, generated_routing
    from moe_infinity.graphs import GraphDecoder

    E, K, L = 16, 2, 2
    path = tm.save(tm.build("mixtral", seed=7, dtype=torch.bfloat16, num_local_experts=E, **_big("mixtral")), tmp_path / "m")
    prompt = torch.randint(3, tm.VOCAB, (1, 12), generator=torch.Generator().manual_seed(13)).cuda()
    slow = {"dma_gbps": 1.0, "zero_copy_gbps": 1.0, "reaction_us": 0.0}
    new = 16
    ids = generated_routing(L, E, K, prompt.shape[1] + new + 2, 0.0, 11)
    logits, tokens, stats = {}, {}, {}
    for cpu in ("off", 4):
        opts = {"cpu_experts": cpu, "link_rates": slow, "graph_misses": "copy", "max_slots": E}
        m = mi.from_pretrained(path, device="cuda", device_memory="1GiB", prefetch=False, engine_options=opts)
        try:
            assert len(m.moe_runtime.layers) == L and m.moe_runtime.num_experts == E
            forced = ForcedRouting(m.moe_runtime, ids, torch.device("cuda"))
            dec = GraphDecoder(m, max_len=prompt.shape[1] + new + 2)
            dec.generate(prompt, max_new_tokens=2)  # prefill and one replay
            logits[cpu] = dec.logits.float().clone()
            forced.reset()
            tokens[cpu] = dec.generate(prompt, max_new_tokens=new, on_prefill=m.reset_moe_stats)
            stats[cpu] = m.moe_stats()
        finally:
            m.close()
    off, on = stats["off"]["plan"]["executor"], stats[4]["plan"]["executor"]
    assert not off["graph_hand_off"] and off["graph_hand_off_off"] == "hybrid execution is off: cpu_experts is off"
    assert on["graph_hand_off"], on.get("graph_hand_off_off")
    st = stats[4]
    print(f"graph hand-off: experts computed on the CPU in replays {st['cpu_computed']} of {st['misses']} misses, "
          f"CPU time {st['cpu_seconds']:.4f} s, late layers {st['copy_late']}")
    assert st["cpu_computed"] > 0, "the CPU computed some experts inside the replays"
    assert stats["off"]["cpu_computed"] == 0
    assert st["copy_late"] == 0, "no layer gave up waiting (else it ignored the CPU's part)"
    rel = ((logits[4] - logits["off"]).norm() / logits["off"].norm()).item()
    assert rel <= 1e-2, f"logits relative error {rel:.2e}"
    assert (tokens[4] == tokens["off"]).float().mean().item() >= 0.9


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_kernel_teacher_forced_agreement(family, tmp_path):
    """The CUDA FP8 kernels (the default for FP8 experts on a GPU: engine
    option quantized_kernels left out) against transformers' dequantizing
    load on the GPU: teacher-forced top-1 agreement >= 99%, as the bf16
    kernels; and against the engine's CPU reference of the same kernels on
    the same checkpoint."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    path = _trained_fp8(family, tmp_path / family)
    plain = AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True), device_map="cuda").eval()
    prompt = torch.randint(3, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(2)).cuda()
    seq = plain.generate(input_ids=prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    want = _teacher_forced(plain, seq)
    del plain
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB")
    try:
        ex = ours.moe_runtime.plan["executor"]
        assert ex["kernels"] and ex["quant"] == "fp8" and ex["mapped"], ex
        got = _teacher_forced(ours, seq)
        paths = ours.moe_stats()["paths"]
        assert paths["mapped"] >= tm.moe_layers(family) * 48, f"every decode step's layers run mapped: {paths}"
    finally:
        ours.close()
    cpu = mi.from_pretrained(path, device="cpu", device_memory="1GiB", engine_options={"reference_kernels": True})
    try:
        ref = _teacher_forced(cpu, seq.cpu())
    finally:
        cpu.close()
    agree, rel = _agreement(got, want)
    ref_agree, ref_rel = _agreement(got.cpu(), ref)
    print(f"{family} FP8: kernel vs transformers dequantized: top-1 {agree:.4f}, rel {rel:.2e}; vs the CPU reference: top-1 {ref_agree:.4f}, rel {ref_rel:.2e}")
    assert agree >= 0.99 and rel <= 1e-2
    assert ref_agree >= 0.99 and ref_rel <= 1e-2


def test_offload_fp8_kernels_agree_with_the_cpu_reference():
    """offload(expert_dtype="fp8") on the GPU (the FP8 kernels reading the
    experts compressed in memory) against the same model offloaded with FP8
    experts on the CPU (the kernels' reference): teacher-forced top-1
    agreement >= 99%, as for FP8 checkpoints; and the cache holds about half
    of bf16's bytes per expert."""
    import copy

    model = tm.train_briefly(tm.build("qwen3_moe", seed=21, **_big("qwen3_moe"))).to(torch.bfloat16).cpu()
    ref_model = copy.deepcopy(model)
    prompt = torch.randint(3, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    cpu = mi.offload(ref_model, device="cpu", device_memory="1GiB", expert_dtype="fp8", engine_options={"reference_kernels": True})
    try:
        seq = cpu.generate(input_ids=prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
        want = _teacher_forced(cpu, seq)
    finally:
        cpu.close()
    ours = mi.offload(model, device="cuda", device_memory="2GiB", expert_dtype="fp8", engine_options={"quantized_kernels": True})
    try:
        ex = ours.moe_runtime.plan["executor"]
        assert ex["kernels"] and ex["quant"] == "fp8", ex
        got = _teacher_forced(ours, seq.cuda())
        assert ours.moe_stats()["paths"]["mapped"] > 0, "the compressed experts are read in place, scales included"
        stored = ours.moe_runtime.plan["stored"]
        assert {r["dtype"] for r in stored["regions"]} >= {"float8_e4m3fn", "float32"}
    finally:
        ours.close()
    agree, rel = _agreement(got.cpu(), want)
    print(f"offload fp8: GPU kernels vs the CPU reference: top-1 {agree:.4f}, rel {rel:.2e}")
    assert agree >= 0.99 and rel <= 1e-2



def _below_sm89() -> bool:
    return torch.cuda.get_device_capability(0) < (8, 9)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_kernel_builds_give_the_same_bits(family, tmp_path):
    """The sm89 kernel build (engine option kernel_build: FP8 weights decoded
    by the hardware's cvt.rn.f16x2.e4m3x2) against the default sm80 build
    (software decode), in one process on one FP8 checkpoint: teacher-forced
    logits identical bit for bit, over decode steps that read experts in
    place (mapped) and from slots."""
    if _below_sm89():
        major, minor = torch.cuda.get_device_capability(0)
        pytest.skip(f"kernel_build sm89 needs compute capability 8.9 or higher; this GPU is {major}.{minor}")
    path = _trained_fp8(family, tmp_path / family)
    prompt = torch.randint(3, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(2)).cuda()
    logits, seq = {}, None
    for build in ("sm80", "sm89"):
        ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB",
                                  engine_options={"quantized_kernels": True, "kernel_build": build})
        try:
            plan = ours.moe_stats()["plan"]
            assert plan["kernel_build"] == build
            assert plan["executor"]["kernels"] and plan["executor"]["quant"] == "fp8", plan["executor"]
            if seq is None:
                seq = ours.generate(input_ids=prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            ours.moe_tune(flush=True)  # both builds start teacher forcing from a cold cache
            logits[build] = _teacher_forced(ours, seq)
            paths = ours.moe_stats()["paths"]
            assert paths["mapped"] > 0 and paths["mapped"] + paths["kernels"] >= tm.moe_layers(family) * 32, paths
        finally:
            ours.close()
    a, b = logits["sm80"], logits["sm89"]
    same = a.view(torch.int32) == b.view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} logits differ; max |diff| {(a - b).abs().max().item()}"


def test_kernel_build_sm89_is_refused_below_compute_capability_8_9(tmp_path):
    """On a GPU older than Ada/Hopper the sm89 build is an UnsupportedError
    naming the device's compute capability, not a failure inside the
    driver."""
    if not _below_sm89():
        pytest.skip("this GPU runs the sm89 build (compute capability >= 8.9)")
    major, minor = torch.cuda.get_device_capability(0)
    path = tm.save(tm.build("mixtral", dtype=torch.bfloat16), tmp_path / "m")
    with pytest.raises(mi.UnsupportedError, match=rf"compute capability 8\.9 or higher; this device is {major}\.{minor}"):
        mi.from_pretrained(path, device="cuda", device_memory="1GiB", engine_options={"kernel_build": "sm89"})


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_mapped_reads_of_checkpoint_experts_match_their_slots(family, tmp_path):
    """FP8 experts in mapped mode: every expert of an FP8 checkpoint, read
    in place from host memory (its float8 rows and its separate
    weight_scale_inv tensors, through the scale tables) by a mapped layer
    on a cold cache, gives exactly the output of the same expert copied
    into a slot (the slot path's FP8 kernels)."""
    path = _trained_fp8(family, tmp_path / family)
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", engine_options={"quantized_kernels": True})
    try:
        rt = ours.moe_runtime
        ex = rt.plan["executor"]
        assert ex["kernels"] and ex["quant"] == "fp8" and ex["mapped"], ex
        assert rt.mapped
        _assert_mapped_reads_equal_slot_reads(ours, torch.bfloat16 if ex["dtype"] == 0 else torch.float16)
    finally:
        ours.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_graph_decoder_matches_the_slot_path(family, tmp_path):
    """An FP8 checkpoint decoded in mapped mode, eagerly and from a CUDA
    graph (stepwise and pipelined), gives the same greedy tokens as the FP8
    slot path (mapped mode off: routing to the host, copies, then the
    kernels), on the same StaticCache steps."""
    from moe_infinity.graphs import GraphDecoder

    path = _trained_fp8(family, tmp_path / family)
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", engine_options={"quantized_kernels": True})
    try:
        rt = ours.moe_runtime
        assert rt.plan["executor"]["mapped"], rt.plan["executor"]
        prompt = torch.randint(3, tm.VOCAB, (1, 12), generator=torch.Generator().manual_seed(6)).cuda()
        new = 16
        L = tm.moe_layers(family)

        def paths() -> dict:
            return dict(ours.moe_stats()["paths"])

        rt.set_mapped(False)
        ours.moe_tune(flush=True)
        p0 = paths()
        want = _eager_static_tokens(ours, prompt, new)
        p1 = paths()
        assert p1["mapped"] == p0["mapped"] and p1["kernels"] >= p0["kernels"] + new * L, (p0, p1)

        rt.set_mapped(True)
        ours.moe_tune(flush=True)
        eager = _eager_static_tokens(ours, prompt, new)
        p2 = paths()
        assert p2["mapped"] >= p1["mapped"] + new * L, (p1, p2)
        assert torch.equal(eager, want), f"mapped eager {eager.tolist()} vs slot path {want.tolist()}"

        ours.moe_tune(flush=True)
        dec = GraphDecoder(ours, max_len=prompt.shape[1] + new + 2)
        got = dec.generate(prompt, max_new_tokens=new)
        assert dec.layers_captured == L
        assert torch.equal(got, want), f"FP8 graph {got.tolist()} vs slot path {want.tolist()}"
        piped = dec.generate(prompt, max_new_tokens=new, pipeline=True)
        assert torch.equal(piped, want), f"pipelined FP8 graph {piped.tolist()} vs slot path {want.tolist()}"
        st = ours.moe_stats()
        assert st["hits"] + st["misses"] >= (new - 1) * L * ours.config.num_experts_per_tok, "replays are traced"
    finally:
        ours.close()


def _assert_mapped_reads_equal_slot_reads(ours, dt):
    """Each expert of each layer, alone and cold, computed mapped (read in
    place from host memory) equals the same expert computed from its slot,
    bit for bit, and is not all zeros."""
    rt = ours.moe_runtime
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, ours.config.hidden_size, device="cuda", generator=g).to(dt)
    w = torch.ones(1, 1, device="cuda", dtype=dt)
    bad = []
    for layer in rt.layers:
        for e in range(rt.num_experts):
            idx = torch.tensor([[e]], device="cuda")
            ours.moe_tune(flush=True)
            before = ours.moe_stats()["paths"]["mapped"]
            cold = rt.run_fused(layer, x, idx, w, None).clone()
            assert ours.moe_stats()["paths"]["mapped"] == before + 1, "the executor ran it mapped"
            slot = rt.run_experts(layer.index, x, idx, w.float(), [e])
            torch.cuda.synchronize()
            assert cold.abs().sum() > 0
            if not torch.equal(cold, slot):
                bad.append((layer.index, e, (cold.float() - slot.float()).abs().max().item()))
    assert not bad, f"host reads differ from slot reads (layer, expert, max diff): {bad}"


#: A tiny gpt-oss whose sizes are multiples of MXFP4's 32-value blocks.
GPT_OSS_BIG = dict(hidden_size=256, intermediate_size=384, head_dim=32, num_local_experts=8, num_experts_per_tok=4)


def _trained_gpt_oss(directory, mxfp4: bool):
    """A briefly trained tiny gpt-oss saved in bfloat16, or as the releases
    ship it (MXFP4 experts, test_quantized's layout and quantizer)."""
    import test_quantized as tq

    model = tm.train_briefly(tm.build("gpt_oss", seed=21, **GPT_OSS_BIG)).to(torch.bfloat16)
    if not mxfp4:
        return tm.save(model, directory)
    return tq.save_gpt_oss_mxfp4(model, directory)


@pytest.mark.parametrize("mxfp4", [False, True], ids=["bf16", "mxfp4"])
def test_gpt_oss_kernel_teacher_forced_agreement(mxfp4, tmp_path):
    """The CUDA gpt-oss kernels (opt-in with quantized_kernels until this
    test has passed on a GPU; bfloat16 experts, and MXFP4 ones read from
    their compressed slots) against transformers on the GPU (its
    dequantizing load for MXFP4) and against the engine's CPU reference of
    the same kernels: teacher-forced top-1 agreement >= 99%, as the bf16 and
    FP8 kernels. Decode steps run in mapped mode (experts read from their
    slots or in place from the checkpoint's tensors, biases and scales
    included)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    path = _trained_gpt_oss(tmp_path / "m", mxfp4)
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {"dtype": torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", **extra).eval()
    prompt = torch.randint(3, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(2)).cuda()
    seq = plain.generate(input_ids=prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    want = _teacher_forced(plain, seq)
    del plain
    default = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16)
    try:
        ex = default.moe_runtime.plan["executor"]
        assert not ex["kernels"] and "quantized_kernels" in ex["kernels_off"], "opt-in until checked on a GPU"
    finally:
        default.close()
    ours = mi.from_pretrained(path, device="cuda", device_memory="2GiB", dtype=torch.bfloat16, engine_options={"quantized_kernels": True})
    try:
        ex = ours.moe_runtime.plan["executor"]
        assert ex["kernels"] and ex["mapped"] and ex.get("quant") == ("mxfp4" if mxfp4 else None), ex
        got = _teacher_forced(ours, seq)
        paths = ours.moe_stats()["paths"]
        assert paths["mapped"] + paths["kernels"] >= tm.moe_layers("gpt_oss") * 48, f"every decode step's layers ran the kernels: {paths}"
        assert paths["mapped"] > 0, f"mapped mode read gpt-oss experts in place: {paths}"
    finally:
        ours.close()
    cpu = mi.from_pretrained(path, device="cpu", device_memory="1GiB", dtype=torch.bfloat16, engine_options={"reference_kernels": True})
    try:
        assert cpu.moe_runtime.plan["executor"]["kernels"]
        ref = _teacher_forced(cpu, seq.cpu())
    finally:
        cpu.close()
    agree, rel = _agreement(got, want)
    ref_agree, ref_rel = _agreement(got.cpu(), ref)
    what = "MXFP4" if mxfp4 else "bf16"
    print(f"gpt-oss {what}: kernel vs transformers: top-1 {agree:.4f}, rel {rel:.2e}; vs the CPU reference: top-1 {ref_agree:.4f}, rel {ref_rel:.2e}")
    assert agree >= 0.99 and rel <= 1e-2
    assert ref_agree >= 0.99 and ref_rel <= 1e-2


@pytest.mark.parametrize("mxfp4", [False, True], ids=["bf16", "mxfp4"])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_gpt_oss_cuda_kernels_match_the_cpu_reference(mxfp4, T, tmp_path):
    """One layer's gpt-oss expert FFN (run_experts) on random inputs, at
    gpt-oss-120b's hidden and intermediate sizes scaled down (H = I = 576,
    multiples of 32 and not of 256): the CUDA kernels against the CPU
    reference within the kernel tests' tolerance (tests/test_backend_ops.py:
    1.5e-2 of the output's scale plus 1e-3)."""
    import test_quantized as tq

    over = dict(GPT_OSS_BIG, hidden_size=576, intermediate_size=576, num_hidden_layers=1, layer_types=["full_attention"])
    model = tm.build("gpt_oss", seed=3, dtype=torch.bfloat16, **over)
    path = tmp_path / "m"
    if mxfp4:
        tq.save_gpt_oss_mxfp4(model, path)
    else:
        tm.save(model, path)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 576, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(T)])
    w = torch.softmax(torch.randn(T, 4, generator=g), dim=-1).to(torch.bfloat16)
    experts = sorted(set(idx.flatten().tolist()))
    cpu = mi.from_pretrained(path, device="cpu", device_memory="1GiB", dtype=torch.bfloat16, engine_options={"reference_kernels": True})
    try:
        want = cpu.moe_runtime.run_experts(0, x, idx, w, experts).double()
    finally:
        cpu.close()
    gpu = mi.from_pretrained(path, device="cuda", device_memory="1GiB", dtype=torch.bfloat16, engine_options={"quantized_kernels": True})
    try:
        got = gpu.moe_runtime.run_experts(0, x.cuda(), idx.cuda(), w.cuda(), experts)
        torch.cuda.synchronize()
    finally:
        gpu.close()
    err = (got.double().cpu() - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"gpt-oss {'MXFP4' if mxfp4 else 'bf16'} T={T}: CUDA vs CPU reference: max abs error {err:.3g} for output scale {scale:.3g}")
    assert err <= 1.5e-2 * scale + 1e-3
