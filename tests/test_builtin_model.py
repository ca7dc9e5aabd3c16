"""The built-in trained model ships in the package, loads with no network,
generates, and matches transformers token for token (CPU, float32)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_infinity as mi
from moe_infinity.builtin import builtin_model_dir, packaged_model_dir

PROMPTS = {
    "go": "func (b *Buffer) Write(p []byte) (n int, err error) {\n",
    "python": 'def read_config(path):\n    """Read the configuration file',
    "prose": "Permission is hereby granted, free of charge, to any person",
}


def test_the_trained_model_ships_in_the_package():
    path = packaged_model_dir()
    assert path is not None, "python/moe_infinity/builtin_model is missing (tools/train_builtin.py makes it)"
    assert builtin_model_dir() == path
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 25 * 2**20, f"{size} bytes"


def test_builtin_model_path_is_public_and_loads():
    assert "builtin_model_path" in mi.__all__
    path = mi.builtin_model_path()
    assert path == builtin_model_dir()
    assert (path / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    text = "def read_config(path):"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_builtin_model_generates_offline_and_matches_transformers():
    path = builtin_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A third of the experts fit: generation streams and evicts.
    ours = mi.from_pretrained(path, dtype=torch.float32, device="cpu", device_memory="3MiB")
    try:
        assert ours.moe_stats()["plan"]["slots"] < 32
        for text in PROMPTS.values():
            ids = tok(text, return_tensors="pt").input_ids
            kw = dict(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            want = plain.generate(**kw)
            got = ours.generate(**kw)
            assert torch.equal(got, want)
            assert len(tok.decode(got[0, ids.shape[1] :])) > 0
    finally:
        ours.close()
