"""benchmarks/peers/write_gguf.py: the Q8_0 quantizer is gguf's, byte for
byte, and the tiny preset's GGUF holds the model's own weights under
llama.cpp's names (read back with gguf's reader and dequantized). Skipped
where PyPI's gguf package is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
import write_gguf as W  # noqa: E402


@pytest.mark.parametrize(
    "x",
    [
        (torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16(),
        torch.cat([torch.zeros(1, 32), torch.ones(1, 32)], 1),  # an all-zero block: scale 0
        (torch.arange(-64, 64).float() / 2 * (127 / 32)).reshape(4, 32),  # x/scale on .5: rounding away from zero
        torch.randn(50, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-20, 3, 50).unsqueeze(1),
    ],
    ids=["bf16", "zero-block", "half-ties", "wide-range"],
)
def test_q8_0_matches_gguf_quants(x):
    got = W.q8_0(x, torch.device("cpu"), chunk=96)  # small chunks: the boundaries too
    want = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_q8_0_refuses_a_row_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        W.q8_0(torch.zeros(2, 48), torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moe_infinity.bench import build

    model, cfg = build("tiny", "cpu")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    W.write_gguf(model, cfg, "tiny", path, torch.device("cpu"), "torch")
    return model, cfg, gguf.GGUFReader(path)


def _tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return data.reshape(tuple(int(n) for n in reversed(t.shape)))


def test_tiny_gguf_names_types_and_metadata(tiny):
    model, cfg, r = tiny
    names = {t.name for t in r.tensors}
    L = cfg.num_hidden_layers
    assert len(names) == 3 + L * 10
    for i in range(L):
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            assert f"blk.{i}.{n}.weight" in names
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    exps = next(t for t in r.tensors if t.name == "blk.0.ffn_down_exps.weight")
    # GGML order: ne = {n_ff, n_embd, n_expert}
    assert [int(n) for n in exps.shape] == [cfg.intermediate_size, cfg.hidden_size, cfg.num_local_experts]
    f = r.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == "llama"
    assert int(f["llama.expert_count"].parts[-1][0]) == cfg.num_local_experts
    assert int(f["llama.expert_used_count"].parts[-1][0]) == cfg.num_experts_per_tok
    assert len(f["tokenizer.ggml.tokens"].data) == cfg.vocab_size


def test_tiny_gguf_holds_the_models_weights(tiny):
    model, cfg, r = tiny
    p = dict(model.named_parameters())
    I = cfg.intermediate_size

    def close(name, want):
        got = _tensor(r, name)
        want = want.float().numpy()
        assert got.shape == want.shape, name
        # Q8_0: at most half a step (max|block| / 127 / 2) from the value
        tol = np.abs(want).max() / 127 / 2 + 1e-6
        assert np.abs(got - want).max() <= tol, name

    gu = p["model.layers.2.mlp.experts.gate_up_proj"]
    close("blk.2.ffn_gate_exps.weight", gu[:, :I])
    close("blk.2.ffn_up_exps.weight", gu[:, I:])
    close("blk.2.ffn_down_exps.weight", p["model.layers.2.mlp.experts.down_proj"])
    close("blk.1.attn_v.weight", p["model.layers.1.self_attn.v_proj.weight"])
    close("blk.1.attn_q.weight", W.permute_rope(p["model.layers.1.self_attn.q_proj.weight"], cfg.num_attention_heads))
    close("blk.1.attn_k.weight", W.permute_rope(p["model.layers.1.self_attn.k_proj.weight"], cfg.num_key_value_heads))
    np.testing.assert_array_equal(_tensor(r, "blk.3.ffn_gate_inp.weight"), p["model.layers.3.mlp.gate.weight"].float().numpy())
    close("output.weight", p["lm_head.weight"])
    # the gate and up halves differ: a swapped split would not pass
    assert not torch.equal(gu[:, :I], gu[:, I:])


def test_permute_rope_is_llamas_interleave():
    # per head, HF's rotate-half order [x0..x(d/2-1), y0..] becomes [x0, y0, x1, y1, ...]
    w = torch.arange(8).float().reshape(8, 1)  # one head of dim 8
    assert W.permute_rope(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_synthetic_vocab_fits_small_and_large_sizes():
    toks, scores, types = W.synthetic_vocab(256)
    assert len(toks) == len(scores) == len(types) == 256
    assert toks[:3] == ["<unk>", "<s>", "</s>"] and "<0x0A>" in toks
    assert len(set(toks)) == 256
    toks, _, types = W.synthetic_vocab(1000)
    assert toks[3 + 255] == "<0xFF>" and types.count(int(gguf.TokenType.BYTE)) == 256
    with pytest.raises(ValueError, match="too small"):
        W.synthetic_vocab(2)
