"""Does llama.cpp run the GGUF that write_gguf.py writes as the same model
transformers runs? Greedy tokens from llama-completion against transformers'
greedy tokens, on small Qwen3-MoE and Mixtral shapes, with F32 weights and an
F32 KV cache (so only float rounding differs; Q8_0 weights alone flip
near-tied argmaxes of a random model within a few tokens).

    python benchmarks/peers/check_parity.py [--bin build/peers/llama.cpp/build/bin/llama-completion]

The random weights are scaled (--scale, default 2) so that the next token is
decided by a margin larger than float rounding; llama.cpp's prompt ids (from
--verbose-prompt) are fed to transformers unchanged. Exit status 1 when a
shape agrees on fewer than --min-agree of --tokens tokens.

--control also runs Mixtral with q_proj/k_proj left unpermuted (wrong for
llama.cpp's RoPE), to show that the check can tell: on the CPU machine that
agreed on 3 tokens where the right file agreed on all.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import write_gguf as W  # noqa: E402

from moe_infinity.bench import PRESETS, build  # noqa: E402

#: Small shapes of the two architectures (vocab 1024: byte tokens plus fillers).
SHAPES = {
    "qwen3-moe-small": dict(model_type="qwen3_moe", vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                            num_experts_per_tok=4, max_position_embeddings=512, norm_topk_prob=True),  # llama.cpp always renormalises
    "mixtral-small": dict(model_type="mixtral", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512),
}
FILLER0 = 3 + 256  # synthetic_vocab: <unk> <s> </s>, 256 byte tokens, then "▁t0", "▁t1", ...


def llama_tokens(binary: str, gguf_path: Path, prompt: str, n: int) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of a greedy llama-completion run."""
    out = subprocess.run([binary, "-m", str(gguf_path), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1", "-no-cnv",
                          "--verbose-prompt", "-t", "2", "-s", "1", "--ignore-eos", "-ctk", "f32", "-ctv", "f32", "--no-warmup"],
                         capture_output=True, check=True)
    log = out.stdout.decode("utf-8", "replace") + out.stderr.decode("utf-8", "replace")
    prompt_ids = [int(m) for m in re.findall(r"I\s+(\d+) -> '", log)]
    # stdout echoes the prompt as pieces, then the generated pieces: "▁tK" for
    # filler K, raw bytes for byte tokens.
    raw = out.stdout
    echo = prompt.replace(" ", "\u2581").encode()
    i = raw.index(echo) + len(echo)
    gen: list[int] = []
    while i < len(raw) and len(gen) < n:
        m = re.match(rb" t(\d+)", raw[i:])
        if m and FILLER0 + int(m.group(1)) < 1024:
            gen.append(FILLER0 + int(m.group(1)))
            i += m.end()
        else:
            gen.append(3 + raw[i])
            i += 1
    return prompt_ids, gen


def hf_tokens(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="build/peers/llama.cpp/build/bin/llama-completion")
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--min-agree", type=int, default=8)
    ap.add_argument("--control", action="store_true", help="also run Mixtral with the q/k RoPE permutation left out (should agree less)")
    args = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(name, shape, False) for name, shape in SHAPES.items()]
        if args.control:
            runs.append(("mixtral-small", SHAPES["mixtral-small"], True))
        for name, shape, unpermuted in runs:
            PRESETS[name] = shape
            model, cfg = build(name, "cpu", dtype=torch.float32)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "norm" not in pname:
                        p.mul_(args.scale)
            path = Path(tmp) / f"{name}.gguf"
            permute = W.permute_rope
            if unpermuted:
                W.permute_rope = lambda w, n_head: w
            try:
                W.write_gguf(model, cfg, name, path, torch.device("cpu"), "torch", W.QT.F32)
            finally:
                W.permute_rope = permute
            # llama-completion's stdout sometimes loses its last pieces at exit
            # (its log thread is not always drained): keep the longest of 3 runs.
            prompt_ids, ours = max((llama_tokens(args.bin, path, "hello world", args.tokens) for _ in range(3)), key=lambda r: len(r[1]))
            theirs = hf_tokens(model, prompt_ids, args.tokens)
            agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            label = f"{name} (control: q/k unpermuted)" if unpermuted else name
            print(f"{label}: greedy tokens agree on the first {agree} (llama.cpp's output parsed to {len(ours)} of {args.tokens} tokens)"
                  f"\n  llama.cpp    {ours}\n  transformers {theirs}")
            if not unpermuted:
                bad += agree < args.min_agree
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
