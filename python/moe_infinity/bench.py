"""Decode benchmark: how fast a Mixture-of-Experts model whose experts do not
fit in GPU memory decodes with moe_infinity, next to the transfer floor of
the same run and to Hugging Face accelerate offloading.

The model is built in memory with random weights (experts in host memory,
bf16) for a named shape. One run = prefill of --prompt-len random tokens, then
--decode greedy tokens at batch 1, for each ablation (policy × prefetch) on
the same loaded model (the cache is flushed between ablations). Writes one
JSON object per ablation (and one for accelerate with --accelerate, which
runs in its own process).

    python -m moe_infinity bench --preset tiny --device cpu    # any install; the CI smoke configuration
    python -m moe_infinity bench --preset tiny --device cpu --json   # one JSON line per row instead of the table
    python -m moe_infinity bench --preset mixtral-8x7b --device-memory 24GiB --out results.json
    python -m moe_infinity bench --preset qwen3-30b-a3b --graph --pipeline --routing generated   # structured routing
    python -m moe_infinity bench --preset mixtral-8x7b --graph --pipeline --graph-misses copy,read   # both miss paths

(In a checkout, ``python benchmarks/decode.py`` takes the same options.)

With --graph, --graph-misses picks how replayed layers get missed experts:
"read" (the kernels read them in place over PCIe), "copy" (the copy engine
brings them into slots while the layer waits inside the replay) or "auto"
(the engine's default: copy from 32 MiB per expert); a comma list measures
each, capturing the step again for each.

--expert-dtype fp8 serves the experts compressed to block FP8 in host
memory (offload(expert_dtype="fp8"); on a GPU with --quantized-kernels);
--expert-dtype bf16,fp8 measures both, one after the other in this process,
on the same seeded weights, the same routing and the same measured link
rate, and each fp8 row carries s_per_token_vs_bf16 (its s/token over the
bf16 row's). Each row's floor counts the bytes its experts are stored in.

--preset gpt-oss-120b (and gpt-oss-tiny, its smoke-sized twin) builds the
experts as gpt-oss ships them, MXFP4 blocks and e8m0 scales (random), served
compressed as a checkpoint of that format is (rows' expert_dtype "mxfp4";
on a GPU transformers' code on dequantized views, or with
--quantized-kernels the engine's gpt-oss MXFP4 kernels); --expert-dtype and
--accelerate do not apply to them.

--kernel-build picks the CUDA kernels' build (engine option kernel_build):
sm80 (the engine's default) or sm89 (GPUs of compute capability 8.9 and
up: the FP8 kernels decode weights with the hardware's e4m3 conversion);
a comma list (sm80,sm89) measures each in turn in this process, on the same
seeded weights and routing, and each sm89 row carries s_per_token_vs_sm80
(its s/token over the sm80 row's). Each row's kernel_build is the build the
engine loaded ("none" on the CPU).

Random weights route decode tokens narrowly (the Qwen3 shape hits 99% once
warm), so --routing generated replaces every MoE layer's choice with a
labelled generated trace (skewed per-layer popularity, --skew, seed
--routing-seed; the label is in the JSON's "routing" field).

Fields: decode_s_per_token (median over decoded tokens), ttft_s,
ttft_link_floor_s (with --routing generated: prompt_experts, the distinct
experts the prompt uses, × expert bytes ÷ bandwidth), hit_rate,
bytes_moved_per_token, stall_s_per_token (host waits in the engine; 0 on the
GPU, where copies are ordered by events instead), misses_per_token,
pinned_h2d_GBps (measured in the same process), compute_s_per_token,
floor_s_per_token = misses × expert bytes (expert_bytes: one expert's slot
as stored, FP8 codes and scales for fp8) ÷ bandwidth + compute, ratio =
measured ÷ floor, overhead_ms_per_token (host time in the engine and the
Python hook not spent waiting for the GPU; with --graph: the engine's call
per step plus its copy driver's and tracer's host time for the step, with
host_submit_ms_per_token, the whole host submit, and
graph_launch_ms_per_token, torch's part of it, beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._compat import cache_kwargs, output_cache
from ._hostinfo import host_facts

PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=4096,
    ),
    "tiny": dict(
        model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    ),
    # Qwen3-30B-A3B's routing (128 experts, 8 a token) at a size any machine runs:
    # what the cache, the prefetcher and the CPU/link choice do with that many small experts.
    "qwen3-tiny": dict(
        model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=128,
        num_experts_per_tok=8, max_position_embeddings=512,
    ),
    # openai/gpt-oss-120b's config.json; its experts as the release ships them:
    # MXFP4 blocks and e8m0 scales (about 13 MB an expert, 61 GB in all), bf16 biases.
    "gpt-oss-120b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
        sliding_window=128, swiglu_limit=7.0, max_position_embeddings=4096, expert_format="mxfp4",
    ),
    # The same build path at a size any machine runs (the CI smoke of the MXFP4 presets).
    "gpt-oss-tiny": dict(
        model_type="gpt_oss", vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=16, max_position_embeddings=512, expert_format="mxfp4",
    ),
}


def expert_format(preset: str) -> str:
    """How the preset's experts are built: "bf16" (random bfloat16 weights),
    or "mxfp4" (random MXFP4 blocks and scales, as gpt-oss ships)."""
    return PRESETS[preset].get("expert_format", "bf16")

ABLATIONS = [("priority", True), ("lru", True), ("lfu", True), ("priority", False)]


def build(preset: str, dense_device: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """The preset's model with random weights: experts on the CPU (filled
    from a random pool, so that 93 GB take seconds, not minutes), everything
    else on dense_device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(PRESETS[preset])
    mxfp4 = kw.pop("expert_format", "bf16") == "mxfp4"
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 26, generator=g) * 0.02).to(dtype)  # 64 Mi values
    offset = 0

    def filled(shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal offset
        t = torch.empty(shape, dtype=dtype)
        flat = t.view(-1)
        i = 0
        while i < flat.numel():
            n = min(flat.numel() - i, pool.numel() - offset)
            flat[i : i + n].copy_(pool[offset : offset + n])
            i += n
            offset = (offset + n + 7919) % (pool.numel() - 1)
        return t

    gd = torch.Generator(device=dense_device).manual_seed(seed + 1)
    for name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if name.endswith(".experts"):
                if mxfp4:  # built as MXFP4 host tensors by mxfp4_experts; the shapes stay on meta
                    continue
                t = filled(tuple(p.shape))
            elif "norm" in pname or "norm" in name:
                t = torch.ones(p.shape, dtype=dtype, device=dense_device)
            else:
                t = (torch.randn(p.shape, generator=gd, device=dense_device, dtype=torch.float32) * 0.02).to(dtype)
            module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        if any(b is not None and b.device.type == "meta" for b in module._buffers.values()):
            if hasattr(module, "inv_freq"):  # rotary embeddings: rebuild on the device
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # built on the host: transformers < 5.25 took a device
                    # argument, 5.25 does not; the buffers move afterwards.
                    fresh = type(module)(config=cfg)
                for bname, b in fresh._buffers.items():
                    module._buffers[bname] = b.to(dense_device)
                for attr in ("attention_scaling", "original_inv_freq"):
                    if hasattr(fresh, attr):
                        setattr(module, attr, getattr(fresh, attr))
            else:
                for bname, b in module._buffers.items():
                    if b is not None and b.device.type == "meta":
                        module._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype, device=dense_device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta" and not (mxfp4 and ".experts." in n)]
    if left:
        raise RuntimeError(f"left on the meta device: {left[:5]}")
    model.tie_weights = lambda *a, **k: None  # nothing to tie: weights are fresh
    return model.eval(), cfg


def mxfp4_experts(model, seed: int = 0):
    """For a preset built with MXFP4 experts: a function of an experts
    module's path giving its host tensors as gpt-oss's release stores them
    (gate_up_proj_blocks [E, 2I, H/32, 16] and gate_up_proj_scales
    [E, 2I, H/32], down_proj's [E, H, I/32, 16] and [E, H, I/32], uint8;
    bfloat16 biases), random: blocks any e2m1 codes, scales 2^-8 to 2^-6 (so
    weights are about as large as the bf16 presets'), filled from a random
    pool so that 61 GB take seconds."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (1 << 26,), generator=g, dtype=torch.uint8)
    scale_pool = torch.randint(119, 122, (1 << 20,), generator=g, dtype=torch.uint8)
    bias_pool = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
    offset = [0]

    def filled(shape: tuple[int, ...], src: torch.Tensor) -> torch.Tensor:
        t = torch.empty(shape, dtype=src.dtype)
        flat = t.view(-1)
        i = 0
        while i < flat.numel():
            o = offset[0] % (src.numel() - 1)
            n = min(flat.numel() - i, src.numel() - o)
            flat[i : i + n].copy_(src[o : o + n])
            i += n
            offset[0] = o + n + 7919
        return t

    cfg = model.config
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size

    def experts(path: str) -> dict[str, torch.Tensor]:
        return {
            "gate_up_proj_blocks": filled((E, 2 * I, H // 32, 16), pool),
            "gate_up_proj_scales": filled((E, 2 * I, H // 32), scale_pool),
            "gate_up_proj_bias": filled((E, 2 * I), bias_pool),
            "down_proj_blocks": filled((E, H, I // 32, 16), pool),
            "down_proj_scales": filled((E, H, I // 32), scale_pool),
            "down_proj_bias": filled((E, H), bias_pool),
        }

    return experts


def pinned_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Host→device copy bandwidth from pinned memory, GB/s (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()  # measured before the model loads: leave its memory free
    return nbytes / statistics.median(times[1:]) / 1e9


def generated_routing(L: int, E: int, k: int, tokens: int, skew: float, seed: int) -> np.ndarray:
    """Expert ids [tokens, L, k] of one request drawn like go/sim's trace
    generator (GenParams, one cluster): per layer a random permutation ranks
    the experts, and each token draws k distinct ranks with probability ∝
    (rank + 1)^-skew, without replacement (Efraimidis–Spirakis keys)."""
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(E) for _ in range(L)])  # [L, E]: rank -> expert
    inv_w = np.arange(1, E + 1, dtype=np.float64) ** skew
    keys = rng.exponential(size=(tokens, L, E)) * inv_w
    ranks = np.argsort(keys, axis=-1)[..., :k]
    return np.take_along_axis(np.broadcast_to(perm, (tokens, L, E)), ranks, axis=-1)


def prompt_experts(forced: "ForcedRouting | None", prompt_len: int) -> int | None:
    """The distinct (layer, expert) pairs a prompt of prompt_len tokens uses
    under forced routing (its first prompt_len tokens); None under the
    model's own routing, which is not known ahead."""
    if forced is None:
        return None
    ids = forced.ids[:prompt_len].cpu()  # [tokens, L, k]
    return sum(int(torch.unique(ids[:, layer]).numel()) for layer in range(ids.shape[1]))


class ForcedRouting:
    """Replaces the router's choice in every MoE layer with a generated
    trace, through the runtime's routing override: token t of a run (prompt
    and decoded tokens in order) uses ids[t % len(ids), layer]. The position
    is a device counter advanced after the last MoE layer, so CUDA-graph
    replays (which replay the override's captured operations) follow the
    trace too. The routing weights stay the router's (they only mix the
    outputs)."""

    def __init__(self, rt, ids: np.ndarray, device: torch.device):
        self.rt = rt
        self.ids = torch.as_tensor(ids, dtype=torch.int64, device=device).contiguous()
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)
        self.last = len(rt.layers) - 1
        self.steps = torch.arange(4096, dtype=torch.int64, device=device)
        rt.set_routing_override(self)

    def reset(self) -> None:
        """Starts the trace again from its first token."""
        self.cursor.zero_()

    def remove(self) -> None:
        """Gives the layers the router's choice back."""
        if self.rt.routing_override is self:
            self.rt.set_routing_override(None)

    def __call__(self, layer_index: int, top_k_index: torch.Tensor, requests: list[int]) -> torch.Tensor:
        T = top_k_index.shape[0]
        rows = (self.cursor + self.steps[:T]) % self.ids.shape[0]
        forced = self.ids[rows, layer_index].contiguous()
        if layer_index == self.last:
            self.cursor.add_(T)
        return forced


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_run(model, prompt: torch.Tensor, n_decode: int, device: torch.device) -> dict[str, Any]:
    """Prefill + n_decode greedy steps, timing each step."""
    from transformers import DynamicCache

    times = []
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        with model.moe_runtime.requests(1):
            out = model(input_ids=prompt, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            ttft = time.perf_counter() - t0
            pkv = output_cache(out)
            model.reset_moe_stats()
            for _ in range(n_decode):
                t0 = time.perf_counter()
                out = model(input_ids=nxt, **cache_kwargs(model, pkv), use_cache=True)
                pkv = output_cache(out)
                nxt = out.logits[:, -1:].argmax(-1)
                _sync(device)
                times.append(time.perf_counter() - t0)
    return {"ttft_s": ttft, "step_s": times}


def decode_run_graph(dec, prompt: torch.Tensor, n_decode: int, pipeline: bool = False) -> dict[str, Any]:
    """The same as decode_run with every decode step replayed from a CUDA
    graph (moe_infinity.graphs.GraphDecoder): prefill, then n_decode
    greedy tokens."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.generate(prompt, max_new_tokens=n_decode + 1, on_prefill=dec.model.reset_moe_stats, pipeline=pipeline)
    total = time.perf_counter() - t0
    return {"ttft_s": total - sum(dec.step_s), "step_s": list(dec.step_s), "host_s": list(dec.host_s), "engine_s": list(dec.engine_s),
            "launch_s": list(dec.launch_s)}


def gpu_seconds(fn, reps: int = 3) -> float:
    """GPU time of fn() (the sum of its kernels and copies, from the
    profiler), median over reps: host gaps between kernels do not count."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    totals = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        us = 0.0
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", None)
            us += t if t is not None else ev.self_cuda_time_total
        totals.append(us / 1e6)
    return statistics.median(totals)


def compute_time(model, device: torch.device, reps: int = 8) -> tuple[float, float]:
    """(GPU compute, host-bound wall time) of one decode step with the
    experts resident. GPU compute is what the floor adds to the copies: the
    kernels of the dense part (the experts skipped: rt.experts_skipped()) plus L × one layer's
    expert FFN on resident experts, summed from the profiler. The wall time
    of the dense part alone shows how much of an eager step is host-bound
    (Python and kernel launches), which CUDA graphs remove."""
    rt = model.moe_runtime
    from transformers import DynamicCache

    ids = torch.tensor([[1]], device=device)

    def dense_step():
        model(input_ids=ids, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True)

    with rt.experts_skipped(), torch.no_grad():
        times = []
        for _ in range(reps + 2):
            _sync(device)
            t0 = time.perf_counter()
            dense_step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        wall = statistics.median(times[2:])
        if device.type != "cuda":
            return wall, wall
        dense_gpu = gpu_seconds(dense_step)
    if not rt.kernels:
        return dense_gpu, wall
    k = model.config.num_experts_per_tok
    hidden = torch.randn(1, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    idx = torch.arange(k, device=device).view(1, k)
    w = torch.full((1, k), 1.0 / k, device=device)
    per_layer = gpu_seconds(lambda: rt.run_experts(0, hidden, idx, w, list(range(k))))
    return dense_gpu + per_layer * len(rt.layers), wall


def run_moe_infinity(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every --expert-dtype in turn, in this process: each builds the same
    seeded model, offloads it with its experts in that dtype, and measures
    on the same routing and at the same measured link rate. The fp8 rows
    carry their s/token as a fraction of the bf16 row's measured beside
    them (same policy, prefetch and miss path)."""
    import gc

    device = torch.device(args.device)
    bw = pinned_bandwidth(device) if device.type == "cuda" else None
    rows: list[dict[str, Any]] = []
    for expert_dtype in expert_dtypes(args.expert_dtype):
        for build in kernel_builds(args.kernel_build):
            rows += _run_one(args, expert_dtype, bw, rows, build)
            gc.collect()  # the previous model's host experts go before the next is built
    return rows


def _comma_list(flag: str, value: str, ok: Any, hint: str) -> list[str]:
    """A comma list option's values, each once, each passing ``ok``;
    otherwise ValueError naming the option and saying what it takes."""
    out = [v.strip() for v in value.split(",") if v.strip()]
    if not out or not all(ok(v) for v in out) or len(set(out)) != len(out):
        raise ValueError(f"{flag} {value!r}: {hint}")
    return out


def cpu_experts_modes(value: str | None) -> list[str | None]:
    """The --cpu-experts list: [None] (the engine's default) when not
    given, else "off", "auto", a thread count, or a comma list of them
    (measured one after the other on one loaded model: the CPU's part
    paused for "off", and measured again on each thread count)."""
    if value is None:
        return [None]
    hint = "give off, auto, a thread count, or a comma list of them, each once"
    return _comma_list("--cpu-experts", value, lambda v: v in ("off", "auto") or (v.isdigit() and int(v) > 0), hint)


def link_rates(value: str) -> dict[str, float]:
    """The --link-rates value DMA,ZERO_COPY,REACTION_US as the engine
    option link_rates: the link's DMA and zero-copy read rates (GB/s, > 0)
    and its reaction (µs, >= 0), given instead of measured (on the CPU
    backend, a link of any speed for the cost model to weigh the CPU
    against)."""
    parts = value.split(",")
    try:
        dma, zero_copy, reaction = (float(v) for v in parts)
    except ValueError:
        dma = zero_copy = reaction = float("nan")
    if not (dma > 0 and zero_copy > 0 and reaction >= 0 and all(map(math.isfinite, (dma, zero_copy, reaction)))):
        raise ValueError(f"--link-rates {value!r}: give DMA,ZERO_COPY,REACTION_US: two rates in GB/s > 0 and a reaction in µs >= 0")
    return {"dma_gbps": dma, "zero_copy_gbps": zero_copy, "reaction_us": reaction}


def add_hybrid_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the CPU's part and the link, shared by the decode and
    the serving benchmarks: --cpu-experts, --measure-link, --link-rates,
    --model-link (checked by hybrid_arguments, turned into engine options
    by hybrid_options)."""
    ap.add_argument("--cpu-experts", default=None,
                    help="engine option cpu_experts: off, auto or a thread count, or a comma list such as off,auto,12 measured one "
                         "after the other on one loaded model (the CPU computes missed experts where they lie; on a GPU it needs the link's "
                         "rates: --measure-link or --link-rates)")
    ap.add_argument("--measure-link", action="store_true",
                    help="engine option measure_link: measure the link's DMA and zero-copy rates and reaction at start-up (the "
                         "graph_misses auto choice and the hybrid cost model use them)")
    ap.add_argument("--link-rates", metavar="DMA,ZERO_COPY,REACTION_US",
                    help="engine option link_rates: the link's DMA and zero-copy rates (GB/s) and reaction (us), given instead of measured")
    ap.add_argument("--model-link", action="store_true",
                    help="engine option model_link: on the CPU backend, copies take as long as --link-rates says (a machine "
                         "without a GPU measuring the time of link-bound choices)")


def hybrid_arguments(args: argparse.Namespace) -> list[str | None]:
    """Checks add_hybrid_arguments' values (ValueError saying what is
    wrong) and returns the --cpu-experts list (cpu_experts_modes)."""
    modes = cpu_experts_modes(args.cpu_experts)
    if args.link_rates:
        link_rates(args.link_rates)
    if args.model_link and not args.link_rates:
        raise ValueError("--model-link needs --link-rates: the rates of the link to model")
    return modes


def hybrid_options(cpu_modes: list[str | None], measure_link: bool, rates: str | None, model_link: bool = False) -> dict[str, Any]:
    """The engine options of --cpu-experts (its list, cpu_experts_modes),
    --measure-link, --link-rates and --model-link: the model loads with the
    first setting of the list that turns the CPU's part on (so that it is
    set up, and "off" rows pause it), or "off" when none does."""
    opts: dict[str, Any] = {"model_link": True} if model_link else {}
    on = [m for m in cpu_modes if m not in (None, "off")]
    if cpu_modes != [None]:
        opts["cpu_experts"] = cpu_setting(on[0]) if on else "off"
    if measure_link:
        opts["measure_link"] = True
    if rates:
        opts["link_rates"] = link_rates(rates)
    return opts


def cpu_setting(mode: str) -> str | int:
    """A --cpu-experts list entry as the engine's cpu_experts value."""
    return int(mode) if mode.isdigit() else mode


#: --kernel-build values (the engine option kernel_build's names).
KERNEL_BUILDS = ("sm80", "sm89")


def kernel_builds(value: str | None) -> list[str | None]:
    """The --kernel-build list: [None] (the engine's default) when not
    given, else "sm80", "sm89" or a comma list of them."""
    if value is None:
        return [None]
    return _comma_list("--kernel-build", value, KERNEL_BUILDS.__contains__, "give sm80, sm89 or a comma list of them, each once")


def expert_dtypes(value: str) -> list[str]:
    """The --expert-dtype list: "bf16", "fp8" or a comma list of them."""
    return _comma_list("--expert-dtype", value, EXPERT_DTYPES.__contains__, "give bf16, fp8 or a comma list of them, each once")


#: --expert-dtype values: bf16 serves the random bfloat16 experts as built; fp8 compresses them
#: to block FP8 in host memory (offload(expert_dtype="fp8")).
EXPERT_DTYPES = ("bf16", "fp8")


def _run_one(args: argparse.Namespace, expert_dtype: str, bw: float | None, earlier: list[dict[str, Any]],
             kernel_build: str | None = None) -> list[dict[str, Any]]:
    import moe_infinity as mi

    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, cfg = build(args.preset, "cuda" if device.type == "cuda" else "cpu")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    opts: dict[str, Any] = {} if args.admit_margin is None else {"admit_margin": args.admit_margin}
    if args.quantized_kernels:
        opts["quantized_kernels"] = True
    if kernel_build is not None:
        opts["kernel_build"] = kernel_build
    cpu_modes = cpu_experts_modes(args.cpu_experts)
    opts.update(hybrid_options(cpu_modes, args.measure_link, args.link_rates, args.model_link))
    if expert_format(args.preset) == "mxfp4":
        from .loading import offload_host_experts

        expert_dtype = "mxfp4"
        model = offload_host_experts(model, mxfp4_experts(model), {"quant_method": "mxfp4"}, device=device, device_memory=args.device_memory,
                                     kernels=not args.no_kernels, engine_options=opts)
    else:
        model = mi.offload(model, device=device, device_memory=args.device_memory, kernels=not args.no_kernels, engine_options=opts,
                           expert_dtype="fp8" if expert_dtype == "fp8" else None)
    offloaded = time.perf_counter() - t0
    rt = model.moe_runtime
    if args.no_mapped:
        rt.set_mapped(False)
    plan = model.moe_stats()["plan"]
    compute, dense_wall = compute_time(model, device)
    forced = None
    if args.routing == "generated":
        n_tok = args.prompt_len + args.decode + 8
        ids = generated_routing(len(rt.layers), rt.num_experts, cfg.num_experts_per_tok, n_tok, args.skew, args.routing_seed)
        forced = ForcedRouting(rt, ids, device)
        routing_label = (f"generated: L={len(rt.layers)} E={rt.num_experts} k={cfg.num_experts_per_tok} requests=1 "
                         f"tokens={n_tok} clusters=1 skew={args.skew} seed={args.routing_seed} (decode.py)")
    else:
        routing_label = "model (random weights)"
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
    # Warm-up (not recorded) over the same prompt and length: first-use
    # costs (lazy initialisation, per-shape kernel selection for every KV
    # length) must not land on the first ablation.
    decode_run(model, prompt, args.decode, device)
    rows: list[dict[str, Any]] = []
    modes = [m.strip() for m in args.graph_misses.split(",")] if args.graph else [None]
    try:
        for mode in modes:
            for cpu in cpu_modes:
                if cpu is not None:  # one loaded model: the CPU's part paused or resumed (recaptured by measure)
                    model.moe_tune(cpu_experts=cpu_setting(cpu))
                rows += measure(args, model, cfg, plan, prompt, forced, routing_label, bw, compute, dense_wall, built, offloaded, mode,
                                expert_dtype, earlier + rows, cpu)
    finally:
        model.close()
    return rows


def measure(args, model, cfg, plan, prompt, forced, routing_label, bw, compute, dense_wall, built, offloaded, mode,
            expert_dtype: str = "bf16", earlier: list[dict[str, Any]] | None = None, cpu_experts: str | None = None) -> list[dict[str, Any]]:
    """The ablations of one configuration (graph_misses ``mode`` for CUDA
    graphs: the step is captured again under it; ``cpu_experts`` as
    --cpu-experts gave it, None for the engine's default). ``earlier``:
    rows of this run already measured, where an fp8 row finds its bf16
    twin and a hybrid row its cpu_experts "off" twin."""
    import moe_infinity as mi

    rt = model.moe_runtime
    device = torch.device(args.device)
    dec = None
    if args.graph:
        from moe_infinity.graphs import GraphDecoder

        model.moe_tune(graph_misses=mode)
        dec = GraphDecoder(model, max_len=args.prompt_len + args.decode + 2)
        decode_run_graph(dec, prompt, args.decode, args.pipeline)  # captures, warms up
    rows = []
    ablations = ABLATIONS if args.ablations else ABLATIONS[:1]
    for policy, prefetch in ablations:
        model.moe_tune(cache_policy=policy, prefetch=prefetch, flush=True, reset_stats=True)
        if forced is not None:
            forced.reset()
        r = decode_run_graph(dec, prompt, args.decode, args.pipeline) if dec is not None else decode_run(model, prompt, args.decode, device)
        st = model.moe_stats()
        ex = st["plan"]["executor"]
        n = len(r["step_s"])
        misses = st["misses"] / n
        # The bytes one miss moves: the expert as the cache stores it (for
        # fp8 the FP8 codes and their scales, about half of bf16's).
        slot = plan["slot_bytes"]
        floor = (misses * slot / (bw * 1e9) + compute) if bw else None
        med = statistics.median(r["step_s"])
        phase_ms = {k: v / 1e6 / n for k, v in st["phase_ns"].items()}
        overhead = (st["hook_seconds"] - st["hook_wait_seconds"]) / n
        host_submit = launch = None
        if "host_s" in r:
            # Replayed steps: no hook runs. The engine's host time is its
            # per-step call plus what its goroutines do for the step (the
            # copy driver's work after each layer's routing arrives, the
            # tracer's): none of it waits on copies or compute. The host's
            # whole submit (inputs, torch's graph launch, the engine call)
            # is reported beside it.
            overhead = statistics.fmean(r["engine_s"]) + (phase_ms.get("serve", 0) + phase_ms.get("trace_async", 0)) / 1e3
            host_submit, launch = statistics.fmean(r["host_s"]), statistics.fmean(r["launch_s"])
        prompt_used = prompt_experts(forced, args.prompt_len)
        executor = plan.get("executor", {})
        rows.append(
            {
                "system": "moe_infinity",
                "preset": args.preset,
                "expert_dtype": expert_dtype,
                "kernel_build": plan.get("kernel_build"),
                # The setting (None: the engine's default) and what the
                # executor made of it: the kernels or the caller's code.
                "quantized_kernels": True if args.quantized_kernels else None,
                "executor_kernels": executor.get("kernels"),
                # The kernel crossover the engine decided with ("measured" at
                # a GPU load: the most tokens the kernels take) and the probe's
                # timings behind it.
                "kernel_crossover": executor.get("kernel_crossover"),
                "kernel_max_tokens": executor.get("kernel_max_tokens"),
                "kernel_probe": rt.plan.get("kernel_probe"),
                "policy": policy,
                "prefetch": prefetch,
                "admit_margin": args.admit_margin,
                "routing": routing_label,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "device_memory": args.device_memory,
                "prompt_len": args.prompt_len,
                "decoded_tokens": n,
                "decode_s_per_token": med,
                "decode_s_per_token_mean": statistics.fmean(r["step_s"]),
                "ttft_s": r["ttft_s"],
                # The prefill's link floor: every expert the prompt uses moved
                # over the link once (known ahead only under generated routing).
                "prompt_experts": prompt_used,
                "ttft_link_floor_s": prompt_used * slot / (bw * 1e9) if prompt_used is not None and bw else None,
                "hit_rate": st["hit_rate"],
                "misses_per_token": misses,
                "prefetch_hits_per_token": st["prefetch_hits"] / n,
                "prefetch_loads_per_token": st["prefetch_loads"] / n,
                "late_prefetches_per_token": st["late_prefetches"] / n,
                "wasted_prefetches_per_token": st["wasted_prefetches"] / n,
                "bytes_moved_per_token": st["bytes_moved"] / n,
                "stall_s_per_token": st["stall_seconds"] / n,
                "overhead_ms_per_token": overhead * 1e3,
                "overhead_us_per_moe_layer": overhead * 1e6 / len(rt.layers),
                "host_submit_ms_per_token": host_submit * 1e3 if host_submit is not None else None,
                "graph_launch_ms_per_token": launch * 1e3 if launch is not None else None,
                "graph_engine_us_per_moe_layer": statistics.fmean(r["engine_s"]) * 1e6 / len(rt.layers) if "engine_s" in r else None,
                "mapped": bool(rt.mapped),
                "cuda_graph": dec is not None,
                "pipelined": bool(dec is not None and args.pipeline),
                "graph_capture_s": dec.capture_s if dec is not None else None,
                "graph_misses": st.get("graph_misses") if dec is not None else None,
                # Hybrid execution (the CPU computes missed experts where they
                # lie): the knob as given, what the engine made of it, and
                # what the CPU did. Its misses still count in misses_per_token
                # and the GPU-only floor.
                "cpu_experts": cpu_experts,
                "hybrid": ex.get("hybrid"),
                "hybrid_off": ex.get("hybrid_off"),
                "graph_hand_off": ex.get("graph_hand_off"),
                "hybrid_costs": ex.get("hybrid_costs"),
                "cpu_threads": ex.get("cpu_threads"),
                "cpu_computed_per_token": st["cpu_computed"] / n,
                "cpu_ms_per_token": st["cpu_seconds"] * 1e3 / n,
                # How much longer than the start-up probe the CPU's experts
                # took in use (the engine scales its cost model by it).
                "cpu_scale": st.get("cpu_scale"),
                # The GPU-only floor (floor_s_per_token, named as the hybrid
                # issue reads it) and the hybrid floor: what the engine's cost
                # model expected its planned split of the misses to take, plus
                # compute (None where hybrid execution planned nothing).
                "gpu_only_floor_s_per_token": floor,
                "hybrid_floor_s_per_token": st["miss_plan_ns"] / 1e9 / n + compute if st.get("miss_plan_ns") else None,
                "link_rates": st["plan"].get("link_rates"),
                "link_rates_source": st["plan"].get("link_rates_source"),
                "model_link": args.model_link,
                "copy_late_layers": st.get("copy_late"),
                # Copy mode: the copy driver's host time per token (its own
                # thread, while layers wait), and the part before each
                # layer's first copy is issued, when the link is idle.
                "copy_driver_ms_per_token": phase_ms.get("serve", 0),
                "copy_reaction_ms_per_token": phase_ms.get("serve_pin", 0) + phase_ms.get("backend_serve_first_copy", 0),
                # GPU time the layers waited for their copies (moe_publish_wait's
                # timer), and what is left of it after the misses' transfer
                # time at the measured bandwidth: the link idle for the engine
                # (its reaction, including noticing the routing, and gaps).
                "copy_wait_ms_per_token": phase_ms.get("backend_gpu_wait", 0),
                "copy_wait_over_transfer_ms_per_token": (phase_ms["backend_gpu_wait"] - misses * slot / (bw * 1e9) * 1e3)
                if bw and phase_ms.get("backend_gpu_wait") else None,
                "hook_calls_per_token": st["hook_calls"] / n,
                "hook_phase_ms_per_token": {k: v * 1e3 / n for k, v in st["hook_phase_seconds"].items()},
                "engine_phase_ms_per_token": phase_ms,
                "slots": plan["slots"],
                "expert_bytes": slot,
                "pinned_h2d_GBps": bw,
                "compute_s_per_token": compute,
                "dense_wall_s_per_token": dense_wall,
                "floor_s_per_token": floor,
                "ratio_to_floor": (med / floor) if floor else None,
                "build_s": built,
                "offload_s": offloaded,
                "engine": mi.engine_version(),
                "host": host_facts(),
            }
        )
        pool = (earlier or []) + rows[:-1]
        rows[-1]["s_per_token_vs_bf16"] = _vs(rows[-1], pool, "expert_dtype", "bf16")
        rows[-1]["s_per_token_vs_sm80"] = _vs(rows[-1], pool, "kernel_build", "sm80")
        rows[-1]["s_per_token_vs_cpu_off"] = _vs(rows[-1], pool, "cpu_experts", "off")
        _emit(rows[-1], args)
    return rows


#: A row's settings: rows that differ in one of them only are twins.
_SETTINGS = ("policy", "prefetch", "graph_misses", "cuda_graph", "routing", "cpu_experts", "expert_dtype", "kernel_build")


def _vs(row: dict[str, Any], pool: list[dict[str, Any]], key: str, base: str) -> float | None:
    """row's s/token over its twin's in pool: the row of the same settings
    but ``key`` = ``base`` (bf16 experts, the sm80 build, cpu_experts
    "off"); None for a row that is itself the base (or has no ``key``),
    or that has no twin."""
    if row.get(key) in (base, None):
        return None
    twin = next((r for r in pool if r.get(key) == base and all(r.get(k) == row.get(k) for k in _SETTINGS if k != key)), None)
    return row["decode_s_per_token"] / twin["decode_s_per_token"] if twin else None


def run_accelerate(args: argparse.Namespace) -> dict[str, Any]:
    """The same model with accelerate's device_map offloading (own process)."""
    from accelerate import dispatch_model, infer_auto_device_map

    model, cfg = build(args.preset, "cpu")
    max_memory = {0: args.device_memory, "cpu": args.accelerate_cpu_memory}
    dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16)
    model = dispatch_model(model, device_map=dmap)
    device = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
    from transformers import DynamicCache

    times = []
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        pkv, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(args.accelerate_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=nxt.to(device), **cache_kwargs(model, pkv), use_cache=True)
            pkv, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    on_gpu = sum(1 for v in dmap.values() if v == 0)
    row = {
        "system": "accelerate",
        "preset": args.preset,
        "device": torch.cuda.get_device_name(0),
        "device_memory": args.device_memory,
        "prompt_len": args.prompt_len,
        "decoded_tokens": len(times),
        "decode_s_per_token": statistics.median(times),
        "ttft_s": ttft,
        "modules_on_gpu": on_gpu,
        "modules": len(dmap),
        "host": host_facts(),
    }
    _emit(row, args)
    return row


#: The table's columns: (header, row key, format).
_TABLE = (
    ("system", "system", "{}"),
    ("experts", "expert_dtype", "{}"),
    ("policy", "policy", "{}"),
    ("prefetch", "prefetch", "{}"),
    ("routing", "routing", "{}"),
    ("device", "device", "{}"),
    ("kernels", "kernel_build", "{}"),
    ("s/token", "decode_s_per_token", "{:.4f}"),
    ("TTFT s", "ttft_s", "{:.3f}"),
    ("TTFT link floor s", "ttft_link_floor_s", "{:.3f}"),
    ("hit rate", "hit_rate", "{:.1%}"),
    ("misses/token", "misses_per_token", "{:.1f}"),
    ("x floor", "ratio_to_floor", "{:.2f}"),
    ("x bf16", "s_per_token_vs_bf16", "{:.2f}"),
    ("x sm80", "s_per_token_vs_sm80", "{:.2f}"),
    ("cpu", "cpu_experts", "{}"),
    ("cpu/token", "cpu_computed_per_token", "{:.1f}"),
    ("x cpu off", "s_per_token_vs_cpu_off", "{:.2f}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "routing":  # the label's first word: "model" or "generated"
        v = str(v).split(":")[0].split(" (")[0]
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (the default output of ``bench``;
    ``--json`` prints the rows themselves)."""
    cells = [[h for h, _, _ in _TABLE]] + [[_cell(r, k, f) for _, k, f in _TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_TABLE))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i >= 7 else c[i].ljust(widths[i]) for i in range(len(_TABLE))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(row: dict[str, Any], args: argparse.Namespace) -> None:
    """A finished row: its JSON line with --json, else a progress line on
    stderr (the table comes at the end)."""
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        print(f"bench: {row['system']} {row.get('expert_dtype', '')} {row.get('kernel_build') or ''} {row.get('policy', '')} done: {_cell(row, 'decode_s_per_token', '{:.4f}')} s/token", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-infinity bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--device-memory", default="24GiB")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--no-ablations", dest="ablations", action="store_false", help="only priority + prefetch")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--graph", action="store_true", help="replay each decode step from a CUDA graph (needs mapped mode)")
    ap.add_argument("--graph-misses", default="auto",
                    help="with --graph: how replayed layers get missed experts, auto|read|copy, or a comma list to measure each (recaptured)")
    ap.add_argument("--pipeline", action="store_true", help="with --graph: queue each replay before reading the previous token")
    ap.add_argument("--admit-margin", type=float, help="engine admission margin (default: the engine's)")
    ap.add_argument("--expert-dtype", default="bf16",
                    help="experts as served: bf16 (as built), fp8 (compressed to block FP8 in host memory), or a comma list "
                         "(bf16,fp8) measured one after the other in this process on the same weights and routing")
    ap.add_argument("--quantized-kernels", action="store_true",
                    help="engine option quantized_kernels true: the GPU computes FP8 experts with its FP8 kernels (their default), "
                         "and gpt-oss experts (the MXFP4 presets) with its gpt-oss kernels")
    ap.add_argument("--kernel-build", default=None,
                    help="engine option kernel_build: sm80 (the engine's default) or sm89 (compute capability >= 8.9: hardware "
                         "FP8 decoding), or a comma list (sm80,sm89) measured one after the other in this process on the same "
                         "weights and routing")
    add_hybrid_arguments(ap)
    ap.add_argument("--routing", choices=["model", "generated"], default="model",
                    help="model: the router's choice (random weights route narrowly); generated: a labelled generated trace (skewed popularity)")
    ap.add_argument("--skew", type=float, default=1.0, help="with --routing generated: popularity exponent (0 = uniform)")
    ap.add_argument("--routing-seed", type=int, default=1)
    ap.add_argument("--no-mapped", action="store_true", help="synchronous layers (routing to the host, copies, kernels) instead of mapped mode")
    ap.add_argument("--accelerate", action="store_true", help="also run accelerate offloading in its own process")
    ap.add_argument("--accelerate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--accelerate-tokens", type=int, default=3)
    ap.add_argument("--accelerate-cpu-memory", default="120GiB")
    ap.add_argument("--out", help="write the JSON list here")
    ap.add_argument("--json", action="store_true", help="print each row as a JSON line as it finishes, instead of a table at the end")
    args = ap.parse_args(argv)
    try:
        dtypes = expert_dtypes(args.expert_dtype)
        kernel_builds(args.kernel_build)
        hybrid_arguments(args)
    except ValueError as e:
        ap.error(str(e))
    if expert_format(args.preset) == "mxfp4":
        if dtypes != ["bf16"]:
            ap.error(f"--preset {args.preset} builds MXFP4 experts, as the release ships them; --expert-dtype does not apply")
        if args.accelerate or args.accelerate_only:
            # accelerate would hold the experts dequantized to bf16 (229 GB for gpt-oss-120b) in host memory.
            ap.error(f"--preset {args.preset}: --accelerate is not supported (accelerate holds the experts dequantized to bfloat16 in host memory)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}, but torch sees no usable GPU (use --device cpu)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.accelerate_only:
        rows = [run_accelerate(args)]
    else:
        rows = run_moe_infinity(args)
        if args.accelerate:
            cmd = [sys.executable, "-m", "moe_infinity", "bench", "--json", "--accelerate-only", "--preset", args.preset, "--device-memory", args.device_memory,
                   "--prompt-len", str(args.prompt_len), "--accelerate-tokens", str(args.accelerate_tokens),
                   "--accelerate-cpu-memory", args.accelerate_cpu_memory]
            out = subprocess.run(cmd, capture_output=True, text=True)
            sys.stderr.write(out.stderr[-4000:])
            rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if not args.json:
        print(format_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
