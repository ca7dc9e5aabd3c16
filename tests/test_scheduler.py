"""Continuous batching (moe_infinity.serving.Scheduler): stacked steps (one
forward for the batch, rows kept apart) and the lockstep that lets
concurrently decoding threads share each MoE layer's experts."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import moe_infinity as mi
import tiny_models as tm
from moe_infinity import _native
from moe_infinity.errors import ClosedError, InvalidArgumentError, OverloadedError, StateError
from moe_infinity.lockstep import Lockstep
from moe_infinity.serving import SamplingParams, Scheduler
from moe_infinity.serving import stacked as stacked_module
from moe_infinity.serving.stacked import RowwiseMode, StackedBatch, stacked_support

PROMPTS = ["Hello", "The cat sat on the", "Once upon a time there was", "In 1900,", "She said that", "The river", "A good", "Tomorrow we will"]


# -- lockstep ------------------------------------------------------------------


def _member(ls: Lockstep, steps: int, layers: int, experts: dict[int, list[int]], log: list, fail_at: tuple[int, int] | None = None, start: threading.Barrier | None = None) -> None:
    ls.enroll()
    if start is not None:
        start.wait(10)
    try:
        for s in range(steps):
            ls.begin_forward()
            try:
                for layer in range(layers):
                    if fail_at == (s, layer):
                        raise RuntimeError("boom")
                    ls.at_layer(layer, experts[layer])
                    log.append((threading.get_ident(), s, layer))
            finally:
                ls.end_forward()
    except RuntimeError:
        pass
    finally:
        ls.leave()


def test_lockstep_hints_each_layer_once_per_step_with_the_union():
    hints: list[tuple[int, list[int]]] = []
    ls = Lockstep(hint=lambda layer, xs: hints.append((layer, xs)), stall_timeout=30)
    log: list = []
    routes = [{0: [1], 1: [2]}, {0: [3], 1: [2]}, {0: [1, 5], 1: [7]}]
    start = threading.Barrier(len(routes))
    ts = [threading.Thread(target=_member, args=(ls, 4, 2, r, log, None, start)) for r in routes]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts)
    st = ls.stats()
    # All three enrolled before the first step: every step holds all three,
    # and each (step, layer) hint carries every member's experts of it.
    assert st == {"steps": 4, "mean_batch": 3.0, "max_batch": 3, "members": 0}
    assert hints == [(0, [1, 3, 5]), (1, [2, 7])] * 4


def test_lockstep_no_member_computes_layer_until_all_reached_it():
    ls = Lockstep(stall_timeout=30)
    order: list[tuple[str, int]] = []
    lock = threading.Lock()

    start = threading.Barrier(2)

    def member(name: str, delay: float) -> None:
        ls.enroll()
        start.wait(10)
        try:
            ls.begin_forward()
            for layer in range(3):
                time.sleep(delay)
                with lock:
                    order.append(("arrive", layer))
                ls.at_layer(layer, [layer])
                with lock:
                    order.append(("go", layer))
            ls.end_forward()
        finally:
            ls.leave()

    ts = [threading.Thread(target=member, args=(n, d)) for n, d in (("a", 0.0), ("b", 0.05))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for layer in range(3):
        last_arrive = max(i for i, e in enumerate(order) if e == ("arrive", layer))
        first_go = min(i for i, e in enumerate(order) if e == ("go", layer))
        assert last_arrive < first_go, order


def test_lockstep_survives_a_member_failing_mid_forward():
    ls = Lockstep(stall_timeout=30)
    log: list = []
    start = threading.Barrier(2)
    ok = threading.Thread(target=_member, args=(ls, 3, 4, {i: [i] for i in range(4)}, log, None, start))
    bad = threading.Thread(target=_member, args=(ls, 3, 4, {i: [i] for i in range(4)}, log, (1, 2), start))
    ok.start()
    bad.start()
    ok.join(30)
    bad.join(30)
    assert not ok.is_alive() and not bad.is_alive()
    assert sum(1 for e in log if e[0] == ok.ident) == 12


def test_lockstep_stalled_member_times_out_with_a_clear_error():
    ls = Lockstep(stall_timeout=0.3)
    ready = threading.Event()

    def stuck() -> None:
        ls.enroll()
        ls.begin_forward()
        ready.set()
        time.sleep(2)  # never reaches a layer
        ls.leave()

    t = threading.Thread(target=stuck)
    ls.enroll()
    t.start()
    ls.begin_forward()
    ready.wait(5)
    with pytest.raises(StateError, match="stopped responding"):
        ls.at_layer(0, [1])
    ls.leave()
    t.join(5)


# -- scheduler -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(mi.builtin_model_path())


@pytest.fixture(scope="module")
def model():
    m = mi.from_pretrained(mi.builtin_model_path(), device="cpu", device_memory="6MiB")
    yield m
    m.close()


def _decode_all(s: Scheduler, prompts: list[list[int]], params: SamplingParams, timeout: float = 300) -> list:
    """Submits every prompt with the same parameters and waits for all."""
    reqs = [s.submit(p, params) for p in prompts]
    for r in reqs:
        assert r.wait(timeout)
    return reqs


def _alone(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    toks = out[0, len(ids) :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in toks:
        toks = toks[: toks.index(eos) + 1]
    return toks


@pytest.fixture(params=["stacked", "threads"])
def batching(request):
    return request.param


def test_concurrent_requests_get_their_alone_tokens_and_share_steps(model, tok, batching):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    alone = [_alone(model, i, 20) for i in ids]
    eams = model.moe_stats()["eamc_size"]
    with Scheduler(model, max_batch=8, batching=batching) as s:
        assert s.batching == batching
        reqs = _decode_all(s, ids, SamplingParams(max_tokens=20, temperature=0))
        st = s.stats()
    for r, a in zip(reqs, alone):
        assert r.tokens == a
        assert r.finish_reason == ("stop" if a[-1] == model.generation_config.eos_token_id else "length")
    assert st["finished"] == {"length": sum(r.finish_reason == "length" for r in reqs), "stop": sum(r.finish_reason == "stop" for r in reqs)} or sum(st["finished"].values()) == 8
    # The requests decoded together: far fewer steps than tokens.
    assert st["batch"]["max_batch"] >= 2
    assert st["batch"]["steps"] < sum(len(r.tokens) for r in reqs)
    # Each request kept its own activation matrix.
    assert model.moe_stats()["eamc_size"] >= min(eams + len(PROMPTS), 1000)
    assert st["batch"]["mode"] == batching
    assert model.moe_runtime.lockstep is None and model.moe_runtime.scheduler is None


def test_seeded_sampling_is_reproducible_whatever_runs_beside(model, tok, batching):
    ids = tok("Once upon a time")["input_ids"]
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234)
    with Scheduler(model, max_batch=4, batching=batching) as s:
        a = s.generate(ids, sp, timeout=120)
        crowd = [s.submit(tok(p)["input_ids"], SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i, p in enumerate(PROMPTS[:3])]
        b = s.generate(ids, sp, timeout=120)
        for r in crowd:
            r.wait(120)
    assert a.tokens == b.tokens and len(a.tokens) > 0


def test_cancel_frees_the_slot_and_others_continue(model, tok, batching):
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    with Scheduler(model, max_batch=3, batching=batching) as s:
        first = threading.Event()
        victim = s.submit(ids[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), on_event=lambda ev: first.set())
        others = [s.submit(i, SamplingParams(max_tokens=10, temperature=0)) for i in ids[1:]]
        assert first.wait(60)
        victim.cancel()
        assert victim.wait(60)
        for r in others:
            assert r.wait(120)
    assert victim.finish_reason == "cancelled" and len(victim.tokens) < 200
    assert [r.tokens for r in others] == [_alone(model, i, 10) for i in ids[1:]]


def test_queue_bound_refuses_with_overloaded(model, tok):
    ids = tok("Hello")["input_ids"]
    with Scheduler(model, max_batch=1, max_queue=1) as s:
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        a = s.submit(ids, long)
        b = s.submit(ids, long)
        deadline = time.monotonic() + 30
        while s.running < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(OverloadedError, match="max_queue=1"):
            s.submit(ids, long)
            s.submit(ids, long)
        assert s.stats()["rejected"] >= 1
        a.cancel()
        b.cancel()


def test_bad_requests_are_refused_at_submit(model, tok):
    with Scheduler(model, max_batch=1) as s:
        ctx = s.context_length
        with pytest.raises(InvalidArgumentError, match=r"context is 1024 tokens.*: 6 too many"):
            s.submit([5] * (ctx - 4), SamplingParams(max_tokens=10))
        with pytest.raises(InvalidArgumentError, match="empty"):
            s.submit([], SamplingParams())
        with pytest.raises(InvalidArgumentError, match="max_tokens"):
            SamplingParams(max_tokens=0)
        with pytest.raises(InvalidArgumentError, match="top_p"):
            SamplingParams(top_p=0)


def test_close_cancels_queued_and_refuses_new(model, tok):
    ids = tok("Hello")["input_ids"]
    s = Scheduler(model, max_batch=1, max_queue=4)
    running = s.submit(ids, SamplingParams(max_tokens=8, temperature=0))
    queued = [s.submit(ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)) for _ in range(3)]
    s.close(timeout=60)
    assert running.finish_reason in ("length", "stop", "cancelled")
    assert all(q.finish_reason in ("cancelled", "length") for q in queued)
    assert any(q.finish_reason == "cancelled" for q in queued)
    with pytest.raises(ClosedError):
        s.submit(ids, SamplingParams())
    with Scheduler(model, max_batch=1):
        with pytest.raises(StateError, match="already has a running Scheduler"):
            Scheduler(model)
    assert model.moe_runtime.lockstep is None
    # The model still works alone afterwards.
    assert len(_alone(model, ids, 3)) >= 1


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _native.cuda_usable(),
    reason="needs a CUDA GPU (runs on the H100 machine through scripts/gpu_check.sh)",
)
def test_batch_on_gpu_gives_each_request_its_alone_tokens(tok, batching):
    """On the GPU each member runs the engine's kernels for its own tokens
    while the batch shares the fetches: tokens equal generate alone."""
    m = mi.from_pretrained(mi.builtin_model_path(), device="cuda", device_memory="1GiB")
    try:
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        alone = [_alone(m, i, 16) for i in ids]
        with Scheduler(m, max_batch=8, batching=batching) as s:
            reqs = _decode_all(s, ids, SamplingParams(max_tokens=16, temperature=0))
            st = s.stats()
        assert [r.tokens for r in reqs] == alone
        assert st["batch"]["max_batch"] >= 2
    finally:
        m.close()


def test_batch_on_the_kernel_paths_gives_each_request_its_alone_tokens(tok, batching):
    """The CPU stand-in for the GPU test above: with the reference kernels
    the engine's kernel and mapped paths run, and members hand it the
    routing the lockstep already brought to the host."""
    m = mi.from_pretrained(mi.builtin_model_path(), device="cpu", device_memory="6MiB", engine_options={"reference_kernels": True})
    try:
        ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
        alone = [_alone(m, i, 12) for i in ids]
        m.reset_moe_stats()
        with Scheduler(m, max_batch=4, batching=batching) as s:
            reqs = _decode_all(s, ids, SamplingParams(max_tokens=12, temperature=0))
            st = s.stats()
        assert [r.tokens for r in reqs] == alone
        assert st["batch"]["max_batch"] >= 2
        paths = m.moe_stats()["paths"]
        assert paths.get("kernels", 0) + paths.get("mapped", 0) > 0, paths
    finally:
        m.close()


# -- stacked steps ----------------------------------------------------------------


def test_rowwise_mode_computes_each_row_as_alone():
    """A stacked linear is each row's own M = 1 product, a reduction over
    the last dimension each row's own; attention of row i reads only its
    own (left-padded) cache positions."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(5, 1, 64, generator=g)
    with RowwiseMode():
        stacked = F.linear(x, w)
    for i in range(5):
        assert torch.equal(stacked[i], F.linear(x[i].clone(), w))
    calls = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.mean, F.softmax):
                calls.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    h = torch.randn(4, 1, 64, generator=g)
    with Spy(), RowwiseMode():  # the spy sees what the mode hands on
        m = h.pow(2).mean(-1, keepdim=True)
        sm = F.softmax(h, dim=-1)
        whole = h.mean(dim=(-1, -2))  # not over the last dimension alone: left as is
    assert calls == [(1, 64)] * 4 + [(1, 64)] * 4 + [(4, 1, 64)]
    assert m.shape == (4, 1, 1) and sm.shape == (4, 1, 64) and whole.shape == (4,)
    for i in range(4):
        assert torch.equal(m[i], h[i].clone().pow(2).mean(-1, keepdim=True))
        assert torch.equal(sm[i], F.softmax(h[i].clone(), dim=-1))
    # With the step's rows known, a batch-first tensor is cut by request:
    # each call has the shape of the request's own (a head-split query's
    # norm is one call over its heads, not one per head); a tensor that is
    # not the step's (4 gathered tokens in a step of 3) is cut by token.
    calls.clear()
    heads = torch.randn(3, 1, 8, 16, generator=g)
    tokens = torch.randn(4, 64, generator=g)
    with Spy(), RowwiseMode([2, 2, 2]):
        hm = heads.pow(2).mean(-1, keepdim=True)
        tm_ = F.softmax(tokens, dim=-1)
    assert calls == [(1, 1, 8, 16)] * 3 + [(1, 64)] * 4
    assert hm.shape == (3, 1, 8, 1) and tm_.shape == (4, 64)
    for i in range(3):
        assert torch.equal(hm[i : i + 1], heads[i : i + 1].clone().pow(2).mean(-1, keepdim=True))
    for i in range(4):
        assert torch.equal(tm_[i : i + 1], F.softmax(tokens[i : i + 1].clone(), dim=-1))
    q = torch.randn(3, 2, 1, 16, generator=g)
    lengths = [7, 3, 5]
    kv = [(torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)) for n in lengths]
    width = max(lengths)
    k = torch.cat([F.pad(a, (0, 0, width - n, 0), value=float("nan")) for (a, _), n in zip(kv, lengths)])
    v = torch.cat([F.pad(b, (0, 0, width - n, 0), value=float("nan")) for (_, b), n in zip(kv, lengths)])
    mode = RowwiseMode(lengths)
    with mode:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 1, 1, width, dtype=torch.bool))
    assert mode.attention_calls == 1
    with RowwiseMode(lengths):  # the mask given by position, as F's signature allows
        positional = F.scaled_dot_product_attention(q, k, v, torch.ones(3, 1, 1, width, dtype=torch.bool), 0.0)
    assert torch.equal(positional, out)
    for i, (a, b) in enumerate(kv):
        assert torch.equal(out[i : i + 1], F.scaled_dot_product_attention(q[i : i + 1].clone(), a, b))
    # A sliding-window layer's call has fewer key positions (the window's):
    # each row reads its last min(window, its tokens) of them.
    window = 4
    with RowwiseMode(lengths) as mode:
        assert mode.starts(window) == [0, 1, 0]
        slid = F.scaled_dot_product_attention(q, k[:, :, -window:], v[:, :, -window:])
    for i, (a, b) in enumerate(kv):
        assert torch.equal(slid[i : i + 1], F.scaled_dot_product_attention(q[i : i + 1].clone(), a[:, :, -window:], b[:, :, -window:]))


