"""The engine through its C ABI and the ctypes layer: checkpoints written by
the `safetensors` library, byte-exact expert slots, statistics, and clear
errors (never a crash) for bad input."""

from __future__ import annotations

import ctypes
import json
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

import moe_infinity as mi
from moe_infinity import _native

L, E, H, I = 2, 4, 8, 4

MIXTRAL_LAYOUT = {
    "regions": [
        {"name": "gate_up_proj", "parts": ["w1.weight", "w3.weight"], "dtype": "float32"},
        {"name": "down_proj", "parts": ["w2.weight"], "dtype": "float32"},
    ]
}
FUSED_LAYOUT = {
    "regions": [
        {"name": "gate_up_proj", "parts": ["gate_up_proj"], "dtype": "float32"},
        {"name": "down_proj", "parts": ["down_proj"], "dtype": "float32"},
    ]
}


def per_expert_tensors(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = {"model.embed_tokens.weight": torch.randn(16, H, generator=g).to(dtype)}
    for layer in range(L):
        for x in range(E):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{x}."
            ts[p + "w1.weight"] = torch.randn(I, H, generator=g).to(dtype)
            ts[p + "w2.weight"] = torch.randn(H, I, generator=g).to(dtype)
            ts[p + "w3.weight"] = torch.randn(I, H, generator=g).to(dtype)
    return ts


def fused_tensors(dtype=torch.float16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ts = {}
    for layer in range(L):
        p = f"model.layers.{layer}.mlp.experts."
        ts[p + "gate_up_proj"] = torch.randn(E, 2 * I, H, generator=g).to(dtype)
        ts[p + "down_proj"] = torch.randn(E, H, I, generator=g).to(dtype)
    return ts


def slot_views(eng):
    """Per-slot float32 views of gate_up_proj and down_proj."""
    plan = eng.plan
    addr, size = eng.arena()
    arena = torch.frombuffer((ctypes.c_uint8 * size).from_address(addr), dtype=torch.uint8)
    views = []
    for s in range(plan["slots"]):
        base = s * plan["slot_bytes"]
        regs = {}
        for r in plan["layout"]["regions"]:
            off = base + r["offset"]
            regs[r["name"]] = arena[off : off + r["bytes"]].view(torch.float32).view(r["shape"])
        views.append(regs)
    return views


@pytest.fixture
def per_expert_ckpt(tmp_path):
    ts = per_expert_tensors()
    save_file(ts, str(tmp_path / "model.safetensors"))
    return tmp_path, ts


def test_every_expert_fetched_through_two_slots_matches_the_source(per_expert_ckpt):
    path, ts = per_expert_ckpt
    # gate_up [2I, H] f32 = 256 B at offset 0, down [H, I] f32 = 128 B at
    # offset 256; slots are rounded up to the 256-byte alignment.
    slot_bytes = 512
    with mi.Engine(budget_bytes=2 * slot_bytes, policy="lru", prefetch=False) as eng:
        eng.add_checkpoint(path)
        mods = eng.modules()
        assert [m["prefix"] for m in mods] == [f"model.layers.{x}.block_sparse_moe" for x in range(L)]
        assert mods[0]["num_experts"] == E and not mods[0]["fused"]
        plan = eng.configure(MIXTRAL_LAYOUT)
        assert plan["slots"] == 2
        assert plan["slot_bytes"] == slot_bytes
        views = slot_views(eng)
        for layer in range(L):
            for x in range(E):
                slots, lease = eng.acquire(layer, [x])
                v = views[slots[0]]
                p = f"model.layers.{layer}.block_sparse_moe.experts.{x}."
                want_gu = torch.cat([ts[p + "w1.weight"], ts[p + "w3.weight"]]).float()
                assert torch.equal(v["gate_up_proj"], want_gu)
                assert torch.equal(v["down_proj"], ts[p + "w2.weight"].float())
                eng.release(lease)
        st = eng.stats()
        assert st["hits"] + st["misses"] == L * E
        assert st["misses"] == L * E
        assert st["loads"] == L * E
        assert st["bytes_moved"] == L * E * slot_bytes
        assert sum(layer["misses"] for layer in st["layers"]) == st["misses"]
        assert st["evictions"] == L * E - 2


def test_fused_layout_sharded_checkpoint(tmp_path):
    ts = fused_tensors()
    names = sorted(ts)
    shard1 = {n: ts[n] for n in names[:2]}
    shard2 = {n: ts[n] for n in names[2:]}
    save_file(shard1, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in shard1}}
    index["weight_map"].update({n: "model-00002-of-00002.safetensors" for n in shard2})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with mi.Engine(budget_bytes=1 << 20) as eng:
        eng.add_checkpoint(tmp_path)
        assert all(m["fused"] for m in eng.modules())
        eng.configure(FUSED_LAYOUT)
        views = slot_views(eng)
        for layer in range(L):
            slots, lease = eng.acquire(layer, list(range(E)))
            for x, s in enumerate(slots):
                p = f"model.layers.{layer}.mlp.experts."
                assert torch.equal(views[s]["gate_up_proj"], ts[p + "gate_up_proj"][x].float())
                assert torch.equal(views[s]["down_proj"], ts[p + "down_proj"][x].float())
            eng.release(lease)
        # Warm: everything fits, so a second pass only hits.
        eng.reset_stats()
        for layer in range(L):
            _, lease = eng.acquire(layer, list(range(E)))
            eng.release(lease)
        st = eng.stats()
        assert st["misses"] == 0 and st["hits"] == L * E


def test_host_tensors_registered_from_torch():
    ts = per_expert_tensors(dtype=torch.float32)
    with mi.Engine(budget_bytes=1 << 20, prefetch=False) as eng:
        for n, t in ts.items():
            eng.add_host_tensor(n, t)
        eng.configure(MIXTRAL_LAYOUT)
        views = slot_views(eng)
        slots, lease = eng.acquire(1, [3])
        assert torch.equal(views[slots[0]]["down_proj"], ts["model.layers.1.block_sparse_moe.experts.3.w2.weight"])
        eng.release(lease)


def test_tracing_and_prefetch_through_the_abi(per_expert_ckpt):
    path, _ = per_expert_ckpt
    with mi.Engine(budget_bytes=1 << 20) as eng:
        eng.add_checkpoint(path)
        eng.configure(MIXTRAL_LAYOUT)
        for _ in range(2):
            req = eng.begin_request()
            for layer in range(L):
                counts = torch.zeros(1, E)
                counts[0, (layer + 1) % E] = 3
                eng.observe(layer, [req], counts)
                _, lease = eng.acquire(layer, [(layer + 1) % E])
                eng.release(lease)
            eng.end_request(req)
        eng.hint(1, [0, 1])
        st = eng.stats()
        assert st["eamc_size"] == 2
        assert st["active_requests"] == 0
        assert st["acquires"] == 2 * L


def test_budget_smaller_than_one_expert(per_expert_ckpt):
    path, _ = per_expert_ckpt
    with mi.Engine(budget_bytes=100) as eng:
        eng.add_checkpoint(path)
        with pytest.raises(mi.BudgetError, match=r"holds no expert: one expert slot needs .* raise device_memory to at least 512 bytes"):
            eng.configure(MIXTRAL_LAYOUT)


def test_acquire_more_than_slots_is_a_budget_error(per_expert_ckpt):
    path, _ = per_expert_ckpt
    with mi.Engine(budget_bytes=1024, prefetch=False) as eng:
        eng.add_checkpoint(path)
        eng.configure(MIXTRAL_LAYOUT)
        assert eng.max_pin == 2
        with pytest.raises(mi.BudgetError, match="acquire at most 2 experts at a time"):
            eng.acquire(0, [0, 1, 2])
        with pytest.raises(mi.InvalidArgumentError, match="expert 7 out of range"):
            eng.acquire(0, [7])
        with pytest.raises(mi.InvalidArgumentError, match="already released lease"):
            eng.release(424242)


def _write_text(path, text):
    path.write_text(text)
    return path


def _write_raw(path, header: bytes, data: bytes = b"", n=None):
    n = len(header) if n is None else n
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


@pytest.mark.parametrize(
    "name,make,exc,match",
    [
        ("missing path", lambda p: p / "nope", mi.NotFoundError, "nope"),
        ("not safetensors", lambda p: _write_text(p / "x.safetensors", "hello, I am a text file"), mi.CheckpointFormatError, "x.safetensors"),
        (
            "truncated",
            lambda p: _write_raw(p / "t.safetensors", b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8),
            mi.CheckpointFormatError,
            '"a"',
        ),
        ("malformed json", lambda p: _write_raw(p / "m.safetensors", b'{"a": {"dtype": ', b"\0" * 8), mi.CheckpointFormatError, "m.safetensors"),
        (
            "offsets past the end",
            lambda p: _write_raw(p / "o.safetensors", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[100,104]}}', b"\0" * 8),
            mi.CheckpointFormatError,
            '"a"',
        ),
        (
            "size disagrees with shape",
            lambda p: _write_raw(p / "s.safetensors", b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8),
            mi.CheckpointFormatError,
            '"a"',
        ),
        (
            "unknown dtype",
            lambda p: _write_raw(p / "d.safetensors", b'{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', b"\0" * 16),
            mi.CheckpointFormatError,
            "F128",
        ),
        ("header length lies", lambda p: _write_raw(p / "h.safetensors", b"{}", b"", n=1 << 40), mi.CheckpointFormatError, "h.safetensors"),
    ],
)
def test_bad_checkpoints_raise_clear_errors(tmp_path, name, make, exc, match):
    target = make(tmp_path)
    with mi.Engine(budget_bytes=1 << 20) as eng:
        with pytest.raises(exc, match=match):
            eng.add_checkpoint(target)
        # The engine is still usable after the error.
        assert eng.stats is not None


