"""The llama.cpp / moe_infinity comparison table from run_peers.sh's results
folder: llama-bench's JSON per --n-cpu-moe setting, decode.py's JSON, and the
GPU memory peak sampled around each process.

    python benchmarks/peers/summarize.py RESULTS_DIR [--budget-gib 24]

Reads RESULTS_DIR/llamacpp_*.json (llama-bench -o json), their
*.gpu_peak_mib files (peak nvidia-smi memory.used during the run minus the
reading before it; absent on a CPU-only host), RESULTS_DIR/moe_infinity_*.json
(decode.py --out). Prints the table and writes RESULTS_DIR/summary.json.

Prompt tok/s: llama-bench's pp rows (avg_ts); for moe_infinity prompt_len /
ttft_s (the prefill of the measured run). Decode tok/s: llama-bench's tg rows
(avg_ts); for moe_infinity 1 / decode_s_per_token (median step). "best
llama.cpp" is the fastest decode among the settings whose GPU peak is within
the budget (all of them where no peak was sampled).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _peak_gib(path: Path) -> float | None:
    f = path.with_suffix(".gpu_peak_mib")
    if not f.exists():
        return None
    text = f.read_text().strip()
    return float(text) / 1024 if text else None


def llamacpp_rows(d: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(d.glob("llamacpp_*.json")):
        try:
            tests = json.loads(f.read_text() or "[]")
        except json.JSONDecodeError as e:
            print(f"summarize: {f}: not llama-bench JSON ({e}); skipped", file=sys.stderr)
            continue
        if not tests:
            continue
        row: dict[str, Any] = {"system": "llama.cpp", "file": f.name, "gpu_peak_gib": _peak_gib(f)}
        for t in tests:
            row.setdefault("setting", f"n_cpu_moe={t.get('n_cpu_moe')} ngl={t.get('n_gpu_layers')} fa={t.get('flash_attn')} t={t.get('n_threads')}")
            for k in ("build_commit", "model_type", "model_size", "gpu_info", "cpu_info", "n_threads", "n_cpu_moe", "flash_attn"):
                row.setdefault(k, t.get(k))
            if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0:
                row["prompt_len"], row["prompt_tok_s"], row["prompt_tok_s_sd"] = t["n_prompt"], t["avg_ts"], t.get("stddev_ts")
            elif t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
                row["decoded_tokens"], row["decode_tok_s"], row["decode_tok_s_sd"] = t["n_gen"], t["avg_ts"], t.get("stddev_ts")
        rows.append(row)
    return rows


def moe_infinity_rows(d: Path) -> list[dict[str, Any]]:
    rows = []
    for f in sorted(d.glob("moe_infinity_*.json")):
        for r in json.loads(f.read_text()):
            if r.get("system") != "moe_infinity":
                continue
            routing = str(r.get("routing", "")).split(":")[0].split(" (")[0]
            rows.append({
                "system": "moe_infinity",
                "file": f.name,
                "setting": f"{r.get('expert_dtype', 'bf16')} experts {r.get('policy')} prefetch={r.get('prefetch')} graph={r.get('cuda_graph')} "
                           f"routing={routing} mem={r.get('device_memory')}",
                "expert_dtype": r.get("expert_dtype", "bf16"),
                "gpu_peak_gib": _peak_gib(f),
                "prompt_len": r.get("prompt_len"),
                "prompt_tok_s": r["prompt_len"] / r["ttft_s"] if r.get("ttft_s") else None,
                "decoded_tokens": r.get("decoded_tokens"),
                "decode_tok_s": 1 / r["decode_s_per_token"] if r.get("decode_s_per_token") else None,
                "hit_rate": r.get("hit_rate"),
                "device": r.get("device"),
                "routing": routing,
            })
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    args = ap.parse_args(argv)
    d = Path(args.results)
    lrows, mrows = llamacpp_rows(d), moe_infinity_rows(d)
    for r in lrows + mrows:
        peak = r.get("gpu_peak_gib")
        r["within_budget"] = None if peak is None else peak <= args.budget_gib
    eligible = [r for r in lrows if r.get("decode_tok_s") and r["within_budget"] is not False]
    best = max(eligible, key=lambda r: r["decode_tok_s"], default=None)
    ratios = []
    for m in mrows:
        if best is None:
            break
        ratios.append({
            "moe_infinity": m["setting"],
            "llama_cpp_best": best["setting"],
            "decode_ratio": m["decode_tok_s"] / best["decode_tok_s"] if m.get("decode_tok_s") else None,
            "prompt_ratio": m["prompt_tok_s"] / best["prompt_tok_s"] if m.get("prompt_tok_s") and best.get("prompt_tok_s") else None,
        })
    cols = [("system", "system", "s"), ("setting", "setting", "s"), ("GPU peak GiB", "gpu_peak_gib", ".1f"),
            ("<= budget", "within_budget", "s"), ("prompt tok/s", "prompt_tok_s", ".1f"), ("decode tok/s", "decode_tok_s", ".2f")]
    cells = [[h for h, _, _ in cols]] + [[_fmt(r.get(k), s) for _, k, s in cols] for r in lrows + mrows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(cols))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
    if best is not None:
        print(f"\nbest llama.cpp within {args.budget_gib:g} GiB: {best['setting']} ({_fmt(best.get('decode_tok_s'), '.2f')} decode tok/s)")
    for q in ratios:
        print(f"moe_infinity [{q['moe_infinity']}] / best llama.cpp: decode x{_fmt(q['decode_ratio'], '.2f')}, prompt x{_fmt(q['prompt_ratio'], '.2f')}")
    (d / "summary.json").write_text(json.dumps({"budget_gib": args.budget_gib, "llama_cpp": lrows, "moe_infinity": mrows,
                                                "best_llama_cpp": best, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
