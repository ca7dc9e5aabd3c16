"""Quality of expert_dtype="fp8" against the checkpoint's bfloat16 experts,
on the built-in model's held-out text.

The built-in model (moe_infinity.builtin_model_path(), a Mixtral-architecture
MoE in bfloat16) is loaded twice with moe_infinity on the CPU: as it ships,
and with expert_dtype="fp8" (its routed experts compressed once to block FP8,
128×128 blocks, and dequantized to bfloat16 for compute; everything else
unchanged). Both read the same windows of held-out text, teacher-forced
(one forward pass per window, every position predicting the next token):

  * top-1 agreement: the share of positions where both models' most likely
    next token is the same;
  * perplexity of each model on the text (exp of the mean cross-entropy of
    the true next token), and their ratio.

Held-out text: the validation split of tools/train_builtin.py (files chosen
by a hash of their path, never trained on), per domain (go, python, prose),
--windows windows of --seq tokens each, at evenly spaced offsets.

    python benchmarks/fp8_quality.py [--windows 8] [--seq 256] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def teacher_forced(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The float32 logits of each [1, T] window, one forward pass each."""
    out = []
    with torch.no_grad():
        for ids in windows:
            out.append(model(input_ids=ids).logits[0].float())
    return out


def compare(ref: list[torch.Tensor], test: list[torch.Tensor], windows: list[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement of test with ref over every position, and each one's
    perplexity on the windows' next tokens."""
    agree = total = 0
    nll_ref = nll_test = 0.0
    for r, t, ids in zip(ref, test, windows):
        agree += int((r.argmax(-1) == t.argmax(-1)).sum())
        total += r.shape[0]
        target = ids[0, 1:]
        nll_ref += float(torch.nn.functional.cross_entropy(r[:-1], target, reduction="sum"))
        nll_test += float(torch.nn.functional.cross_entropy(t[:-1], target, reduction="sum"))
    n = sum(ids.shape[1] - 1 for ids in windows)
    return {
        "positions": total,
        "top1_agreement": agree / total,
        "ppl_bf16": math.exp(nll_ref / n),
        "ppl_fp8": math.exp(nll_test / n),
        "ppl_ratio": math.exp((nll_test - nll_ref) / n),
    }


def heldout_windows(tok, windows: int, seq: int, domain_bytes: int) -> dict[str, list[torch.Tensor]]:
    """``windows`` windows of ``seq`` tokens per domain from the validation split."""
    sys.path.insert(0, str(ROOT / "tools"))
    import train_builtin

    corpus = train_builtin.collect(domain_bytes)
    out = {}
    for dom in train_builtin.DOMAINS:
        ids = train_builtin.encode(tok, corpus[dom]["val"])
        starts = torch.linspace(0, len(ids) - seq - 1, windows).long().tolist()
        out[dom] = [ids[s : s + seq].view(1, -1) for s in starts]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="windows per domain")
    ap.add_argument("--seq", type=int, default=256, help="tokens per window")
    ap.add_argument("--domain-bytes", type=int, default=12_000_000, help="as tools/train_builtin.py collected (the shipped model: 12000000)")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()

    import moe_infinity as mi
    from transformers import AutoTokenizer

    path = mi.builtin_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = heldout_windows(tok, args.windows, args.seq, args.domain_bytes)
    base = mi.from_pretrained(path, device="cpu")
    try:
        ref = {d: teacher_forced(base, w) for d, w in text.items()}
    finally:
        base.close()
    with tempfile.TemporaryDirectory() as offload:
        t0 = time.perf_counter()
        fp8 = mi.from_pretrained(path, device="cpu", expert_dtype="fp8", offload_dir=offload)
        load_s = time.perf_counter() - t0
        try:
            plan = fp8.moe_runtime.plan
            got = {d: teacher_forced(fp8, w) for d, w in text.items()}
        finally:
            fp8.close()
    result = {
        "model": "built-in (Mixtral architecture, bfloat16, 4 layers x 8 experts)",
        "held_out": f"validation split of tools/train_builtin.py, {args.windows} windows x {args.seq} tokens per domain",
        "expert_bytes_bf16": plan["views"]["bytes"],
        "expert_bytes_fp8": plan["stored"]["source_bytes"],
        "first_load_with_compression_s": round(load_s, 2),
        "all": compare([x for d in ref for x in ref[d]], [x for d in got for x in got[d]], [x for d in text for x in text[d]]),
        "by_domain": {d: compare(ref[d], got[d], text[d]) for d in text},
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