class _RowCalls(torch.overrides.TorchFunctionMode):
    """Records the products and the reductions over the last dimension a
    forward makes (what RowwiseMode splits): the function, its input's
    shape and, for a product, the weight's."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or (func in stacked_module._ROW_REDUCTIONS and stacked_module._reduces_last_dim(args[0], args, kwargs)):
            self.calls.append((func.__name__, tuple(tuple(a.shape) for a in args[:2] if isinstance(a, torch.Tensor))))
        return func(*args, **kwargs)


def test_a_stacked_step_makes_each_requests_own_calls():
    """Exactness by construction: the products and reductions of one
    stacked step of three requests are, call for call and shape for shape,
    those of the three requests' own decode steps — on Qwen3-MoE, whose
    per-head query and key norms are where a split by flattened row made
    one call per head (32 at the 30B shape, each on a shape the request's
    own step never has). The plain transformers model is used: its experts'
    grouped products are the runtime's to split (rows(rowwise=True)), and
    the tests above check the tokens through the engine."""
    model = tm.build("qwen3_moe", seed=5)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, tm.VOCAB, (n,), generator=g).tolist() for n in (3, 7, 5)]
    nxt = [int(t) for t in torch.randint(3, tm.VOCAB, (3,), generator=g)]
    alone_calls, alone_logits = [], []
    for p, t in zip(prompts, nxt):
        one = StackedBatch(model)
        one.add(one.prefill(p)[0], len(p))
        with _RowCalls() as spy:
            alone_logits.append(one.step([t]))
        alone_calls += spy.calls
    batch = StackedBatch(model)
    for p in prompts:
        batch.add(batch.prefill(p)[0], len(p))
    with _RowCalls() as spy:  # entered first: it sees what the step's RowwiseMode hands on
        logits = batch.step(nxt)
    heads = model.config.num_attention_heads
    assert ("mean", ((1, 1, heads, model.config.head_dim),)) in alone_calls
    assert sorted(spy.calls) == sorted(alone_calls)
    assert logits.shape == torch.cat(alone_logits).shape


def test_requests_joining_and_leaving_a_running_stacked_batch_get_their_alone_tokens(model, tok):
    """Rows join a batch that is already decoding (prompts shorter and
    longer than its cache, so the padding grows and shrinks) and leave it at
    different steps; every request still gets its alone tokens, and the
    engine traced each as its own request."""
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    lengths = [24, 6, 17, 3, 30, 9, 12, 20]
    alone = [_alone(model, i, n) for i, n in zip(ids, lengths)]
    with Scheduler(model, max_batch=4, batching="stacked") as s:
        started = threading.Event()
        first = [s.submit(ids[j], SamplingParams(max_tokens=lengths[j], temperature=0), on_event=lambda ev: started.set()) for j in range(2)]
        assert started.wait(60)
        rest = [s.submit(ids[j], SamplingParams(max_tokens=lengths[j], temperature=0)) for j in range(2, 8)]
        reqs = first + rest
        for r in reqs:
            assert r.wait(300)
        st = s.stats()
    assert [r.tokens for r in reqs] == alone
    assert st["batch"]["mode"] == "stacked" and st["batch"]["max_batch"] == 4
    assert st["batch"]["steps"] < sum(len(a) for a in alone) - len(alone)
    assert model.moe_stats()["active_requests"] == 0


def test_batching_mode_follows_what_the_model_supports(model, tok, tmp_path):
    with Scheduler(model, max_batch=2) as s:
        assert s.batching == "stacked" and s.batching_reason is None and s.exact
    # Eager attention is split by row too (the model's eager function, once per row).
    eager = mi.from_pretrained(mi.builtin_model_path(), device="cpu", device_memory="6MiB", attn_implementation="eager")
    try:
        ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
        alone = [_alone(eager, i, 8) for i in ids]
        with Scheduler(eager, max_batch=3) as s:
            assert s.batching == "stacked" and s.batching_reason is None
            reqs = _decode_all(s, ids, SamplingParams(max_tokens=8, temperature=0))
            assert s.stats()["batch"]["max_batch"] >= 2
        assert [r.tokens for r in reqs] == alone
    finally:
        eager.close()
    # Chunked attention: transformers keeps it in the sliding-window cache
    # layer, but a position attends to its chunk, not to its last positions.
    path = tm.save(tm.build("mixtral", seed=5, attention_chunk_size=8), tmp_path / "chunked")
    chunked = mi.from_pretrained(path, device="cpu", device_memory="64MiB")
    try:
        with Scheduler(chunked, max_batch=2) as s:
            assert s.batching == "threads"
            assert "chunked_attention" in s.batching_reason, s.batching_reason
        with pytest.raises(InvalidArgumentError, match=r"batching='stacked' cannot serve this model: .*chunked_attention.*batching='threads'"):
            Scheduler(chunked, batching="stacked")
        assert chunked.moe_runtime.scheduler is None
    finally:
        chunked.close()
    with pytest.raises(InvalidArgumentError, match="batching must be"):
        Scheduler(model, batching="stack")


def test_stacked_without_exactness_decodes_every_request(model, tok):
    """exact=False stacks the rows' products plainly (faster on a GPU): each
    request still decodes to its length, only the last bits may differ."""
    ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    with Scheduler(model, max_batch=4, batching="stacked", exact=False) as s:
        reqs = _decode_all(s, ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), timeout=120)
        st = s.stats()
    assert [len(r.tokens) for r in reqs] == [10] * 4
    assert all(r.finish_reason == "length" for r in reqs)
    assert st["batch"]["exact"] is False and st["batch"]["max_batch"] >= 2


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_each_family_batches_with_its_alone_tokens(family, tmp_path):
    """Stacked steps on the other decoder families (shared experts, MLA
    attention and grouped routing in DeepSeek-V3; gpt-oss's eager attention
    with sinks and a sliding window of 16 positions, which the longest
    prompt and the others' decoding cross)."""
    path = tm.save(tm.build(family, seed=5, dtype=torch.bfloat16), tmp_path / family)
    m = mi.from_pretrained(path, device="cpu", device_memory="64MiB")
    try:
        g = torch.Generator().manual_seed(11)
        prompts = [torch.randint(3, tm.VOCAB, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 20)]
        alone = [_alone(m, p, 10) for p in prompts]
        with Scheduler(m, max_batch=4) as s:
            reqs = _decode_all(s, prompts, SamplingParams(max_tokens=10, temperature=0))
            st = s.stats()
            mode, why = s.batching, s.batching_reason
        assert [r.tokens for r in reqs] == alone
        assert mode == "stacked" and why is None
        assert st["batch"]["max_batch"] >= 2
    finally:
        m.close()


#: Tiny models whose caches keep sliding windows, and the overrides that
#: give them one.
SLIDING = {
    # eager attention with per-head sinks; layer 0 slides over 16 positions, layer 1 is full
    "gpt_oss": {},
    # sdpa; layer 0 slides over 8 positions, layer 1 is full
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=["sliding_attention", "full_attention"]),
    # sdpa; every layer slides over 8 positions
    "mixtral": dict(sliding_window=8),
}


