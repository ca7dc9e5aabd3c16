"""The per-model runtime: routes each MoE layer's experts through the engine.

Data path of one MoE layer (the router stays in torch)::

    experts module forward(hidden, top_k_index, top_k_weights)
      → observe: per-request token counts per expert → engine (tracing, prefetch re-plan)
      → acquire: the layer's experts become resident and pinned (in chunks of
        at most the number of slots, so a layer needing more experts than the
        cache holds streams them through)
      → compute with transformers' own expert code on views of the slots
      → release the pins

For exact parity with transformers the computation is transformers' own:

* fused experts (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, GPT-OSS) run the
  implementation the unmodified model would run (``config._experts_implementation``):
  ``eager`` executes the class's own eager forward on a proxy whose
  ``gate_up_proj[e]`` is the slot view; ``grouped_mm``/``batched_mm`` run
  transformers' function on the needed experts stacked in expert order, with
  expert ids renumbered (each expert's GEMM and the per-token sum are the
  same operations in the same order, so results are bitwise equal);
* ModuleDict experts (SwitchTransformers, NLLB-MoE) run their own forward,
  with each expert's ``nn.Linear`` replaced by a module whose weight is the
  slot view of the expert being computed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .engine import Engine
from .errors import BudgetError, CheckpointFormatError, ClosedError, MoEInfinityError, StateError, UnsupportedError
from .families import Family

log = logging.getLogger("moe_infinity")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The kernels are GEMVs over each (token, expert) pair, made for decode:
#: they read an expert's weights once per pair, so they win while few tokens
#: share an expert. Measured on an H200 (BENCHMARKS.md): 2.6x faster than
#: torch for one token on Mixtral-sized experts but slower at 4 tokens, and
#: 15-23x faster for fine-grained experts (<= 16 MiB) up to 4 tokens. Larger
#: batches run transformers' grouped GEMMs on slot views.
KERNEL_MAX_TOKENS = 16
KERNEL_SMALL_EXPERT_BYTES = 16 << 20
#: The most (token, expert) pairs one mapped-mode call takes (the engine's
#: routing buffers).
MAPPED_MAX_PAIRS = 4096
#: Routing-weight type codes of moe_layer_mapped.
_WDTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _raw_stream_getter(device: torch.device) -> Any:
    """A fast getter of the current raw CUDA stream of ``device``
    (torch.cuda.current_stream builds a Python Stream object: ~8 µs)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: raw(idx)
    return lambda: torch.cuda.current_stream(device).cuda_stream


def kernel_wins(tokens: int, expert_bytes: int) -> bool:
    """Whether the engine's decode kernels beat torch for this step."""
    if tokens <= 1:
        return True
    return tokens <= KERNEL_MAX_TOKENS and expert_bytes <= KERNEL_SMALL_EXPERT_BYTES


def _configure_with_progress(engine: Engine, layout: dict[str, Any], layers: list[str], budget_bytes: int | None, progress: Any) -> dict[str, Any]:
    """engine.configure, reporting the host tier's preparation (pinning
    experts for the GPU can take a while) through ``progress(done, total)``
    from a polling thread."""
    if progress is None:
        return engine.configure(layout, layers=layers, budget_bytes=budget_bytes)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            try:
                done, total = engine.progress()
            except MoEInfinityError:
                return
            if total:
                progress(done, total)

    t = threading.Thread(target=poll, name="moe_infinity-progress", daemon=True)
    t.start()
    try:
        plan = engine.configure(layout, layers=layers, budget_bytes=budget_bytes)
    finally:
        stop.set()
        t.join()
    done, total = engine.progress()
    if total:
        progress(done, total)
    return plan


@dataclass
class MoELayer:
    """One offloaded MoE layer."""

    index: int  # position in execution order
    path: str  # module path of the experts module ("model.layers.0.mlp.experts")
    prefix: str  # the engine's checkpoint prefix ("model.layers.0.block_sparse_moe")
    module: torch.nn.Module
    num_experts: int