def test_bad_config_and_call_order():
    with pytest.raises(mi.InvalidArgumentError, match="budget_bytes must be > 0"):
        mi.Engine(budget_bytes=0)
    with pytest.raises(mi.InvalidArgumentError, match='unknown cache policy "fifo"'):
        mi.Engine(budget_bytes=1, policy="fifo")
    eng = mi.Engine(budget_bytes=1 << 20)
    with pytest.raises(mi.StateError, match="not configured"):
        eng.stats()
    with pytest.raises(mi.InvalidArgumentError, match="no routed experts"):
        eng.configure(MIXTRAL_LAYOUT)
    with pytest.raises(mi.InvalidArgumentError, match="unsupported expert dtype"):
        eng.add_host_tensor("x", torch.zeros(2, dtype=torch.int64))
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(mi.ClosedError):
        eng.stats()
    assert "closed" in repr(eng)


def test_context_manager_closes():
    with mi.Engine(budget_bytes=1 << 20) as eng:
        assert not eng.closed
    assert eng.closed
    with pytest.raises(mi.ClosedError, match="closed"):
        eng.begin_request()


def test_last_error_is_per_thread(tmp_path):
    eng = mi.Engine(budget_bytes=1 << 20)
    errors = {}

    def worker(name):
        try:
            eng.add_checkpoint(tmp_path / name)
        except mi.NotFoundError as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=worker, args=(f"missing-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng.close()
    assert len(errors) == 8
    for name, msg in errors.items():
        assert name in msg


def test_engine_panic_becomes_an_exception_and_process_continues(monkeypatch):
    # The test hook reads the environment the library saw when it loaded;
    # run the check in a subprocess that sets it first.
    import subprocess
    import sys

    code = (
        "import moe_infinity as mi\n"
        "e = mi.Engine(budget_bytes=1 << 20)\n"
        "from moe_infinity import _native\n"
        "import ctypes\n"
        "try:\n"
        "    _native.call('moe_debug_panic', ctypes.c_uint64(e._h()))\n"
        "except mi.InternalError as x:\n"
        "    assert 'internal error' in str(x), x\n"
        "    print('caught')\n"
        "e.close()\n"
        "print('alive')\n"
    )
    env = dict(__import__("os").environ, MOE_INFINITY_TEST_HOOKS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["caught", "alive"]


def test_library_is_the_cpu_build_without_a_gpu():
    assert _native.variant() in ("cpu", "cuda")
    if not _native.cuda_usable():
        assert _native.variant() == "cpu"
    assert mi.engine_version().startswith(mi.__version__)