def _alone_past_eos(model, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of ``generate`` alone, not stopping at
    end-of-sequence (as a request with ignore_eos decodes)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids) :].tolist()


def _sliding_rows_get_their_alone_tokens(family: str, directory, device: str, device_memory: str) -> None:
    from transformers import DynamicCache

    path = tm.save(tm.build(family, seed=5, dtype=torch.bfloat16, **SLIDING[family]), directory / family)
    m = mi.from_pretrained(path, device=device, device_memory=device_memory)
    try:
        w = m.config.sliding_window
        assert "DynamicSlidingWindowLayer" in {type(layer).__name__ for layer in DynamicCache(config=m.config).layers}
        assert stacked_support(m) is None
        g = torch.Generator().manual_seed(11)
        lengths = [3, 2 * w + 4, 9, w + 2, 5, w - 1]
        new = [2 * w, 4, w + 3, 8, 25, 6]
        prompts = [torch.randint(3, tm.VOCAB, (n,), generator=g).tolist() for n in lengths]
        alone = [_alone_past_eos(m, p, n) for p, n in zip(prompts, new)]
        with Scheduler(m, max_batch=3) as s:
            reqs = [s.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(prompts, new)]
            for r in reqs:
                assert r.wait(300)
            st = s.stats()
            mode = s.batching
        assert mode == "stacked"
        assert [r.tokens for r in reqs] == alone
        assert st["batch"]["max_batch"] == 3
        assert st["batch"]["steps"] < sum(new) - len(new)
    finally:
        m.close()


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_rows_joining_and_leaving_get_their_alone_tokens(family, tmp_path):
    """Stacked steps over sliding-window cache layers: prompts shorter and
    longer than the window, rows whose decoding crosses it, and rows joining
    a running batch (three places for six requests) and leaving it at
    different steps, so each layer's window is re-stacked as the batch's
    longest row changes. Every request gets its alone tokens."""
    _sliding_rows_get_their_alone_tokens(family, tmp_path, "cpu", "64MiB")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _native.cuda_usable(),
    reason="needs a CUDA GPU (runs on the H100 machine through scripts/gpu_check.sh)",
)
@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_rows_on_gpu_get_their_alone_tokens(family, tmp_path):
    """The same on the GPU, where split attention must also pick the kernels
    the request's own step picks (gpt-oss's eager attention with sinks)."""
    _sliding_rows_get_their_alone_tokens(family, tmp_path, "cuda", "1GiB")
