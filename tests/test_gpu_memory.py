"""GPU memory pressure: asking for more than the device has free, torch
taking the rest after load, and the engine's own allocation failing are
clear errors or keep working — never a crash. Skipped, with the reason, on
machines without a usable GPU."""

from __future__ import annotations

import pytest
import torch

import moe_infinity as mi
import tiny_models as tm
from moe_infinity import _native

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _native.cuda_usable(),
        reason="needs a CUDA GPU (runs on the H100 machine through scripts/gpu_check.sh)",
    ),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tm.save(tm.build("mixtral", seed=9, dtype=torch.bfloat16, hidden_size=256, intermediate_size=512), tmp_path_factory.mktemp("m"))


def _free() -> int:
    return _native.device_memory(torch.cuda.current_device())[1]


def test_device_memory_above_what_is_free_is_an_error_naming_both(ckpt):
    free = _free()
    ask = free + (2 << 30)
    with pytest.raises(mi.BudgetError, match=r"device_memory=.*\(%d bytes\) but only .*free" % ask) as err:
        mi.from_pretrained(ckpt, device="cuda", device_memory=ask, dtype=torch.bfloat16)
    assert "lower device_memory" in str(err.value)


def test_decode_keeps_working_when_torch_takes_most_of_the_rest(ckpt):
    model = mi.from_pretrained(ckpt, device="cuda", device_memory="1GiB", dtype=torch.bfloat16)
    hog = None
    try:
        ids = torch.randint(3, tm.VOCAB, (1, 8), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
        model.moe_tune(flush=True, reset_stats=True)
        hog = torch.empty(max(0, _free() - (768 << 20)), dtype=torch.uint8, device="cuda")
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, want), "the cache arena was allocated at load: torch's later allocations leave it alone"
        assert model.moe_stats()["misses"] > 0, "experts were copied in again after the flush"
    finally:
        del hog
        model.close()
        torch.cuda.empty_cache()


def _hog(leave: int) -> torch.Tensor:
    """A tensor taking all but about `leave` bytes of the free memory."""
    for extra in range(0, 64 << 20, 4 << 20):
        try:
            return torch.empty(max(0, _free() - leave - extra), dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError:
            continue
    pytest.fail("could not allocate the memory hog")


def test_a_failed_engine_allocation_is_a_named_error(ckpt):
    # The cache arena of this model (8 experts of 768 KiB) needs ~6 MiB.
    hog = _hog(leave=2 << 20)
    try:
        eng = mi.Engine(4 << 30, backend="cuda", device=torch.cuda.current_device())
        try:
            eng.add_checkpoint(ckpt)
            with pytest.raises(mi.BudgetError, match="GPU memory|free"):
                eng.configure({"regions": [
                    {"name": "gate_up_proj", "parts": ["w1.weight", "w3.weight"], "dtype": "bfloat16"},
                    {"name": "down_proj", "parts": ["w2.weight"], "dtype": "bfloat16"},
                ]})
        finally:
            eng.close()
    finally:
        del hog
        torch.cuda.empty_cache()
