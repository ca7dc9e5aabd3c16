"""gpt-oss experts on the engine's kernels, on the CPU (the reference the
CUDA kernels are checked against; tests/test_gpu.py runs those).

gpt-oss's experts are not standard SwiGLU (transformers' GptOssExperts:
transposed gate_up_proj [H, 2I] with interleaved gate/up columns, biases,
gate clamped to ``limit``, ``(up + 1) * gate * sigmoid(alpha * gate)``), so
the engine has kernels of their own (setup ffn ``"gpt_oss"``). With
``reference_kernels`` the CPU backend computes decode-sized layers with its
Go reference of them (in mapped mode, reading each expert from its slot or
in place from the checkpoint's tensors, or from the slots alone); it rounds each step to the activation dtype where
transformers' grouped_mm expert code does, so the only difference left is
the order of the float32 sums inside each matrix product (torch's GEMM
blocks them, the reference sums in index order). Tolerance is that of the
FP8 reference kernels (tests/test_quantized.py): the same greedy tokens,
top-1 agreement of the logits >= 99% and relative error <= 1e-2; on these
tiny bfloat16 models the logits came out bit for bit transformers' here,
which the test reports but does not require.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_infinity as mi
import tiny_models as tm

NEW_TOKENS = 12


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def gptoss(request, tmp_path_factory):
    dt = request.param
    model = tm.build("gpt_oss", seed=1, dtype=dt, hidden_size=64, intermediate_size=96, head_dim=16, num_local_experts=8, num_experts_per_tok=4)
    path = tm.save(model, tmp_path_factory.mktemp("gpt_oss") / "m")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dt).eval()
    prompt = torch.randint(3, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ref(input_ids=prompt).logits
        tokens = ref.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return dt, path, prompt, logits, tokens, ref


def test_reference_kernels_compute_gpt_oss_experts_as_transformers(gptoss):
    dt, path, prompt, logits, tokens, _ = gptoss
    model = mi.from_pretrained(path, device="cpu", dtype=dt, device_memory="256MiB", engine_options={"reference_kernels": True})
    try:
        ex = model.moe_runtime.plan["executor"]
        assert ex["kernels"] and ex["mapped"] and not ex.get("quant"), ex
        layers = len(model.moe_runtime.layers)
        runs = {}
        for mapped in (True, False):
            model.moe_runtime.set_mapped(mapped)
            model.moe_tune(flush=True, reset_stats=True)
            with torch.no_grad():
                got = model(input_ids=prompt).logits
                gen = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            paths = model.moe_stats()["paths"]
            path = "mapped" if mapped else "kernels"
            assert paths[path] >= (NEW_TOKENS + 1) * layers, paths
            agree = (got.argmax(-1) == logits.argmax(-1)).float().mean().item()
            print(f"gpt-oss {dt} reference kernels ({path}) vs transformers: top-1 {agree:.4f}, rel {_relative(got, logits):.2e}, bitwise {torch.equal(got, logits)}")
            assert agree >= 0.99 and _relative(got, logits) <= 1e-2, (agree, _relative(got, logits))
            assert torch.equal(gen, tokens)
            runs[mapped] = got
        assert torch.equal(runs[True], runs[False]), "mapped mode (experts read in place) and the slots compute the same bits"
    finally:
        model.close()


def test_without_reference_kernels_gpt_oss_stays_on_transformers_code(gptoss):
    dt, path, prompt, logits, tokens, _ = gptoss
    model = mi.from_pretrained(path, device="cpu", dtype=dt, device_memory="256MiB")
    try:
        assert not model.moe_runtime.plan["executor"]["kernels"]
        with torch.no_grad():
            got = model(input_ids=prompt).logits
        assert torch.equal(got, logits), "transformers' own code on the slots: bit for bit"
        assert model.moe_stats()["paths"]["kernels"] == 0
    finally:
        model.close()


def _float64_experts(module, x, idx, w):
    """gpt-oss's expert math in float64 (no rounding): the ground truth."""
    gu_w, gu_b = module.gate_up_proj.double(), module.gate_up_proj_bias.double()
    dn_w, dn_b = module.down_proj.double(), module.down_proj_bias.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = x[t].double() @ gu_w[e] + gu_b[e]
            g, u = gu[::2].clamp(max=module.limit), gu[1::2].clamp(-module.limit, module.limit)
            h = (u + 1) * g * torch.sigmoid(g * module.alpha)
            out[t] += float(w[t, j]) * (h @ dn_w[e] + dn_b[e])
    return out


@pytest.mark.parametrize("T", [1, 3, 16])
def test_run_experts_matches_the_float64_formula(gptoss, T):
    """The engine's gpt-oss kernels (run_experts, outside the executor)
    against gpt-oss's expert math in float64: within a few units in the
    last place of the output's scale, as tests/test_backend_ops.py allows
    the SwiGLU kernels."""
    dt, path, _, _, _, ref = gptoss
    model = mi.from_pretrained(path, device="cpu", dtype=dt, device_memory="256MiB", engine_options={"reference_kernels": True})
    try:
        module = ref.model.layers[0].mlp.experts
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, 64, generator=g).to(dt)
        idx = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(T)])
        w = torch.softmax(torch.randn(T, 4, generator=g), dim=-1)
        got = model.moe_runtime.run_experts(0, x, idx, w, sorted(set(idx.flatten().tolist())))
        want = _float64_experts(module, x, idx, w)
        err = (got.double() - want).abs().max().item()
        assert err <= 1.5e-2 * want.abs().max().item() + 1e-3, err
    finally:
        model.close()
