"""Command line: ``python -m moe_infinity <command>`` (console script ``moe-infinity``).

Commands:
    generate   generate text with a model whose experts moe_infinity serves
               (default: a small built-in model, no download)
    serve      an OpenAI-compatible HTTP server with continuous batching
               (``serve --help``; default model: the built-in one)
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


def _serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from .serving import Scheduler
    from .serving.server import Lifecycle, build_app, load_model, serve

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"loading {args.model or 'the built-in model'} ...", file=sys.stderr)
    model, tok = load_model(
        args.model,
        device=args.device,
        device_memory=_memory_arg(args.device_memory),
        cache_policy=args.policy,
        prefetch=not args.no_prefetch,
        trace_path=args.trace,
    )
    try:
        template = Path(args.chat_template).read_text() if args.chat_template else None
        sched = Scheduler(model, max_batch=args.max_batch, max_queue=args.max_queue, batching=args.batching)
    except BaseException:
        model.close()
        raise
    name = args.served_model_name or (Path(args.model).name if args.model else "builtin")
    life = Lifecycle(model, sched, shutdown_timeout=args.shutdown_timeout, owns_model=True)
    app = build_app(model, tok, sched, name, chat_template=template, lifecycle=life)

    def ready(url: str) -> None:
        why = f": {sched.batching_reason}" if sched.batching_reason else ""
        print(f"moe-infinity: serving {name} on {url} (OpenAI API at {url}/v1; max batch {args.max_batch} {sched.batching}{why}, queue {args.max_queue})", file=sys.stderr, flush=True)

    serve(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning", on_ready=ready)
    st = sched.stats()
    done = ", ".join(f"{v} {k}" for k, v in sorted(st["finished"].items())) or "none"
    trace = f"; trace saved to {args.trace}" if args.trace else ""
    print(f"moe-infinity: shut down: {st['requests']} requests ({done}), {st['completion_tokens']} tokens generated{trace}", file=sys.stderr, flush=True)
    return 0


def _engine_options(p: argparse.ArgumentParser) -> None:
    """The model and engine options that generate and serve share."""
    p.add_argument("--model", help="model directory or Hub id in the local cache (default: built-in model)")
    p.add_argument("--device", default="auto", help="auto (the GPU when the CUDA engine can use one), cpu, cuda or cuda:N")
    p.add_argument("--device-memory", default="0.5", help="expert cache budget: '24GiB', '500MB', bytes, or a fraction (default 0.5)")
    p.add_argument("--policy", default="priority", choices=["priority", "lru", "lfu"])
    p.add_argument("--no-prefetch", action="store_true", help="turn trace-driven prefetching off")
    p.add_argument("--trace", help="trace file to load and update")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the engine decided")


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
    gen.add_argument("--max-new-tokens", type=int, default=32)
    _engine_options(gen)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=int, help="random seed for --sample")
    gen.set_defaults(func=_generate)
    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching (default model: the built-in one)",
        description="Serves /v1/models, /v1/completions, /v1/chat/completions (streaming with stream: true), /health and "
        "/metrics. SIGTERM or Ctrl-C stops accepting requests, lets running ones finish (up to --shutdown-timeout), saves the "
        "trace and exits; a second signal exits at once.",
    )
    _engine_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed at start)")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a place in the batch; more get HTTP 429 (default 64)")
    srv.add_argument(
        "--batching",
        choices=["auto", "stacked", "threads"],
        default="auto",
        help="stacked: one forward per step for the whole batch; threads: a thread per request, meeting at each MoE layer; "
        "auto (default): stacked where the model supports it (sdpa or eager attention, full-length or sliding-window caches). Both give each request its alone tokens",
    )
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests may take to finish at shutdown (default 30)")
    srv.add_argument("--served-model-name", help="the model name clients send (default: the model directory's name, or 'builtin')")
    srv.add_argument("--chat-template", help="a Jinja chat template file (default: the tokenizer's, else 'role: content' lines)")
    srv.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    srv.set_defaults(func=_serve)
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
