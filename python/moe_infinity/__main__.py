"""Command line: ``python -m moe_infinity <command>`` (console script ``moe-infinity``).

Commands:
    version    print the package and engine versions and the loaded build
    selftest   write a small random MoE checkpoint, stream every expert through
               a two-slot cache and check the bytes (no download, a few seconds)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m moe_infinity`` and ``moe-infinity``."""
    parser = argparse.ArgumentParser(prog="moe-infinity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print versions").set_defaults(func=_version)
    st = sub.add_parser("selftest", help="round-trip a random checkpoint through the engine")
    st.add_argument("--layers", type=int, default=4)
    st.add_argument("--experts", type=int, default=8)
    st.set_defaults(func=_selftest)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
