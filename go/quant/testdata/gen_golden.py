#!/usr/bin/env python3
"""Generate dequantization golden outputs with transformers' own functions.

Run from anywhere:  python3 go/quant/testdata/gen_golden.py
(needs torch and transformers; written with torch 2.15, transformers 5.25).

FP8 block-scaled cases call transformers.integrations.finegrained_fp8.
Fp8Dequantize._dequantize_one, the op transformers runs when it loads an FP8
checkpoint with dequantize=True: the float8_e4m3fn weight and the float32
weight_scale_inv are multiplied in float32 and the product is cast to the
output dtype. That function derives the block from the scale grid, so for a
shape that is not a multiple of the block the weight is zero-padded to whole
blocks, dequantized, and cropped (the padding never reaches the output).

FP8 quantization cases ("fp8quant", the inverse that moe_infinity's
expert_dtype="fp8" runs): per block the scale is amax/448 in float32 (at
least 1e-12), and the weight is (x / scale).clamp(-448, 448) cast by torch's
own .to(torch.float8_e4m3fn), as DeepSeek's conversion does.

MXFP4 cases call transformers.integrations.mxfp4.convert_moe_packed_tensors,
the gpt-oss dequantizer: blocks [E, R, G, 16] (low nibble = even element),
scales [E, R, G] (e8m0), output [E, G*32, R] (transposed) in the given dtype.

Writes cases.json (the case list) and one little-endian .bin per tensor.
"""
import json
import os

import numpy as np
import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261206)
cases = []


def write(name, t):
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        arr = t.view(torch.int16).numpy().astype("<i2")
    elif t.dtype == torch.float32:
        arr = t.view(torch.int32).numpy().astype("<i4")
    elif t.dtype in (torch.uint8, torch.float8_e4m3fn):
        arr = t.view(torch.uint8).numpy()
    else:
        raise TypeError(t.dtype)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(arr.tobytes())
    return name


DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def fp8_case(name, rows, cols, block, scales, outs):
    w = torch.from_numpy(rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)).view(torch.float8_e4m3fn)
    s = torch.tensor(scales, dtype=torch.float32)
    sr, sc = -(-rows // block[0]), -(-cols // block[1])
    assert s.shape == (sr, sc), (s.shape, sr, sc)
    pr, pc = sr * block[0], sc * block[1]
    padded = torch.zeros(pr, pc, dtype=torch.uint8)
    padded[:rows, :cols] = w.view(torch.uint8)
    op = Fp8Dequantize(None)
    for out in outs:
        full = op._dequantize_one(padded.view(torch.float8_e4m3fn), s, output_dtype=DTYPES[out])
        got = full[:rows, :cols]
        cases.append({
            "name": f"{name}_{out}", "kind": "fp8", "rows": rows, "cols": cols, "block": list(block),
            "out_dtype": out,
            "weight": write(f"{name}.weight.bin", w),
            "scale_inv": write(f"{name}.scale_inv.bin", s),
            "want": write(f"{name}.{out}.bin", got),
        })


def mxfp4_case(name, experts, rows, groups, scale_pool, outs):
    blocks = torch.from_numpy(rng.integers(0, 256, size=(experts, rows, groups, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.choice(np.array(scale_pool, dtype=np.uint8), size=(experts, rows, groups)))
    for out in outs:
        got = convert_moe_packed_tensors(blocks, scales, dtype=DTYPES[out])
        assert got.shape == (experts, groups * 32, rows), got.shape
        cases.append({
            "name": f"{name}_{out}", "kind": "mxfp4", "experts": experts, "rows": rows, "cols": groups * 32,
            "out_dtype": out,
            "blocks": write(f"{name}.blocks.bin", blocks),
            "scales": write(f"{name}.scales.bin", scales),
            "want": write(f"{name}.{out}.bin", got),
        })


# Real geometry (DeepSeek-V3, Qwen3-FP8: [128, 128] blocks), realistic scales.
fp8_case("fp8_128x256_b128", 128, 256, (128, 128),
         rng.uniform(1e-4, 1e-2, size=(1, 2)).astype(np.float32).tolist(), ["BF16"])
# Small blocks and extreme scales: overflow to Inf, float32-subnormal scales,
# products that round to bf16/f16 subnormals or zero, a negative scale.
fp8_case("fp8_48x64_b16x32", 48, 64, (16, 32),
         [[1e-3, 3.0e36], [1e-40, 0.7], [-2.5, 1.0]], ["BF16", "F32", "F16"])
# A shape that is not a multiple of the block: partial blocks on both axes.
fp8_case("fp8_136x160_b128", 136, 160, (128, 128),
         rng.uniform(1e-4, 1e-2, size=(2, 2)).astype(np.float32).tolist(), ["BF16", "F32"])

# gpt-oss-like scales cluster near 2^0; include both ends of the e8m0 range
# (except 255, which is NaN in e8m0 and rejected by the Go dequantizer).
pool = list(range(110, 135)) + [0, 1, 2, 253, 254]
mxfp4_case("mxfp4_2x6x3", 2, 6, 3, pool, ["BF16", "F32"])

# (After the cases above, so that their random draws stay as they were.)
def fp8_quant_case(name, w, block):
    """w: a [rows, cols] float tensor (bfloat16, float16 or float32)."""
    rows, cols = w.shape
    sr, sc = -(-rows // block[0]), -(-cols // block[1])
    pad = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32)
    pad[:rows, :cols] = w.float()
    tiles = pad.reshape(sr, block[0], sc, block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.reshape(sr * block[0], sc * block[1])[:rows, :cols]
    src = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[w.dtype]
    cases.append({
        "name": name, "kind": "fp8quant", "rows": rows, "cols": cols, "block": list(block), "src_dtype": src,
        "src": write(f"{name}.src.bin", w),
        "weight": write(f"{name}.weight.bin", q),
        "scale_inv": write(f"{name}.scale_inv.bin", scale.float()),
    })


def _normal(rows, cols, std, dtype):
    return torch.from_numpy(rng.normal(0, std, size=(rows, cols)).astype(np.float32)).to(dtype)


# A trained-weight-like bf16 matrix with [128, 128] blocks, one all-zero
# block, one block of tiny values (its scale hits the 1e-12 floor) and an
# outlier; partial blocks on both axes.
w = _normal(200, 300, 0.02, torch.float32)
w[:128, 128:256] = 0
w[128:, :128] *= 1e-12
w[5, 7] = 3.5
w[150, 290] = -0.75
fp8_quant_case("fp8quant_200x300_b128", w.to(torch.bfloat16), (128, 128))
# float32 and float16 sources, small blocks.
fp8_quant_case("fp8quant_48x64_b16x32_f32", _normal(48, 64, 1.0, torch.float32), (16, 32))
fp8_quant_case("fp8quant_40x50_b16x32_f16", _normal(40, 50, 0.1, torch.float16), (16, 32))
# Ties: with amax = 448 the scale is 1, so the scaled values are the values
# themselves: midpoints between neighbouring e4m3 values (normal and
# subnormal) must go to the even one, as torch rounds them.
codes = torch.arange(0, 0x7E, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
mids = (codes[:-1] + codes[1:]) / 2
ties = torch.cat([torch.tensor([448.0]), codes, mids, -mids, -codes[1:]])
ties = torch.cat([ties, torch.zeros(-len(ties) % 32)]).reshape(-1, 32)
fp8_quant_case("fp8quant_ties_f32", ties, (ties.shape[0], 32))

with open(os.path.join(HERE, "cases.json"), "w") as f:
    json.dump({"generator": "gen_golden.py", "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "cases": cases}, f, indent=1)
    f.write("\n")
