"""Reliability: hostile checkpoints, trace-file misuse, concurrent
generation, interrupted generation and clean teardown (CPU)."""

from __future__ import annotations

import gc
import json
import struct
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, TextStreamer

import moe_infinity as mi
import tiny_models as tm
from moe_infinity import _native


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tm.save(tm.build("mixtral", seed=13), tmp_path_factory.mktemp("mixtral"))
    tm.write_tokenizer(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _greedy(model, prompt, n=16):
    return model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)


PROMPTS = [torch.tensor([[5, 9, 11, 40, 7]]), torch.tensor([[60, 2 + 30, 17]]), torch.tensor([[33, 33, 34, 35, 36, 37]]), torch.tensor([[88, 3]])]


# -- hostile checkpoints -------------------------------------------------------------


def test_truncated_shard_names_file_and_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(mi.CheckpointFormatError, match=r"model\.safetensors: tensor \".+\": data_offsets .* run past the end"):
        mi.from_pretrained(bad)


def test_wrong_dtype_expert_names_file_and_tensor(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    ts = _tensors(bad)
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    ts = {k: (v.to(torch.int32) if ".w3." in k else v) for k, v in ts.items()}
    save_file(ts, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(mi.CheckpointFormatError, match=r"model\.safetensors: tensor \"model\.layers\.\d\.block_sparse_moe\.experts\.\d\.w3\.weight\" has dtype I32"):
        mi.from_pretrained(bad)
    assert name in ts


def test_expert_shapes_that_disagree_with_the_config(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 40  # the checkpoint's experts have 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mi.CheckpointFormatError, match=r"model\.safetensors: tensor \"model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight\" does not fit the model's config: expert gate_up_proj is \(96, 32\) in the checkpoint but the config makes it \(80, 32\)"):
        mi.from_pretrained(bad)


def test_overlapping_tensors_are_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    (tmp_path / "config.json").write_text(json.dumps(tm.make_config("mixtral").to_dict()))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    with pytest.raises(mi.CheckpointFormatError, match=r"model\.safetensors: tensor \"b\": .*overlap"):
        mi.from_pretrained(tmp_path)


# -- trace and offload_dir misuse ---------------------------------------------------


def test_corrupt_trace_file_is_reported_ignored_and_rewritten(ckpt, tmp_path):
    trace = tmp_path / "trace.bin"
    trace.write_bytes(b"MOEITRC1" + b"\x07" * 40)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = mi.from_pretrained(ckpt, trace_path=trace, device_memory=1 << 20)
    assert any("trace file" in str(x.message) and "ignored" in str(x.message) for x in w), [str(x.message) for x in w]
    assert m.moe_stats()["eamc_size"] == 0
    _greedy(m, PROMPTS[0])
    m.close()
    # Rewritten whole (temp file + rename), so it loads now.
    m = mi.from_pretrained(ckpt, trace_path=trace, device_memory=1 << 20)
    assert m.moe_stats()["eamc_size"] == 1
    m.close()


def test_unwritable_trace_path_is_an_error_not_a_corrupt_file(ckpt, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    # Unwritable when loading: an error at once, before any work.
    with pytest.raises(mi.EngineIOError, match="trace_path.*not-a-dir"):
        mi.from_pretrained(ckpt, trace_path=blocker / "trace.bin", device_memory=1 << 20)
    # Unwritable only by the time of close(): an error then, and no file.
    blocker.unlink()
    blocker.mkdir()
    m = mi.from_pretrained(ckpt, trace_path=blocker / "trace.bin", device_memory=1 << 20)
    _greedy(m, PROMPTS[0])
    blocker.rmdir()
    blocker.write_text("a file where a directory should be")
    with pytest.raises(mi.EngineIOError, match="saving trace.*not-a-dir"):
        m.close()
    assert not (blocker / "trace.bin").exists()
    assert blocker.read_text() == "a file where a directory should be"
    with pytest.raises(mi.ClosedError):
        m.moe_stats()


# -- concurrency ----------------------------------------------------------------------


def test_four_threads_generate_the_same_tokens_as_sequential_runs(ckpt):
    plain = tm.auto_class("mixtral").from_pretrained(ckpt).eval()
    want = [_greedy(plain, p, 24) for p in PROMPTS]
    for budget_slots in (1, 3, 8):
        m = mi.from_pretrained(ckpt, device_memory=budget_slots * 18432)
        got: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(PROMPTS))

        def run(i: int) -> None:
            try:
                barrier.wait()
                for _ in range(2):
                    got[i] = _greedy(m, PROMPTS[i], 24)
            except BaseException as exc:  # noqa: BLE001 — reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert not errors, errors
            for i, w in enumerate(want):
                assert torch.equal(got[i], w), f"thread {i} with {budget_slots} slots"
            st = m.moe_stats()
            assert st["active_requests"] == 0
            assert st["eamc_size"] == 2 * len(PROMPTS)
        finally:
            m.close()


# -- interrupts ----------------------------------------------------------------------------


class _Boom(TextStreamer):
    def __init__(self, tok, after: int, exc: type[BaseException]):
        super().__init__(tok)
        self.n, self.after, self.exc = 0, after, exc

    def put(self, value):
        self.n += 1
        if self.n > self.after:
            raise self.exc("interrupted by the test")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_generate_leaves_the_model_usable(ckpt, exc):
    tok = AutoTokenizer.from_pretrained(ckpt)
    plain = tm.auto_class("mixtral").from_pretrained(ckpt).eval()
    m = mi.from_pretrained(ckpt, device_memory=2 * 18432)
    try:
        with pytest.raises(exc, match="interrupted by the test"):
            m.generate(input_ids=PROMPTS[0], max_new_tokens=20, min_new_tokens=20, do_sample=False, streamer=_Boom(tok, 6, exc))
        st = m.moe_stats()
        assert st["active_requests"] == 0, "the interrupted request was retired"
        assert m.moe_engine.max_pin == st["slots"]
        for p in PROMPTS:
            assert torch.equal(_greedy(m, p), _greedy(plain, p))
    finally:
        m.close()


# -- teardown ------------------------------------------------------------------------------------


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_repeated_load_close_returns_goroutines_and_memory(ckpt):
    def cycle(close: bool) -> None:
        m = mi.from_pretrained(ckpt, device_memory=4 << 20)
        _greedy(m, PROMPTS[1], 4)
        if close:
            m.close()
        del m
        gc.collect()

    cycle(True)  # warm up lazily imported code and allocator pools
    base_rt, base_rss = _native.runtime_stats(), _rss()
    for i in range(12):
        cycle(close=i % 2 == 0)  # half closed explicitly, half by garbage collection
    gc.collect()
    rt, rss = _native.runtime_stats(), _rss()
    print(f"goroutines {base_rt['goroutines']} -> {rt['goroutines']}, engines {rt['engines']}, RSS {base_rss >> 20} -> {rss >> 20} MiB")
    assert rt["engines"] == base_rt["engines"] == 0
    assert rt["goroutines"] <= base_rt["goroutines"]
    assert rss - base_rss < 24 << 20


def test_config_mismatch_of_num_experts(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    cfg = AutoConfig.from_pretrained(bad)
    cfg.num_local_experts = 6  # the checkpoint has 4
    cfg.save_pretrained(bad)
    with pytest.raises(mi.CheckpointFormatError, match=r"model\.safetensors: MoE module 'model\.layers\.0\.block_sparse_moe' has 4 experts .* but config\.num_local_experts is 6"):
        mi.from_pretrained(bad)