class _Streamer:
    """Keeps one chunk of a layer's experts pinned and yields slot views.

    ``order`` is the layer's experts in the order the computation visits
    them (ascending ids, as transformers loops); a miss on expert ``e``
    releases the current chunk and pins the next ``max_pin`` experts from
    ``e`` on, so that at most one acquire call is made per chunk.
    """

    def __init__(self, rt: OffloadRuntime, layer: int, order: Sequence[int]):
        self.rt = rt
        self.layer = layer
        self.order = list(order)
        self.pos = {e: i for i, e in enumerate(self.order)}
        self.cur: dict[int, int] = {}
        self.lease: int | None = None

    def slot(self, expert: int) -> int:
        s = self.cur.get(expert)
        if s is None:
            s = self._advance(expert)
        return s

    def view(self, expert: int, region: str) -> torch.Tensor:
        return self.rt.views[self.slot(expert)][region]

    def _advance(self, expert: int) -> int:
        self.release()
        i = self.pos.get(expert)
        chunk = self.order[i : i + self.rt.max_pin] if i is not None else [expert]
        slots, lease = self.rt.engine.acquire(self.layer, chunk, self.rt.stream())
        self.lease = lease
        self.cur = dict(zip(chunk, slots))
        return self.cur[expert]

    def release(self) -> None:
        if self.lease is not None:
            lease, self.lease = self.lease, None
            self.cur = {}
            self.rt.engine.release(lease, self.rt.stream())

    def __enter__(self) -> _Streamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Indexer:
    """Stands in for a fused 3D expert parameter: ``p[e]`` is expert e's slot view."""

    __slots__ = ("_st", "_region", "shape", "dtype", "device")

    def __init__(self, st: _Streamer, region: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self._st = st
        self._region = region
        self.shape = shape
        self.dtype = dtype
        self.device = device

    def __getitem__(self, expert: Any) -> torch.Tensor:
        return self._st.view(int(expert), self._region)


class _ExpertsProxy:
    """The experts module as transformers' expert code sees it, with the
    expert parameters replaced (everything else is the real module's)."""

    def __init__(self, module: torch.nn.Module, overrides: dict[str, Any]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        ov = object.__getattribute__(self, "_overrides")
        if name in ov:
            return ov[name]
        return getattr(object.__getattribute__(self, "_module"), name)


class SlotLinear(torch.nn.Module):
    """An ``nn.Linear`` of one ModuleDict expert whose weight and bias are
    views of the expert's cache slot, valid while its layer computes."""

    def __init__(self, rt: OffloadRuntime, layer: int, expert: int, name: str, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self._rt = rt
        self._layer = layer
        self._expert = expert
        self._name = name
        self.in_features = in_features
        self.out_features = out_features
        self._has_bias = has_bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._rt.streamer(self._layer).view(self._expert, self._name + ".weight")

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        if not self._has_bias:
            return None
        return self._rt.streamer(self._layer).view(self._expert, self._name + ".bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self._has_bias}, offloaded expert {self._expert} of MoE layer {self._layer}"


class _DeviceBuffer:
    """Exposes engine-owned GPU memory to torch (zero copy) through the CUDA
    array interface."""

    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None, "stream": None}


class OffloadRuntime:
    """Connects one transformers model to one engine."""

    def __init__(
        self,
        engine: Engine,
        family: Family,
        layers: list[MoELayer],
        region_meta: dict[str, tuple[tuple[int, ...], torch.dtype]],
        fused_on_disk: bool,
        *,
        device: torch.device | None = None,
        budget_bytes: int | None = None,
        kernels: bool = False,
        progress: Any = None,
    ):
        self.engine = engine
        self.family = family
        self.layers = layers
        self.region_meta = region_meta
        self.device = device or torch.device("cpu")
        # Host time spent in the MoE hooks, and the part of it spent waiting
        # for the GPU (the routing's device-to-host copy); nanoseconds.
        self.hook_ns = 0
        self.wait_ns = 0
        self.hook_calls = 0
        # When a list, every MoE layer call appends (layer index, routing as
        # a [T, k] int64 array): a recorder for traces and analyses.
        self.routing_log: list[tuple[int, np.ndarray]] | None = None
        # Host time by phase of the hook (nanoseconds): where overhead goes.
        self.phase_ns: dict[str, int] = {}
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._closed = False
        layout = {
            "regions": [
                {
                    "name": r.name,
                    "parts": r.parts(fused_on_disk),
                    "dtype": str(region_meta[r.name][1]).removeprefix("torch."),
                }
                for r in family.regions
            ]
        }
        self.plan = _configure_with_progress(engine, layout, [layer.prefix for layer in layers], budget_bytes, progress)
        for r in self.plan["layout"]["regions"]:
            want = tuple(region_meta[r["name"]][0])
            if tuple(r["shape"]) != want:
                roles = {ro["name"]: ro for m in engine.modules() if m["prefix"] == layers[0].prefix for ro in m["roles"]}
                src = roles.get(r["parts"][0], {})
                raise CheckpointFormatError(
                    f"{src.get('source', 'checkpoint')}: tensor \"{src.get('tensor', r['parts'][0])}\" does not fit the model's config: "
                    f"expert {r['name']} is {tuple(r['shape'])} in the checkpoint but the config makes it {want}"
                )
        self.num_experts = int(self.plan["num_experts"])
        self.max_pin = int(self.plan["slots"])
        self.views = self._build_views()
        # The engine's expert FFN kernels serve standard SwiGLU experts on the
        # GPU (bfloat16/float16); everything else runs transformers' code.
        self.kernels = False
        if kernels and self.device.type == "cuda" and family.style == "fused" and family.model_type != "gpt_oss":
            try:
                self.ffn_hidden, self.ffn_inter, self.ffn_dtype = engine.ffn_shape()
                self.kernels = True
            except MoEInfinityError as exc:
                log.info("moe_infinity: expert FFN kernels off: %s", exc)
        # Mapped mode (with the kernels): decode layers run without any host
        # synchronisation; experts that are not resident are read from
        # pinned host memory by the kernels. False uses the synchronous
        # path (routing to the host, copies, then the kernels).
        self.mapped = self.kernels
        self._scratch: dict[int, torch.Tensor] = {}
        self._raw_stream = _raw_stream_getter(self.device) if self.device.type == "cuda" else (lambda: 0)
        for layer in layers:
            if layer.num_experts != self.num_experts:
                raise StateError(f"{layer.path} has {layer.num_experts} experts but the checkpoint has {self.num_experts}")

    # -- memory -----------------------------------------------------------------

    def _build_views(self) -> list[dict[str, torch.Tensor]]:
        addr, size = self.engine.arena()
        if self.device.type == "cuda":
            arena = torch.as_tensor(_DeviceBuffer(addr, size), device=self.device)
        else:
            raw = (ctypes.c_uint8 * size).from_address(addr)
            arena = torch.frombuffer(raw, dtype=torch.uint8)
        self._arena = arena
        views = []
        slot_bytes = self.plan["slot_bytes"]
        for s in range(self.plan["slots"]):
            base = s * slot_bytes
            regs = {}
            for r in self.plan["layout"]["regions"]:
                off = base + r["offset"]
                regs[r["name"]] = arena[off : off + r["bytes"]].view(_TORCH_DTYPES[r["dtype"]]).view(r["shape"])
            views.append(regs)
        return views

    def stream(self) -> int:
        """The raw CUDA stream the calling thread computes on (0 on CPU)."""
        return self._raw_stream()

    # -- lifecycle --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._closed

    def check_open(self) -> None:
        """Raises ClosedError after close()."""
        if self._closed:
            raise ClosedError("this moe_infinity model was closed; load it again to use it")

    def close(self) -> None:
        """Closes the engine and drops every view of its memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.views = []
        self._arena = None
        self.engine.close()

    # -- requests ---------------------------------------------------------------

    @contextlib.contextmanager
    def requests(self, n: int) -> Iterator[list[int]]:
        """Traces ``n`` requests (one per batch row) for the duration of the
        block. Nested blocks in the same thread reuse the outer requests."""
        outer = getattr(self._tls, "reqs", None)
        if outer is not None:
            yield outer
            return
        self.check_open()
        reqs = [self.engine.begin_request() for _ in range(max(1, n))]
        self._tls.reqs = reqs
        self._tls.reqs_c = (ctypes.c_uint64 * len(reqs))(*reqs)
        try:
            yield reqs
        finally:
            self._tls.reqs = None
            self._tls.reqs_c = None
            # Every request is ended; the first error (a routing error the
            # mapped tracer found, say) is raised after.
            first: MoEInfinityError | None = None
            if not self._closed:
                for r in reqs:
                    try:
                        self.engine.end_request(r)
                    except ClosedError:
                        pass
                    except MoEInfinityError as exc:
                        first = first or exc
            if first is not None:
                raise first

    def active_requests(self) -> list[int] | None:
        """The calling thread's current requests, if inside requests()."""
        return getattr(self._tls, "reqs", None)

    def streamer(self, layer: int) -> _Streamer:
        """The calling thread's streamer of a ModuleDict layer being computed."""
        st = getattr(self._tls, "streamers", {}).get(layer)
        if st is None:
            raise StateError(f"expert weights of MoE layer {layer} are only available while that layer computes")
        return st

    # -- tracing ----------------------------------------------------------------

    def _observe_np(self, layer: int, tokens: np.ndarray, experts: np.ndarray, n_tokens: int) -> None:
        """Sends per-request counts of (token, expert) routing pairs. Tokens
        are split evenly between the active requests in row order (batch rows,
        beams of one request adjacent, as generate lays them out)."""
        reqs = self.active_requests()
        if not reqs:
            return
        E = self.num_experts
        R = len(reqs)
        if R > 1 and n_tokens % R == 0 and n_tokens > 0:
            row = tokens // (n_tokens // R)
            counts = np.bincount(row * E + experts, minlength=R * E).reshape(R, E)
        else:
            counts = np.broadcast_to(np.bincount(experts, minlength=E).reshape(1, E) / R, (R, E))
        self.engine.observe(layer, reqs, np.ascontiguousarray(counts, dtype=np.float32))

    # -- compute ----------------------------------------------------------------

    def run_fused(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any) -> torch.Tensor:
        """The experts forward of a fused MoE layer."""
        self.check_open()
        t0 = time.perf_counter_ns()
        try:
            return self._run_fused(layer, hidden, top_k_index, top_k_weights, original)
        finally:
            self._account(t0)

    def _phase(self, name: str, t0: int) -> int:
        """Adds the time since t0 to a phase; returns now."""
        now = time.perf_counter_ns()
        self.phase_ns[name] = self.phase_ns.get(name, 0) + now - t0
        return now

    def _log(self, layer: MoELayer, idx: np.ndarray) -> None:
        if self.routing_log is not None:
            self.routing_log.append((layer.index, idx.copy()))

    def _account(self, t0: int) -> None:
        """Adds one hook call's host time (the GPU waits are in wait_ns)."""
        self.hook_ns += time.perf_counter_ns() - t0
        self.hook_calls += 1

    def _routing_to_host(self, top_k_index: torch.Tensor, as_tensor: bool = False) -> Any:
        """The routing in host memory: the layer's one synchronisation point
        (it waits for the router on the GPU), timed as a wait, not overhead."""
        t0 = time.perf_counter_ns()
        idx = top_k_index.detach().to("cpu", torch.int64).contiguous()
        self.wait_ns += time.perf_counter_ns() - t0
        return idx if as_tensor else idx.numpy()

    def _run_fused(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any) -> torch.Tensor:
        module = layer.module
        E = self.num_experts
        if (
            self.mapped
            and self.routing_log is None
            and top_k_index.dim() == 2
            and top_k_index.numel() <= MAPPED_MAX_PAIRS
            and kernel_wins(top_k_index.shape[0], self.plan["layout"]["source_bytes"])
            and hidden.dtype == (torch.bfloat16 if self.ffn_dtype == 0 else torch.float16)
            and top_k_weights.dtype in _WDTYPES
        ):
            try:
                return self._run_mapped(layer, hidden, top_k_index, top_k_weights)
            except UnsupportedError as exc:
                log.info("moe_infinity: mapped mode off: %s", exc)
                self.mapped = False
        if (
            self.kernels
            and top_k_index.dim() == 2
            and kernel_wins(top_k_index.shape[0], self.plan["layout"]["source_bytes"])
            and hidden.dtype == (torch.bfloat16 if self.ffn_dtype == 0 else torch.float16)
        ):
            idx_host = self._routing_to_host(top_k_index, as_tensor=True)
            self._log(layer, idx_host.numpy())
            try:
                return self._run_layer_moe(layer, hidden, top_k_index, top_k_weights, idx_host)
            except BudgetError:
                # More experts than slots: the engine has traced the routing
                # already; stream the experts through the slots instead.
                idx = idx_host.numpy()
                needed = np.unique(idx[(idx >= 0) & (idx < E)]).tolist()
                return self._run_torch(layer, module, hidden, top_k_index, top_k_weights, original, needed)
        idx = self._routing_to_host(top_k_index)
        self._log(layer, idx)
        t = time.perf_counter_ns()
        flat = idx.reshape(-1)
        valid = (flat >= 0) & (flat < E)
        k = idx.shape[-1] if idx.ndim > 1 else 1
        tokens = np.arange(flat.size) // k
        t = self._phase("routing", t)
        self._observe_np(layer.index, tokens[valid], flat[valid], idx.shape[0])
        t = self._phase("observe", t)
        needed = np.unique(flat[valid]).tolist()
        return self._run_torch(layer, module, hidden, top_k_index, top_k_weights, original, needed)

    def _run_mapped(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Mapped mode: one engine call, no host synchronisation. The
        engine traces the routing asynchronously (routing_log needs the
        synchronous path)."""
        t0 = time.perf_counter_ns()
        T, k = top_k_index.shape
        topk = top_k_index if top_k_index.dtype == torch.int64 and top_k_index.is_contiguous() else top_k_index.to(torch.int64).contiguous()
        weights = top_k_weights.contiguous()
        x = hidden.contiguous()
        out = torch.empty_like(x)
        stream = self._raw_stream()
        need = T * k * self.ffn_inter
        scratch = self._scratch.get(stream)
        if scratch is None or scratch.numel() < need:
            # Reused by every layer on this stream: each call's kernels
            # finish with it before the next call's start (stream order).
            scratch = self._scratch[stream] = torch.empty(max(need, 16 * self.ffn_inter), dtype=torch.float32, device=x.device)
        reqs_c = getattr(self._tls, "reqs_c", None)
        self.engine.layer_mapped(
            layer.index, reqs_c, len(reqs_c) if reqs_c is not None else 0, stream, x.data_ptr(), out.data_ptr(),
            scratch.data_ptr(), topk.data_ptr(), weights.data_ptr(), T, k, self.ffn_dtype, _WDTYPES[weights.dtype],
        )
        self._phase("engine_mapped_call", t0)
        return out

    def _ffn_buffers(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kernels' inputs in the layout they read (int64 ids, float32
        weights, contiguous activations) and fresh output and scratch."""
        T, k = top_k_index.shape
        topk = top_k_index if top_k_index.dtype == torch.int64 and top_k_index.is_contiguous() else top_k_index.to(torch.int64).contiguous()
        weights = top_k_weights if top_k_weights.dtype == torch.float32 and top_k_weights.is_contiguous() else top_k_weights.to(torch.float32).contiguous()
        x = hidden.contiguous()
        return topk, weights, x, torch.empty_like(x), torch.empty((T * k, self.ffn_inter), dtype=torch.float32, device=x.device)

    def _run_layer_moe(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, idx_host: torch.Tensor) -> torch.Tensor:
        """The GPU decode path: one engine call traces the routing, makes the
        experts resident and launches the fused FFN over all of them."""
        return self._launch(layer, hidden, top_k_index, top_k_weights, idx_host=idx_host)

    def _run_kernel(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, needed: list[int]) -> torch.Tensor:
        """The engine's fused expert FFN over known experts, without tracing
        (the benchmark times the GPU compute of a layer with it)."""
        return self._launch(layer, hidden, top_k_index, top_k_weights, needed=needed)

    def _launch(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *, idx_host: torch.Tensor | None = None, needed: list[int] | None = None) -> torch.Tensor:
        """Calls moe_layer_moe (with the host routing) or moe_layer_ffn (with
        the needed experts) on the kernels' buffers."""
        t0 = time.perf_counter_ns()
        T, k = top_k_index.shape
        topk, weights, x, out, scratch = self._ffn_buffers(hidden, top_k_index, top_k_weights)
        t0 = self._phase("kernel_prep", t0)
        kw = dict(
            stream=self.stream(), x=x.data_ptr(), out=out.data_ptr(), scratch=scratch.data_ptr(),
            topk=topk.data_ptr(), weights=weights.data_ptr(), tokens=T, k=k, dtype=self.ffn_dtype,
        )
        if idx_host is not None:
            self.engine.layer_moe(layer.index, self.active_requests() or [], idx_host.data_ptr(), **kw)
        else:
            self.engine.layer_ffn(layer.index, needed or [], **kw)
        self._phase("engine_layer_call", t0)
        return out

    def _run_torch(self, layer: MoELayer, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any, needed: list[int]) -> torch.Tensor:
        """transformers' own expert code on slot views."""
        E = self.num_experts
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"
        if impl == "eager" or self.kernels:
            # With the kernels on (the GPU fast path, where parity is not
            # bitwise anyway) larger batches use the per-expert eager code on
            # slot views rather than stacking the layer's experts into a copy
            # that would not fit the memory budget.
            with _Streamer(self, layer.index, needed) as st:
                proxy = _ExpertsProxy(module, {name: _Indexer(st, name, (E, *shape), dtype, hidden.device) for name, (shape, dtype) in self.region_meta.items()})
                return original(proxy, hidden, top_k_index, top_k_weights)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        fn = ALL_EXPERTS_FUNCTIONS[impl]
        stacked = self._stack(layer.index, needed, hidden.device)
        remap = torch.full((E + 1,), len(needed), dtype=top_k_index.dtype, device=top_k_index.device)
        if needed:
            remap[torch.tensor(needed, device=top_k_index.device)] = torch.arange(len(needed), dtype=top_k_index.dtype, device=top_k_index.device)
        local = remap[top_k_index.clamp(0, E)]
        proxy = _ExpertsProxy(module, {**stacked, "num_experts": len(needed)})
        return fn(proxy, hidden, local, top_k_weights)

    def _stack(self, layer: int, experts: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The layer's needed experts' regions stacked in expert order."""
        out = {name: torch.empty((len(experts), *shape), dtype=dtype, device=device) for name, (shape, dtype) in self.region_meta.items()}
        stream = self.stream()
        for start in range(0, len(experts), self.max_pin):
            chunk = experts[start : start + self.max_pin]
            slots, lease = self.engine.acquire(layer, chunk, stream)
            try:
                for j, s in enumerate(slots):
                    for name, t in out.items():
                        t[start + j].copy_(self.views[s][name])
            finally:
                self.engine.release(lease, stream)
        return out

    def run_moduledict(self, layer: MoELayer, original: Any, hidden: torch.Tensor, mask: torch.Tensor, *rest: Any) -> torch.Tensor:
        """The experts forward of a ModuleDict MoE layer (Switch, NLLB)."""
        self.check_open()
        E = self.num_experts
        t0 = time.perf_counter_ns()
        with torch.no_grad():
            onehot = mask if (mask.dim() >= 2 and mask.shape[-1] == E and mask.dim() == 3) else F.one_hot(mask.long(), num_classes=E)
            pairs = self._routing_to_host(onehot.reshape(onehot.shape[0], -1, E).nonzero())
            tokens, experts = pairs[:, 0], pairs[:, 2]
            self._observe_np(layer.index, tokens, experts, int(onehot.shape[0]))
            needed = np.unique(experts).tolist()
        self._account(t0)
        streamers = self._tls.__dict__.setdefault("streamers", {})
        with _Streamer(self, layer.index, needed) as st:
            streamers[layer.index] = st
            try:
                return original(layer.module, hidden, mask, *rest)
            finally:
                streamers.pop(layer.index, None)

    # -- statistics ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Engine counters with each layer's module path and derived rates."""
        self.check_open()
        st = self.engine.stats()
        for info, layer in zip(st["layers"], self.layers):
            info["module"] = layer.path
        uses = st["hits"] + st["misses"]
        st["hit_rate"] = st["hits"] / uses if uses else 0.0
        st["stall_seconds"] = st["stall_ns"] / 1e9
        st["plan"] = {k: self.plan.get(k) for k in ("slots", "slot_bytes", "arena_bytes", "policy", "prefetch", "backend", "graph_misses")}
        st["hook_seconds"] = self.hook_ns / 1e9
        st["hook_wait_seconds"] = self.wait_ns / 1e9
        st["hook_calls"] = self.hook_calls
        st["hook_phase_seconds"] = {k: v / 1e9 for k, v in self.phase_ns.items()}
        return st
