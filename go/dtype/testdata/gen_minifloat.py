#!/usr/bin/env python3
"""Generate narrow-float decoding vectors with PyTorch.

Run from anywhere:  python3 go/dtype/testdata/gen_minifloat.py
Writes little-endian binary files next to this script, 256 x u32 each: the
float32 bits of byte pattern i (i = 0..255) converted by torch's own dtype:

  f8e4m3_to_f32.bin   torch.float8_e4m3fn -> float32
  f8e5m2_to_f32.bin   torch.float8_e5m2   -> float32
  e8m0_to_f32.bin     torch.float8_e8m0fnu -> float32
"""
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def write(name, src_dtype):
    pats = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    f = pats.view(src_dtype).to(torch.float32)
    bits = f.contiguous().view(torch.int32).numpy().view(np.uint32)
    with open(os.path.join(HERE, name), "wb") as fh:
        fh.write(bits.astype("<u4").tobytes())


write("f8e4m3_to_f32.bin", torch.float8_e4m3fn)
write("f8e5m2_to_f32.bin", torch.float8_e5m2)
write("e8m0_to_f32.bin", torch.float8_e8m0fnu)
