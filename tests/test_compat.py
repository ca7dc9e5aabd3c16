"""What the installed transformers release must provide, and what happens
when a release changes it: an error that names the version, never different
output."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import moe_infinity as mi
import tiny_models as tm
from moe_infinity import _compat

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_range(dist: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{dist}([^"]*)"', text)
    assert m, f"pyproject.toml declares no {dist} requirement"
    return m.group(1).replace(" ", "")


def test_supported_range_is_the_one_pyproject_declares():
    got = _compat.supported_range("transformers")
    if got == "unknown":
        pytest.fail("moe_infinity is not installed (pip install -e .), so its declared range cannot be read")
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(got) == SpecifierSet(_pyproject_range("transformers"))
    assert SpecifierSet(_compat.supported_range("torch")) == SpecifierSet(_pyproject_range("torch"))


def test_installed_versions_are_inside_the_declared_range():
    from packaging.specifiers import SpecifierSet

    for dist, version in (("transformers", transformers.__version__), ("torch", torch.__version__.split("+")[0])):
        spec = SpecifierSet(_pyproject_range(dist))
        assert version in spec, f"{dist} {version} is outside the range pyproject.toml declares ({spec}); CI tests only that range"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_decode_with_the_cache_keyword_of_this_release_warns_nothing(model_type):
    model = tm.build(model_type, seed=3)
    ids = torch.tensor([[5, 6, 7]])
    from transformers import DynamicCache

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(input_ids=ids, **_compat.cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, **_compat.cache_kwargs(model, _compat.output_cache(out)), use_cache=True)
    full = model(input_ids=torch.cat([ids, nxt], dim=1)).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_experts_calling_convention_of_every_fused_family_is_the_one_the_runtime_feeds():
    for model_type in sorted(tm.FUSED_IN_MEMORY):
        model = tm.build(model_type, seed=1)
        experts = [m for n, m in model.named_modules() if n.endswith(".experts")]
        assert experts, f"{model_type}: no fused experts module in transformers {transformers.__version__}"
        fwd = type(experts[0]).forward
        _compat.check_experts_forward(experts[0], getattr(fwd, "__wrapped__", fwd))


def test_a_changed_experts_calling_convention_stops_the_load_naming_the_version(monkeypatch, tmp_path):
    model = tm.build("mixtral", seed=4)
    path = tm.save(model, tmp_path / "m")
    cls = type(next(m for n, m in model.named_modules() if n.endswith(".experts")))

    def forward(self, hidden_states, routing_map, top_k_weights):  # a release that renamed an argument
        raise AssertionError("must not run")

    monkeypatch.setattr(cls, "forward", forward)
    with pytest.raises(mi.UnsupportedError) as err:
        tm.load(path, slots=2, slot_bytes=1 << 16)
    msg = str(err.value)
    assert f"transformers {transformers.__version__}" in msg
    assert "routing_map" in msg and "top_k_index" in msg
    assert "supports transformers" in msg
