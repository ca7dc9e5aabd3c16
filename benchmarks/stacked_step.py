"""Host cost of one stacked decode step: torch calls and wall time per step.

    python benchmarks/stacked_step.py --preset qwen3-30b-a3b --device cuda --rows 1,4,16

A stacked step (``moe_infinity.serving.stacked``) runs one forward for every
running request; in exact mode it splits the step's products and reductions
per request so that each gets its alone tokens. Every split is torch calls
the host makes, and on a GPU each costs host time whether or not the link is
busy. This measures that cost alone: the preset's attention and layer shape
(layers, query and key heads, head size), with the hidden size, the experts
and the vocabulary shrunk (``--hidden``, ``--experts``) so that the weights
are small and the step is what the host spends on it. Plain transformers,
no engine: the experts' work is not in it.

Rows (JSON lines with --out) state: preset, device, the shrunk sizes,
batching (exact or fast), rows (requests in the step), torch calls per step
(every call a TorchFunctionMode sees, the splits' included), and the step's
wall time (median and minimum of --reps steps, after one warm-up step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

try:
    import moe_infinity  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "python"))

from moe_infinity.bench import PRESETS
from moe_infinity.serving.stacked import StackedBatch


class _Calls(torch.overrides.TorchFunctionMode):
    """Counts the torch calls made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def shrunk_model(preset: str, hidden: int, experts: int, device: str) -> Any:
    """The preset's layers and attention heads with a small hidden size,
    few experts and a 256-token vocabulary (random weights, bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(PRESETS[preset])
    kw.pop("expert_format", None)
    model_type = kw.pop("model_type")
    kw.update(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden)
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if name in kw:
            kw[name] = experts
    kw["num_experts_per_tok"] = min(kw.get("num_experts_per_tok", 2), experts)
    if "moe_intermediate_size" in kw:
        kw["moe_intermediate_size"] = hidden
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device).eval()


def measure(model: Any, rows: int, exact: bool, reps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rows)
    batch = StackedBatch(model, exact=exact)
    for n in torch.randint(4, 16, (rows,), generator=g).tolist():
        prompt = torch.randint(3, 256, (n,), generator=g).tolist()
        batch.add(batch.prefill(prompt)[0], n)
    tokens = torch.randint(3, 256, (rows,), generator=g).tolist()
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with _Calls() as calls:
        batch.step(tokens)
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        batch.step(tokens)
        sync()
        times.append(time.perf_counter() - t)
    return {"calls_per_step": calls.n, "step_ms_p50": round(statistics.median(times) * 1e3, 2), "step_ms_min": round(min(times) * 1e3, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="1,4,16", help="requests per step, comma-separated")
    ap.add_argument("--batching", default="exact,fast", help="exact (split per request), fast (stacked plainly), or both")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the shrunk model")
    ap.add_argument("--experts", type=int, default=16, help="experts per layer of the shrunk model")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--out", help="append JSON rows to this file")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
        modes = args.batching.split(",")
        if any(r < 1 for r in rows) or not set(modes) <= {"exact", "fast"} or args.reps < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--rows takes positive integers and --batching exact and/or fast (got {args.rows!r}, {args.batching!r})")
    torch.set_num_threads(args.threads)
    model = shrunk_model(args.preset, args.hidden, args.experts, args.device)
    out = open(args.out, "a") if args.out else None
    try:
        for mode in modes:
            for r in rows:
                row = {
                    "bench": "stacked_step", "preset": args.preset, "device": str(model.device), "hidden": args.hidden,
                    "experts": args.experts, "batching": mode, "rows": r, "threads": args.threads, "reps": args.reps,
                    **measure(model, r, mode == "exact", args.reps),
                }
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
