"""Quantized checkpoints served as they ship, on the CPU: FP8 block-scaled
(Qwen3-MoE-FP8, DeepSeek-V3) and MXFP4 (gpt-oss).

The tests build tiny checkpoints whose tensor names, dtypes, extra tensors
and ``quantization_config`` follow the real releases' published configs and
index files (never their weights), then check that moe_infinity's greedy
tokens and logits are identical to transformers loading the same checkpoint
with its dequantizing path (``FineGrainedFP8Config(dequantize=True)``,
``Mxfp4Config(dequantize=True)``), and that the engine's cache holds the
experts compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

import moe_infinity as mi
from moe_infinity import loading
import tiny_models as tm

NEW_TOKENS = 12
FP8_BLOCK = (128, 128)

#: The quantization_config blocks of the real releases (config.json).
QWEN3_FP8_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}
DEEPSEEK_V3_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}
GPT_OSS_QC = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}


# -- quantizers (what the releases' conversion scripts do) -------------------------


def fp8_block_quantize(w: torch.Tensor, block=FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block FP8: a float32 scale (weight_scale_inv) per block of
    ``block`` rows × cols, partial blocks at the edges; values / scale in
    float8_e4m3fn."""
    rows, cols = w.shape
    sr, sc = -(-rows // block[0]), -(-cols // block[1])
    pad = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32)
    pad[:rows, :cols] = w.float()
    tiles = pad.reshape(sr, block[0], sc, block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(sr * block[0], sc * block[1])[:rows, :cols].contiguous(), scale.float().contiguous()


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's MXFP4 of a [rows, cols] weight: per 32 values of a row one
    e8m0 scale, each value the nearest e2m1 code; blocks [rows, cols/32, 16]
    (element 2k in the low nibble of byte k), scales [rows, cols/32]."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // 32, 32)
    amax = g.abs().amax(dim=-1).clamp(min=2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    v = g / torch.exp2(exp)[..., None]
    code = (v.abs()[..., None] - _E2M1).abs().argmin(dim=-1) | ((v < 0).long() << 3)
    code = code.to(torch.uint8).reshape(rows, cols // 32, 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


# -- checkpoints ------------------------------------------------------------------


def _write(directory: Path, tensors: dict[str, torch.Tensor], qc: dict, shards: int = 2) -> Path:
    """Replaces the checkpoint's weights by ``tensors`` in ``shards`` files
    with a model.safetensors.index.json, as the releases ship, and adds
    ``quantization_config`` to config.json."""
    for f in list(directory.glob("*.safetensors")) + list(directory.glob("*.index.json")):
        f.unlink()
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _fp8_all(sd: dict[str, torch.Tensor], quantize) -> dict[str, torch.Tensor]:
    """FP8 for every 2-D weight quantize(name) selects, with its scales."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and quantize(k):
            q, s = fp8_block_quantize(v)
            out[k] = q
            out[k.removesuffix("weight") + "weight_scale_inv"] = s
        else:
            out[k] = v
    return out


def _saved_state(model, directory: Path) -> dict[str, torch.Tensor]:
    """The model saved with save_pretrained (the Hub layout), read back."""
    tm.save(model, directory)
    sd = {}
    for f in sorted(directory.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def qwen3_fp8(directory: Path) -> Path:
    """Qwen3-MoE-FP8 (Qwen3-30B-A3B-FP8's layout): every projection of
    attention and experts FP8 with [128, 128] block scales; router gates,
    norms, embeddings and lm_head as they were. moe_intermediate_size 96 is
    not a multiple of the block (one partial block)."""
    model = tm.build(
        "qwen3_moe", dtype=torch.bfloat16, hidden_size=256, moe_intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
    )
    sd = _saved_state(model, directory)
    return _write(directory, _fp8_all(sd, lambda k: k.endswith("proj.weight")), QWEN3_FP8_QC)


def deepseek_v3_fp8(directory: Path) -> Path:
    """DeepSeek-V3 (its layout): the first layer dense, shared experts and
    routed experts FP8 with [128, 128] block scales, the MLA projections
    too; the gate's e_score_correction_bias (float32, not zero) and a
    multi-token-prediction layer past num_hidden_layers (enorm, hnorm,
    eh_proj, shared_head, its own experts), which transformers does not
    load."""
    layers = 3
    model = tm.build(
        "deepseek_v3", dtype=torch.bfloat16, hidden_size=256, moe_intermediate_size=64, intermediate_size=160,
        num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1,
    )
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.linspace(-0.05, 0.05, b.numel()))
    sd = _saved_state(model, directory)
    assert any(k.endswith("mlp.gate.e_score_correction_bias") for k in sd)
    # The MTP layer: a copy of the last decoder layer's tensors under the
    # next index, plus its own heads.
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    for k in [k for k in sd if k.startswith(last)]:
        sd[mtp + k[len(last) :]] = sd[k].clone()
    hidden = sd["model.embed_tokens.weight"].shape[1]
    sd[mtp + "enorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd[mtp + "hnorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd[mtp + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, dtype=torch.bfloat16) * 0.02
    sd[mtp + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    sd[mtp + "shared_head.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    sd[mtp + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    quantize = lambda k: "proj" in k and not k.endswith(("embed_tokens.weight", "head.weight"))  # noqa: E731
    return _write(directory, _fp8_all(sd, quantize), DEEPSEEK_V3_QC)


def gpt_oss_mxfp4(directory: Path) -> Path:
    """gpt-oss (its layout): fused experts as MXFP4 gate_up_proj_blocks
    [E, 2I, H/32, 16] / gate_up_proj_scales [E, 2I, H/32] (and down_proj's),
    the biases in bfloat16; attention, router, embeddings and lm_head
    unquantized (modules_to_not_convert)."""
    model = tm.build("gpt_oss", dtype=torch.bfloat16, hidden_size=64, intermediate_size=64, head_dim=16, num_local_experts=4)
    return save_gpt_oss_mxfp4(model, directory)


def save_gpt_oss_mxfp4(model, directory: Path) -> Path:
    """Saves a gpt-oss model as the releases ship it: the experts' fused
    projections as MXFP4 blocks and scales, everything else as is."""
    sd = _saved_state(model, directory)
    out = {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # In memory [E, in, out]; stored transposed, [E, out, in/32, 16].
            bs, ss = zip(*(mxfp4_quantize(v[e].T) for e in range(v.shape[0])))
            out[k + "_blocks"], out[k + "_scales"] = torch.stack(bs), torch.stack(ss)
        else:
            out[k] = v
    return _write(directory, out, GPT_OSS_QC)


BUILDERS = {"qwen3_moe-fp8": qwen3_fp8, "deepseek_v3-fp8": deepseek_v3_fp8, "gpt_oss-mxfp4": gpt_oss_mxfp4}
DEQUANTIZE = {"qwen3_moe-fp8": FineGrainedFP8Config, "deepseek_v3-fp8": FineGrainedFP8Config, "gpt_oss-mxfp4": Mxfp4Config}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def ckpt(request, tmp_path_factory):
    name = request.param
    path = BUILDERS[name](tmp_path_factory.mktemp(name) / "m")
    ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=DEQUANTIZE[name](dequantize=True)).eval()
    prompt = torch.randint(3, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ref(input_ids=prompt).logits
        tokens = ref.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return name, path, prompt, logits, tokens


def _check(model, prompt, logits, tokens):
    with torch.no_grad():
        got = model(input_ids=prompt).logits
        gen = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.dtype == logits.dtype
    assert torch.equal(got, logits), f"logits differ by up to {(got.float() - logits.float()).abs().max().item()}"
    assert torch.equal(gen, tokens)


def test_greedy_tokens_and_logits_are_transformers_dequantizing_load(ckpt):
    name, path, prompt, logits, tokens = ckpt
    model = mi.from_pretrained(path, device="cpu", device_memory="256MiB")
    try:
        _check(model, prompt, logits, tokens)
        plan = model.moe_runtime.plan
        method = name.split("-")[1]
        assert plan["views"]["dequant"] == method
        # The cache holds the experts as stored: FP8 one byte per value,
        # MXFP4 half a byte; the views hold them in bfloat16.
        stored = {r["dtype"] for r in plan["stored"]["regions"]}
        assert ("float8_e4m3fn" if method == "fp8" else "uint8") in stored
        assert plan["stored"]["source_bytes"] * (1.8 if method == "fp8" else 3.0) < plan["views"]["bytes"]
        st = model.moe_stats()
        assert st["misses"] > 0
    finally:
        model.close()


def test_a_cache_smaller_than_one_layer_streams_the_experts_through_few_views(ckpt):
    name, path, prompt, logits, tokens = ckpt
    probe = mi.from_pretrained(path, device="cpu", device_memory="256MiB")
    slot, view = probe.moe_runtime.plan["slot_bytes"], probe.moe_runtime.plan["views"]["bytes"]
    probe.close()
    # Room for 3 slots and 1 view (a quarter of the budget at most).
    model = mi.from_pretrained(path, device="cpu", device_memory=3 * slot + view)
    try:
        plan = model.moe_runtime.plan
        assert plan["views"]["count"] == 1 and plan["slots"] == 3, plan["views"]
        _check(model, prompt, logits, tokens)
        assert model.moe_stats()["evictions"] > 0
    finally:
        model.close()


def test_quantized_checkpoint_on_a_gpu_passes_the_python_checks(ckpt):
    """How a GPU computes quantized experts (dequantized views, or the FP8
    kernels with quantized_kernels) is the engine's choice: Python only
    reads the layout facts, for any device."""
    _, path, *_ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    conf = type("C", (), {"quantization_config": cfg["quantization_config"]})()
    got = loading._check_quantization(conf, {}, torch.device("cuda", 0))
    assert got == loading._check_quantization(conf, {}, torch.device("cpu"))
    assert got["quant_method"] == cfg["quantization_config"]["quant_method"]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_reference_kernels_compute_quantized_experts_from_the_compressed_slots(ckpt):
    """With the CPU reference of the GPU kernels on, quantized experts run on
    the kernels straight from their compressed bytes (each weight dequantized
    as transformers does, so only the sums' order differs from transformers'
    code): in mapped mode, reading each expert from its slot or in place
    from the checkpoint's tensors (FP8 weights and their separate scale
    tensors; gpt-oss's MXFP4 blocks, e8m0 scales and bfloat16 biases, for
    its own kernels: clamped, biased SwiGLU with interleaved gate/up), and
    with mapped mode off from the slots alone. Logits within the tolerance
    of the bf16 kernel tests, the same greedy tokens."""
    name, path, prompt, logits, tokens = ckpt
    model = mi.from_pretrained(path, device="cpu", device_memory="256MiB", engine_options={"reference_kernels": True})
    try:
        ex = model.moe_runtime.plan["executor"]
        assert ex["kernels"] and ex["quant"] == name.split("-")[1] and ex["mapped"], ex
        with torch.no_grad():
            got = model(input_ids=prompt).logits
            gen = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        paths = model.moe_stats()["paths"]
        assert paths["mapped"] >= (NEW_TOKENS + 1) * len(model.moe_runtime.layers), paths
        assert model.moe_stats()["misses"] > 0, "some experts were read in place"
        agree = (got.argmax(-1) == logits.argmax(-1)).float().mean().item()
        print(f"{name} reference kernels (mapped) vs transformers dequantized: top-1 {agree:.4f}, rel {_relative(got, logits):.2e}, bitwise {torch.equal(got, logits)}")
        assert agree >= 0.99 and _relative(got, logits) <= 1e-2, (agree, _relative(got, logits))
        assert torch.equal(gen, tokens)
        model.moe_runtime.set_mapped(False)
        model.moe_tune(flush=True)
        with torch.no_grad():
            slots = model(input_ids=prompt).logits
            gen = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        after = model.moe_stats()["paths"]
        assert after["mapped"] == paths["mapped"] and after["kernels"] >= paths["kernels"] + (NEW_TOKENS + 1) * len(model.moe_runtime.layers)
        assert torch.equal(slots, got), "mapped mode and the slots compute the same bits"
        assert torch.equal(gen, tokens)
    finally:
        model.close()


def test_fp8_without_block_size_is_refused(tmp_path):
    path = qwen3_fp8(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mi.UnsupportedError, match="weight_block_size"):
        mi.from_pretrained(path, device="cpu")


def test_a_transformers_without_the_dequantize_option_stops_the_load(monkeypatch):
    import transformers

    from moe_infinity import _compat

    class OldConfig:  # takes unknown keywords silently, as releases before the option did
        def __init__(self, **kwargs):
            pass

    assert _compat.dequantizing_config("fp8", [128, 128]).dequantize is True
    assert _compat.dequantizing_config("mxfp4").dequantize is True
    monkeypatch.setattr(transformers, "Mxfp4Config", OldConfig)
    with pytest.raises(mi.UnsupportedError, match="Mxfp4Config of transformers"):
        _compat.dequantizing_config("mxfp4")


def _padded_dequantize_one(orig):
    """transformers' FP8 dequantization applied to the weight zero-padded to
    whole weight_block_size blocks, then cropped: the format's meaning (and
    what transformers' FP8 kernels and DeepSeek's reference compute) for a
    shape with a partial block."""

    def dequantize_one(self, quantized, scales, output_dtype=None):
        rows, cols = quantized.shape[-2:]
        sr, sc = scales.shape[-2:]
        pad = torch.zeros(sr * FP8_BLOCK[0], sc * FP8_BLOCK[1], dtype=torch.uint8)
        pad[:rows, :cols] = quantized.view(torch.uint8)
        return orig(self, pad.view(torch.float8_e4m3fn), scales, output_dtype)[:rows, :cols]

    return dequantize_one


def test_partial_blocks_past_the_first_follow_weight_block_size(tmp_path, monkeypatch):
    """transformers 5.25's dequantizing load derives the block from the
    scale grid (rows // grid rows), so for a dimension with a partial block
    after a full one (160 = 128 + 32) it scales rows 80-127 with the second
    block's scale. The engine follows weight_block_size, as the format and
    transformers' own FP8 kernels do: its output is transformers' loading
    with the padded dequantization. (That transformers as shipped differs is
    not asserted: a fixed release must not turn this test red.)"""
    from transformers.integrations import finegrained_fp8

    if not hasattr(getattr(finegrained_fp8, "Fp8Dequantize", None), "_dequantize_one"):
        pytest.skip("this transformers release has no Fp8Dequantize._dequantize_one to pad (the reference patches it)")

    model = tm.build(
        "qwen3_moe", dtype=torch.bfloat16, hidden_size=256, moe_intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
    )
    path = tmp_path / "m"
    sd = _saved_state(model, path)
    _write(path, _fp8_all(sd, lambda k: k.endswith("proj.weight")), QWEN3_FP8_QC)
    prompt = torch.randint(3, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))

    def ref_logits():
        ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
        with torch.no_grad():
            return ref(input_ids=prompt).logits

    monkeypatch.setattr(finegrained_fp8.Fp8Dequantize, "_dequantize_one", _padded_dequantize_one(finegrained_fp8.Fp8Dequantize._dequantize_one))
    padded = ref_logits()
    ours = mi.from_pretrained(path, device="cpu", device_memory="64MiB")
    try:
        with torch.no_grad():
            got = ours(input_ids=prompt).logits
    finally:
        ours.close()
    assert torch.equal(got, padded)
