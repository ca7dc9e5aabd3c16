"""expert_dtype="fp8": a bfloat16 checkpoint's routed experts compressed once
to block FP8 in the offload dir and served as FP8 checkpoints are.

Checks: the written shards are DeepSeek's on-disk form and dequantize to the
source within FP8's error; serving them equals transformers loading those
shards with FineGrainedFP8Config(dequantize=True); a second load reuses
them and a changed checkpoint rewrites them; a loose quality floor on the
built-in model; the errors.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, FineGrainedFP8Config

import moe_infinity as mi
from moe_infinity import loading

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 128


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """A copy of the built-in model (bfloat16 Mixtral; tests may change it)."""
    dst = tmp_path_factory.mktemp("builtin") / "m"
    shutil.copytree(mi.builtin_model_path(), dst)
    return dst


@pytest.fixture(scope="module")
def compressed(builtin, tmp_path_factory):
    """The built-in model loaded with expert_dtype='fp8', and its offload dir."""
    offload = tmp_path_factory.mktemp("offload")
    model = mi.from_pretrained(builtin, device="cpu", expert_dtype="fp8", offload_dir=offload, device_memory="64MiB")
    yield model, offload
    model.close()


def _shard_tensors(offload: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((offload / loading.FP8_EXPERTS_DIR).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _source(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_the_shards_are_block_fp8_of_every_routed_expert(builtin, compressed):
    model, offload = compressed
    shards, src = _shard_tensors(offload), _source(builtin)
    experts = {k: v for k, v in src.items() if ".experts." in k}
    assert set(shards) == set(experts) | {k.removesuffix("weight") + "weight_scale_inv" for k in experts}
    for name, w in experts.items():
        q, s = shards[name], shards[name.removesuffix("weight") + "weight_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
        assert s.dtype == torch.float32 and s.shape == (-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK))
    plan = model.moe_runtime.plan
    assert plan["views"]["dequant"] == "fp8"
    assert "float8_e4m3fn" in {r["dtype"] for r in plan["stored"]["regions"]}
    assert plan["stored"]["source_bytes"] * 1.9 < plan["views"]["bytes"], "the cache holds half the bytes of bfloat16"


def test_served_experts_round_trip_to_the_source_within_fp8_error(builtin, compressed):
    """The engine's views (the shards through its DequantFP8Block) against
    the bfloat16 source: within half an FP8 step of each value (2^-4
    relative), or of the block's subnormal step near zero."""
    model, offload = compressed
    rt, src, shards = model.moe_runtime, _source(builtin), _shard_tensors(offload)
    layer = rt.layers[1]
    for e in (0, 5):
        slots, lease = rt.engine.acquire(layer.index, [e])
        try:
            view = rt.views[slots[0]]
            got_gu, got_down = view["gate_up_proj"].float().clone(), view["down_proj"].float().clone()
        finally:
            rt.engine.release(lease)
        p = f"{layer.prefix}.experts.{e}."
        want_gu = torch.cat([src[p + "w1.weight"], src[p + "w3.weight"]]).float()
        want_down = src[p + "w2.weight"].float()
        scale = shards[p + "w2.weight_scale_inv"].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        scale = scale[: want_down.shape[0], : want_down.shape[1]]
        for got, want, tol in ((got_down, want_down, want_down.abs() / 16 + scale / 1024), (got_gu, want_gu, want_gu.abs() / 16 + 1e-5)):
            assert got.shape == want.shape
            # bfloat16 rounding of the dequantized value adds at most 2^-9 relative.
            assert bool(((got - want).abs() <= tol * 1.01 + got.abs() / 256).all()), float((got - want).abs().max())
        assert not torch.equal(got_down, want_down), "the experts really are FP8"


