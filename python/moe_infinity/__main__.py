"""Command line: ``python -m moe_infinity <command>`` (console script ``moe-infinity``).

Commands:
    generate   generate text with a model whose experts moe_infinity serves
               (default: a small built-in model, no download)
    version    print the package and engine versions and the loaded build
    selftest   write a small random MoE checkpoint, stream every expert through
               a two-slot cache and check the bytes (no download, a few seconds)
    bench      the decode benchmark at any size: a model of a named shape with
               random weights, seconds per token next to the transfer floor
               (``bench --help``; ``bench --preset tiny --device cpu`` runs anywhere)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def _version(_: argparse.Namespace) -> int:
    from . import __version__, _native

    print(f"moe_infinity {__version__}, engine {_native.version()}, library {_native.library_path()}")
    return 0


def _selftest(args: argparse.Namespace) -> int:
    import ctypes

    import torch
    from safetensors.torch import save_file

    from .engine import Engine

    layers, experts, hidden, inter = args.layers, args.experts, 64, 128
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for x in range(experts):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{x}."
            tensors[p + "w1.weight"] = torch.randn(inter, hidden, generator=g, dtype=torch.bfloat16)
            tensors[p + "w2.weight"] = torch.randn(hidden, inter, generator=g, dtype=torch.bfloat16)
            tensors[p + "w3.weight"] = torch.randn(inter, hidden, generator=g, dtype=torch.bfloat16)
    layout = {
        "regions": [
            {"name": "gate_up_proj", "parts": ["w1.weight", "w3.weight"], "dtype": "float32"},
            {"name": "down_proj", "parts": ["w2.weight"], "dtype": "float32"},
        ]
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/model.safetensors")
        start = time.perf_counter()
        slot = 2 * inter * hidden * 4 + hidden * inter * 4
        with Engine(budget_bytes=2 * slot, policy="priority", prefetch=True) as eng:
            eng.add_checkpoint(tmp)
            plan = eng.configure(layout)
            addr, size = eng.arena()
            arena = torch.frombuffer((ctypes.c_uint8 * size).from_address(addr), dtype=torch.uint8)
            bad = 0
            for layer in range(layers):
                for x in range(experts):
                    slots, lease = eng.acquire(layer, [x])
                    base = slots[0] * plan["slot_bytes"]
                    r = plan["layout"]["regions"][0]
                    got = arena[base : base + r["bytes"]].view(torch.float32).view(r["shape"])
                    p = f"model.layers.{layer}.block_sparse_moe.experts.{x}."
                    want = torch.cat([tensors[p + "w1.weight"], tensors[p + "w3.weight"]]).float()
                    bad += int(not torch.equal(got, want))
                    eng.release(lease)
            st = eng.stats()
        took = time.perf_counter() - start
    print(
        f"selftest: {layers * experts} experts streamed through {plan['slots']} slots of "
        f"{plan['slot_bytes']} bytes in {took * 1000:.1f} ms; misses {st['misses']}, "
        f"bytes moved {st['bytes_moved']}; mismatches {bad}"
    )
    return 1 if bad else 0


def _generate(args: argparse.Namespace) -> int:
    import logging

    import torch
    from transformers import AutoTokenizer, TextStreamer

    from .builtin import builtin_model_dir
    from .loading import _resolve_device, from_pretrained
    from .memory import format_bytes

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    path = args.model or str(builtin_model_dir())
    print(f"loading {path} ...", file=sys.stderr)
    start = time.perf_counter()
    device = _resolve_device(args.device)
    model = from_pretrained(
        path,
        device=device,
        device_memory=_memory_arg(args.device_memory),
        cache_policy=args.policy,
        prefetch=not args.no_prefetch,
        trace_path=args.trace,
        # The built-in model is stored in bfloat16; float32 is faster on CPUs.
        dtype=None if args.model or device.type != "cpu" else torch.float32,
    )
    loaded = time.perf_counter() - start
    try:
        tok = AutoTokenizer.from_pretrained(path)
        inputs = tok(args.prompt, return_tensors="pt").to(model.device)
        streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            streamer=streamer,
            pad_token_id=tok.pad_token_id,
        )
        took = time.perf_counter() - start
        new = out.shape[-1] - (0 if model.config.is_encoder_decoder else inputs["input_ids"].shape[-1])
        st = model.moe_stats()
        plan = st["plan"]
        print(
            f"\n[{new} tokens in {took:.2f} s ({new / max(took, 1e-9):.1f} tok/s) on {model.device}; load {loaded:.2f} s; "
            f"cache {plan['slots']} slots x {format_bytes(plan['slot_bytes'])} ({plan['policy']}, prefetch "
            f"{'on' if plan['prefetch'] else 'off'}); hit rate {st['hit_rate']:.1%}, "
            f"{format_bytes(st['bytes_moved'])} moved, stall {st['stall_seconds'] * 1000:.1f} ms]",
            file=sys.stderr,
        )
    finally:
        model.close()
    return 0


def _memory_arg(value: str) -> int | float | str:
    try:
        return float(value) if "." in value and value.replace(".", "", 1).isdigit() else int(value)
    except ValueError:
        return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m moe_infinity`` and ``moe-infinity``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser (moe_infinity.bench), every option passed through
        from .bench import main as bench_main

        return _reporting(lambda: bench_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="moe-infinity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text (default model: the built-in one)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--model", help="model directory or Hub id in the local cache (default: built-in model)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--device", default="auto", help="auto (the GPU when the CUDA engine can use one), cpu, cuda or cuda:N")
    gen.add_argument("--device-memory", default="0.5", help="expert cache budget: '24GiB', '500MB', bytes, or a fraction (default 0.5)")
    gen.add_argument("--policy", default="priority", choices=["priority", "lru", "lfu"])
    gen.add_argument("--no-prefetch", action="store_true", help="turn trace-driven prefetching off")
    gen.add_argument("--trace", help="trace file to load and update")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=int, help="random seed for --sample")
    gen.add_argument("-v", "--verbose", action="store_true", help="log what the engine decided")
    gen.set_defaults(func=_generate)
    sub.add_parser("version", help="print versions").set_defaults(func=_version)
    st = sub.add_parser("selftest", help="round-trip a random checkpoint through the engine")
    st.add_argument("--layers", type=int, default=4)
    st.add_argument("--experts", type=int, default=8)
    st.set_defaults(func=_selftest)
    # Listed for --help; main() hands "bench ..." to moe_infinity.bench before parsing.
    sub.add_parser("bench", help="decode benchmark at any size (bench --help for its options)", add_help=False)
    args = parser.parse_args(argv)
    return _reporting(lambda: args.func(args))


def _reporting(run) -> int:
    """Runs a command; the engine's errors become one line and exit status 2."""
    from .errors import MoEInfinityError

    try:
        return run()
    except MoEInfinityError as exc:
        print(f"moe-infinity: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
