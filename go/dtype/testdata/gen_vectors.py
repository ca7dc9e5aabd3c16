#!/usr/bin/env python3
"""Generate dtype conversion test vectors with PyTorch.

Run from anywhere:  python3 go/dtype/testdata/gen_vectors.py
Writes little-endian binary files next to this script:

  bf16_to_f32.bin   65536 x u32: f32 bits of bf16 pattern i (i = 0..65535)
  f16_to_f32.bin    65536 x u32: f32 bits of f16 pattern i
  bf16_to_f16.bin   65536 x u16: f16 bits of bf16 pattern i
  f16_to_bf16.bin   65536 x u16: bf16 bits of f16 pattern i
  f32_inputs.bin    N x u32: f32 input bit patterns (edge cases, ties, random)
  f32_to_bf16.bin   N x u16: torch .to(bfloat16) of f32_inputs
  f32_to_f16.bin    N x u16: torch .to(float16) of f32_inputs

The conversions run on CPU tensors large enough to take torch's vectorised
paths; the Go test compares bit-exactly except that NaN only has to stay NaN.
"""
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def write(name, arr):
    arr = np.ascontiguousarray(arr)
    assert arr.dtype.byteorder in ("<", "=", "|")
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def u16_to(t_dtype_from, t_dtype_to):
    pats = np.arange(65536, dtype=np.uint16).view(np.int16)
    t = torch.from_numpy(pats.copy()).view(t_dtype_from)
    return t.to(t_dtype_to)


def bits32(t):
    return t.contiguous().view(torch.int32).numpy().view(np.uint32)


def bits16(t):
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def f32_inputs():
    rng = np.random.default_rng(20240601)
    v = set()

    def add(*xs):
        for x in xs:
            x &= 0xFFFFFFFF
            v.add(x)
            v.add(x ^ 0x80000000)  # both signs

    # zeros, infinities, NaNs (quiet/signalling, various payloads)
    add(0x00000000, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF,
        0x7FC00001, 0x7FA00000, 0x7F80FFFF, 0x7F810000)
    # f32 subnormals and normal range limits
    add(0x00000001, 0x00000002, 0x007FFFFF, 0x00400000, 0x00800000, 0x00800001,
        0x7F7FFFFF, 0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x3F800000)
    for i in range(64):
        add(int(rng.integers(1, 0x00800000)))
    # f16 limits: max 65504 = 0x477FE000, overflow boundary 65520 = 0x477FF000
    for b in (0x477FE000, 0x477FF000, 0x47800000, 0x477FEFFF, 0x477FF001, 0x477FFFFF,
              0x47C35000, 0x4E6E6B28, 0x38800000, 0x387FFFFF, 0x387FF000, 0x33000000,
              0x33000001, 0x32FFFFFF, 0x33800000, 0x337FFFFF, 0x33C00000, 0x34000000,
              0x38000000, 0x38400000, 0x38200000, 0x38600000):
        for d in range(-3, 4):
            add(b + d)
    # exact ties for bf16 (low 16 bits 0x8000) and +-1 around, even and odd lsb
    for i in range(400):
        hi = int(rng.integers(0, 0x7F80))
        base = hi << 16
        add(base | 0x8000, base | 0x7FFF, base | 0x8001, base)
    for hi in (0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7E, 0x7F7F):
        add((hi << 16) | 0x8000, (hi << 16) | 0x7FFF, (hi << 16) | 0x8001)
    # exact midpoints between adjacent f16 values (normal and subnormal), +-1 ulp
    all_f16 = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    idx = rng.choice(len(all_f16) - 1, size=500, replace=False)
    idx = np.concatenate([idx, np.arange(0, 40), np.arange(0x3F0, 0x410), [0x7BFE]])
    for i in idx:
        lo, hi = float(all_f16[i]), float(all_f16[i + 1])
        mid = np.float32((lo + hi) / 2)  # exact: f16 has 11 bits, f32 24
        m = int(np.array(mid, dtype=np.float32).view(np.uint32))
        add(m - 1, m, m + 1)
    # the midpoint above 65504 (towards 65536) is the overflow tie
    # random bit patterns across the whole range
    for x in rng.integers(0, 1 << 32, size=2500, dtype=np.uint64):
        add(int(x))
    # random values in the f16 normal range with low mantissa bits set to ties
    for x in rng.integers(0x38800000, 0x47800000, size=300, dtype=np.uint64):
        add((int(x) & ~0x1FFF) | 0x1000)
    return np.array(sorted(v), dtype=np.uint32)


def main():
    write("bf16_to_f32.bin", bits32(u16_to(torch.bfloat16, torch.float32)))
    write("f16_to_f32.bin", bits32(u16_to(torch.float16, torch.float32)))
    write("bf16_to_f16.bin", bits16(u16_to(torch.bfloat16, torch.float16)))
    write("f16_to_bf16.bin", bits16(u16_to(torch.float16, torch.bfloat16)))

    inp = f32_inputs()
    t = torch.from_numpy(inp.view(np.int32).copy()).view(torch.float32)
    write("f32_inputs.bin", inp)
    write("f32_to_bf16.bin", bits16(t.to(torch.bfloat16)))
    write("f32_to_f16.bin", bits16(t.to(torch.float16)))

    total = sum(os.path.getsize(os.path.join(HERE, f)) for f in os.listdir(HERE) if f.endswith(".bin"))
    print(f"wrote {len(inp)} f32 inputs; {total} bytes of vectors (torch {torch.__version__})")


if __name__ == "__main__":
    main()
