"""Quantized checkpoints in a format moe_infinity does not serve (GPTQ, AWQ,
bitsandbytes, ...) are refused at load with an UnsupportedError that names
the quantization found and what moe_infinity serves, before any engine or
model is built. FP8 and MXFP4 checkpoints are served: tests/test_quantized.py."""

from __future__ import annotations

import json

import pytest

import moe_infinity as mi
import tiny_models as tm

QUANT_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "made_up": {"quant_method": "made_up_method"},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return tm.save(tm.build("qwen3_moe"), tmp_path_factory.mktemp("plain") / "m")


def with_quantization(saved, tmp_path, qc):
    d = tmp_path / "q"
    d.mkdir()
    for f in saved.iterdir():
        (d / f.name).symlink_to(f)
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("method", sorted(QUANT_CONFIGS))
def test_quantized_checkpoint_is_unsupported_naming_method_and_what_is_served(saved, tmp_path, method):
    d = with_quantization(saved, tmp_path, QUANT_CONFIGS[method])
    with pytest.raises(mi.UnsupportedError) as e:
        mi.from_pretrained(d, device="cpu")
    msg = str(e.value)
    assert repr(QUANT_CONFIGS[method]["quant_method"]) in msg
    assert "unquantized" in msg and "bfloat16" in msg
    assert "fp8" in msg and "mxfp4" in msg and "device='cpu'" in msg, "names the quantized formats served"
    assert isinstance(e.value, mi.MoEInfinityError)


@pytest.mark.parametrize("kw", [{"load_in_8bit": True}, {"load_in_4bit": True}, {"quantization_config": {"quant_method": "bitsandbytes"}}])
def test_quantizing_at_load_is_unsupported(saved, kw):
    with pytest.raises(mi.UnsupportedError, match=next(iter(kw))):
        mi.from_pretrained(saved, device="cpu", **kw)


@pytest.mark.parametrize("qc", [QUANT_CONFIGS["gptq"], {"quant_method": "fp8", "weight_block_size": [128, 128]}], ids=["gptq", "fp8"])
def test_offload_refuses_a_quantized_model(qc):
    model = tm.build("qwen3_moe")
    model.config.quantization_config = dict(qc)
    with pytest.raises(mi.UnsupportedError, match=repr(qc["quant_method"])):
        mi.offload(model, device="cpu")
    assert any("experts" in n for n, _ in model.named_parameters()), "the model is left untouched"


def test_unquantized_checkpoint_still_loads(saved):
    model = mi.from_pretrained(saved, device="cpu", device_memory="64MiB")
    try:
        assert getattr(model.config, "quantization_config", None) is None
    finally:
        model.close()