def test_serving_equals_transformers_loading_the_written_fp8_shards(builtin, compressed, tmp_path):
    """The shards, put back into the checkpoint with quantization_config as
    the FP8 releases ship it, loaded by transformers' dequantizing path:
    the same logits and greedy tokens, bit for bit."""
    model, offload = compressed
    ckpt = tmp_path / "fp8"
    ckpt.mkdir()
    for f in builtin.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, ckpt / f.name)
    dense = {k: v for k, v in _source(builtin).items() if ".experts." not in k}
    save_file({**dense, **_shard_tensors(offload)}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ref = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    prompt = torch.randint(6, 4096, (1, 24), generator=torch.Generator().manual_seed(5))
    kw = dict(input_ids=prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        want_logits, got_logits = ref(input_ids=prompt).logits, model(input_ids=prompt).logits
        want_tokens, got_tokens = ref.generate(**kw), model.generate(**kw)
    assert torch.equal(got_logits, want_logits), float((got_logits.float() - want_logits.float()).abs().max())
    assert torch.equal(got_tokens, want_tokens)


def _quality():
    spec = importlib.util.spec_from_file_location("fp8_quality", ROOT / "benchmarks" / "fp8_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_floor_on_the_builtin_model(builtin, compressed):
    """A floor that a broken quantizer cannot pass (BENCHMARKS.md has the
    measured numbers): teacher-forced top-1 agreement with the bfloat16
    experts on text the model never saw (this repository's README)."""
    model, _ = compressed
    q = _quality()
    tok = AutoTokenizer.from_pretrained(builtin)
    ids = tok((ROOT / "README.md").read_text(), return_tensors="pt").input_ids[0]
    windows = [ids[i : i + 128].view(1, -1) for i in range(0, 384, 128)]
    base = mi.from_pretrained(builtin, device="cpu", device_memory="64MiB")
    try:
        ref = q.teacher_forced(base, windows)
    finally:
        base.close()
    got = q.compare(ref, q.teacher_forced(model, windows), windows)
    assert got["positions"] == 384
    assert got["top1_agreement"] >= 0.9, got
    assert got["ppl_ratio"] <= 1.1, got


def _mtimes(offload: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in (offload / loading.FP8_EXPERTS_DIR).iterdir()}


def test_a_second_load_reuses_the_shards_and_a_changed_checkpoint_rewrites_them(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(mi.builtin_model_path(), src)
    offload = tmp_path / "offload"
    prompt = torch.randint(6, 4096, (1, 8), generator=torch.Generator().manual_seed(1))

    def load_and_run():
        m = mi.from_pretrained(src, device="cpu", expert_dtype="fp8", offload_dir=offload, device_memory="64MiB")
        try:
            with torch.no_grad():
                return m(input_ids=prompt).logits
        finally:
            m.close()

    first = load_and_run()
    before = _mtimes(offload)
    assert any(n.endswith(".safetensors") for n in before)
    assert torch.equal(load_and_run(), first)
    assert _mtimes(offload) == before, "a second load writes nothing"

    # Same names, shapes and header; one expert's weights change.
    old = _shard_tensors(offload)
    sd = _source(src)
    name = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    assert name in sd
    sd[name] = sd[name] * 2
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    load_and_run()
    after = _mtimes(offload)
    assert after.keys() == before.keys()
    assert all(after[n] > before[n] for n in after if n.endswith(".safetensors")), "the shards are rewritten"
    # Doubling is exact in bfloat16, so the new copy has the same FP8 codes and twice the scales.
    new, scale = _shard_tensors(offload), name.removesuffix("weight") + "weight_scale_inv"
    assert torch.equal(new[scale], 2 * old[scale])
    assert torch.equal(new[name].view(torch.uint8), old[name].view(torch.uint8))


def test_expert_dtype_values_and_refusals(builtin, tmp_path):
    with pytest.raises(mi.InvalidArgumentError, match="valid values: None or 'auto'.*'fp8'"):
        mi.from_pretrained(builtin, device="cpu", expert_dtype="int4")
    with pytest.raises(mi.InvalidArgumentError, match="expert_dtype"):
        mi.from_pretrained(builtin, device="cpu", expert_dtype=torch.float8_e4m3fn)
    with pytest.raises(mi.InvalidArgumentError, match="offload_dir"):
        mi.from_pretrained(builtin, device="cpu", expert_dtype="fp8")
    # "auto" is the checkpoint's own dtype: nothing is compressed.
    m = mi.from_pretrained(builtin, device="cpu", expert_dtype="auto", offload_dir=tmp_path / "o", device_memory="64MiB")
    try:
        assert "views" not in m.moe_runtime.plan or not m.moe_runtime.plan["views"].get("dequant")
    finally:
        m.close()
    assert not (tmp_path / "o" / loading.FP8_EXPERTS_DIR).exists()
    # Already quantized.
    from test_quantized import qwen3_fp8

    fp8 = qwen3_fp8(tmp_path / "q")
    with pytest.raises(mi.InvalidArgumentError, match="already quantized.*quant_method='fp8'"):
        mi.from_pretrained(fp8, device="cpu", expert_dtype="fp8", offload_dir=tmp_path / "o2")


# -- offload(model, expert_dtype="fp8"): the same compression, in memory --------------------


def _bench_model():
    """The decode benchmark's tiny preset (random bfloat16 weights, seeded):
    Mixtral-shaped with intermediate 128, so the fused gate_up_proj's 128-row
    blocks are w1's and w3's blocks on disk."""
    from moe_infinity.bench import build

    model, _ = build("tiny", "cpu")
    return model


@pytest.mark.parametrize("engine_options", [{}, {"reference_kernels": True}], ids=["views", "reference-kernels"])
def test_offload_fp8_equals_from_pretrained_fp8_of_the_same_weights(tmp_path, engine_options):
    """offload(expert_dtype="fp8") quantizes the in-memory experts with the
    quantizer from_pretrained(expert_dtype="fp8") runs on the checkpoint:
    the same FP8 codes and scales, so the same logits and greedy tokens, bit
    for bit, through transformers' code on dequantized views and through the
    CPU reference of the FP8 kernels."""
    ckpt = tmp_path / "ckpt"
    _bench_model().save_pretrained(ckpt)
    disk = mi.from_pretrained(ckpt, device="cpu", device_memory="300KiB", expert_dtype="fp8", offload_dir=tmp_path / "off", engine_options=engine_options)
    mem = mi.offload(_bench_model(), device="cpu", device_memory="300KiB", expert_dtype="fp8", engine_options=dict(engine_options))
    try:
        for m in (disk, mem):
            assert m.moe_runtime.plan["views"]["dequant"] == "fp8"
            assert m.moe_runtime.plan["executor"].get("quant") == ("fp8" if engine_options else None)
        prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
        kw = dict(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with torch.no_grad():
            want, got = disk(input_ids=prompt).logits, mem(input_ids=prompt).logits
            want_tokens, got_tokens = disk.generate(**kw), mem.generate(**kw)
        assert torch.equal(got, want), float((got.float() - want.float()).abs().max())
        assert torch.equal(got_tokens, want_tokens)
        assert mem.moe_stats()["misses"] > 0, "the experts came through the cache"
    finally:
        disk.close()
        mem.close()


def test_offload_fp8_holds_half_the_bytes_and_releases_the_bf16_experts():
    bf16 = mi.offload(_bench_model(), device="cpu", device_memory="300KiB")
    model = _bench_model()
    fp8 = mi.offload(model, device="cpu", device_memory="300KiB", expert_dtype="fp8")
    try:
        a, b = bf16.moe_stats()["plan"]["slot_bytes"], fp8.moe_stats()["plan"]["slot_bytes"]
        assert 0.45 * a <= b <= 0.55 * a, (a, b)
        stored = fp8.moe_runtime.plan["stored"]
        assert {r["dtype"] for r in stored["regions"]} >= {"float8_e4m3fn", "float32"}
        assert fp8.moe_engine._host == {}, "every bfloat16 expert was released once its layer was compressed"
        assert not any(".experts." in n for n, _ in model.named_parameters()), "the model keeps no expert parameters"
        prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            want, got = bf16(input_ids=prompt).logits.float(), fp8(input_ids=prompt).logits.float()
        assert not torch.equal(got, want), "the experts really are FP8"
        assert ((got - want).norm() / want.norm()).item() < 0.1, "and close to bfloat16"
    finally:
        bf16.close()
        fp8.close()


def test_offload_fp8_refusals():
    with pytest.raises(mi.InvalidArgumentError, match="valid values"):
        mi.offload(_bench_model(), device="cpu", expert_dtype="fp4")
