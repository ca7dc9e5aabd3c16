"""The per-model runtime: routes each MoE layer's experts through the engine.

Data path of one fused MoE layer (the router stays in torch)::

    experts module forward(hidden, top_k_index, top_k_weights)
      → moe_layer (the engine's layer executor): the engine chooses how the
        layer runs and runs it —
          mapped / kernels: the engine's CUDA kernels computed the output;
          host paths: the routing is traced and the needed experts come back
      → host paths: transformers' own expert code on views of the slots,
        acquiring experts one chunk of at most the number of slots at a time
        (so a layer needing more experts than the cache holds streams them
        through), releasing the pins after

No choice between these paths is made here: this module passes tensors and
the caller's wishes (``kernels``, ``mapped``) and follows the path the engine
reports (docs/ARCHITECTURE.md, "One MoE layer").

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import _native
from .engine import Engine
from .errors import CheckpointFormatError, ClosedError, InvalidArgumentError, MoEInfinityError, StateError, UnsupportedError
from .families import Family
from .lockstep import Lockstep

log = logging.getLogger("moe_infinity")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Type codes of moe_layer_args: activations (0 bfloat16, 1 float16) and
#: routing weights (0 float32, 1 bfloat16, 2 float16); -1 is any other type.
_ACT_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
_WDTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _raw_stream_getter(device: torch.device) -> Any:
    """A fast getter of the current raw CUDA stream of ``device``
    (torch.cuda.current_stream builds a Python Stream object: ~8 µs)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: raw(idx)
    return lambda: torch.cuda.current_stream(device).cuda_stream


def with_progress(engine: Engine, call: Any, progress: Any) -> Any:
    """Runs ``call()`` (a long engine call: preparing the host tier,
    compressing experts), reporting ``engine.progress()`` through
    ``progress(done, total)`` from a polling thread meanwhile; returns what
    ``call`` returns."""
    if progress is None:
        return call()
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
        out = call()
    finally:
        stop.set()
        t.join()
    done, total = engine.progress()
    if total:
        progress(done, total)
    return out


def _configure_with_progress(
    engine: Engine, layout: dict[str, Any], layers: list[str], budget_bytes: int | None, progress: Any, ffn: str, ffn_params: dict[str, float] | None = None
) -> dict[str, Any]:
    """engine.configure, reporting the host tier's preparation (pinning
    experts for the GPU can take a while) through ``progress(done, total)``."""
    return with_progress(engine, lambda: engine.configure(layout, layers=layers, budget_bytes=budget_bytes, ffn=ffn, ffn_params=ffn_params), progress)


def _ffn_params(family: Family, layers: list[MoELayer]) -> dict[str, float] | None:
    """The constants of the family's expert computation the engine's
    kernels need: gpt-oss's activation (GptOssExperts.alpha, .limit)."""
    if family.ffn != "gpt_oss" or not layers:
        return None
    m = layers[0].module
    return {"swiglu_alpha": float(m.alpha), "swiglu_limit": float(m.limit)}


def layout_spec(family: Family, region_meta: dict[str, tuple[tuple[int, ...], torch.dtype]], fused_on_disk: bool, quant: dict[str, Any] | None) -> dict[str, Any]:
    """The slot layout the engine is asked for (moe_engine_configure's
    ``layout``): the family's regions, from which checkpoint tensors, in
    which dtype. The engine lays it out (offsets, alignment, slot size)."""
    return {
        "regions": [
            {
                "name": r.name,
                "parts": r.parts(fused_on_disk),
                "dtype": str(region_meta[r.name][1]).removeprefix("torch."),
            }
            for r in family.regions
        ],
        # A quantized checkpoint's quant_method (and FP8 weight_block_size):
        # the engine keeps its experts compressed and dequantizes them into
        # the views this runtime reads (plan["views"]).
        **(quant or {}),
    }


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


#: A routing override (OffloadRuntime.set_routing_override): called as
#: ``fn(layer_index, top_k_index, requests)`` with the router's [T, k] expert
#: ids and the engine requests of the calling thread's batch rows; returns the
#: [T, k] int64 expert ids the layer uses instead, on the same device.
RoutingOverride = Callable[[int, torch.Tensor, list[int]], torch.Tensor]


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
        quant: dict[str, Any] | None = None,
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
        # Set by a server running requests in threads: their MoE layers
        # meet there (lockstep.py), so each expert crosses once per step.
        self.lockstep: Lockstep | None = None
        # The serving Scheduler running on this model, if any (one at most).
        self.scheduler: Any = None
        layout = layout_spec(family, region_meta, fused_on_disk, quant)
        self.plan = _configure_with_progress(engine, layout, [layer.prefix for layer in layers], budget_bytes, progress, family.ffn, _ffn_params(family, layers))
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
        self.max_pin = int(self.plan["views"]["count"])
        self.views = self._build_views()
        # What the engine's layer executor can do for this model here (its
        # plan): the engine chooses, per layer call, how experts run. These
        # record what it may use: kernels=False and set_mapped(False) (or a
        # routing_log, which needs every layer's host routing) are the
        # caller's wishes, passed with each call as flags.
        ex = self.plan["executor"]
        if kernels and not ex["kernels"]:
            log.info("moe_infinity: expert FFN kernels off: %s", ex.get("kernels_off", ""))
        self.kernels = bool(kernels and ex["kernels"])
        # Whether the plan offers mapped mode here, and whether the caller
        # wants it (set_mapped; on by default where offered).
        self._mapped_off = "" if ex["mapped"] else "the engine does not offer mapped mode on this device"
        if not self.kernels:
            self._mapped_off = "the engine's expert kernels are off (" + (ex.get("kernels_off") or "kernels=False") + ")"
        self._mapped = not self._mapped_off
        # Measurement hooks (set_routing_override, experts_skipped): the
        # layer hot path checks _detour alone, true while either is on.
        self._routing_override: RoutingOverride | None = None
        self._experts_skipped = 0
        self._detour = False
        self.ffn_hidden, self.ffn_inter, self.ffn_dtype = int(ex["hidden"]), int(ex["inter"]), int(ex["dtype"])
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
        # The views the engine hands out: its slots, or for quantized experts
        # the buffers it dequantizes them into.
        view_bytes = self.plan["views"]["bytes"]
        for s in range(self.plan["views"]["count"]):
            base = s * view_bytes
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

    @contextlib.contextmanager
    def rows(self, reqs: Sequence[int], rowwise: bool = False) -> Iterator[None]:
        """Traces the calling thread's forwards inside the block as the given
        requests, one per batch row (handles from ``engine.begin_request``,
        which the caller ends): for a server whose requests outlive one
        forward and change rows between forwards.

        ``rowwise``: the rows are separate requests stacked for one step, one
        token each: where transformers' expert code computes the experts,
        it runs once per token, so each token's numbers are those of its
        request computed alone (its grouped products do not round a token
        the same way beside others). The engine still sees, fetches for and
        traces the whole step at once."""
        if not reqs:
            raise InvalidArgumentError("rows() needs at least one request")
        prev = (getattr(self._tls, "reqs", None), getattr(self._tls, "reqs_c", None), getattr(self._tls, "rowwise", False))
        self._tls.reqs = list(reqs)
        self._tls.reqs_c = (ctypes.c_uint64 * len(reqs))(*reqs)
        self._tls.rowwise = rowwise
        try:
            yield
        finally:
            self._tls.reqs, self._tls.reqs_c, self._tls.rowwise = prev

    def active_requests(self) -> list[int] | None:
        """The calling thread's current requests, if inside requests()."""
        return getattr(self._tls, "reqs", None)

    def streamer(self, layer: int) -> _Streamer:
        """The calling thread's streamer of a ModuleDict layer being computed."""
        st = getattr(self._tls, "streamers", {}).get(layer)
        if st is None:
            raise StateError(f"expert weights of MoE layer {layer} are only available while that layer computes")
        return st

    # -- modes --------------------------------------------------------------------

    @property
    def mapped(self) -> bool:
        """Whether decode layers may run in mapped mode (the engine's kernels
        read each expert from its slot or, missing, from host memory, and the
        routing is traced asynchronously; docs/ARCHITECTURE.md). On by
        default wherever the engine offers it (GPU kernels, or the CPU's
        reference kernels); change it with set_mapped()."""
        return self._mapped

    def set_mapped(self, enabled: bool) -> None:
        """Turns mapped mode on or off for the layer calls that start after
        it (the engine still chooses each call's path; off, decode layers
        bring the routing to the host and run synchronously). For
        benchmarks and tests comparing the two paths; not while a CUDA
        graph of mapped layers is captured (moe_infinity.graphs needs it on).

        Raises InvalidArgumentError for a non-bool, UnsupportedError when
        turning it on where the engine does not offer it (saying why)."""
        if not isinstance(enabled, bool):
            raise InvalidArgumentError(f"set_mapped(enabled): enabled must be True or False, got {enabled!r}")
        if enabled and self._mapped_off:
            raise UnsupportedError(f"mapped mode is not available: {self._mapped_off}")
        self._mapped = enabled

    # -- measurement hooks -------------------------------------------------------
    #
    # For benchmarks (moe_infinity.bench, benchmarks/): they change what the
    # layers compute, never what the engine decides. Runtime-wide (every
    # thread's forwards): change them between forwards, not during one.

    @property
    def routing_override(self) -> RoutingOverride | None:
        """The routing override set by set_routing_override(), or None."""
        return self._routing_override

    def set_routing_override(self, fn: RoutingOverride | None) -> None:
        """Replaces the router's choice of experts in every fused MoE layer
        (None clears it).

        Each layer call runs ``fn(layer_index, top_k_index, requests)``
        before anything else — before a lockstep batch meets and before the
        engine sees the routing — so the engine's executor, tracer,
        prefetcher, statistics, ``routing_log`` and a serving scheduler all
        see the routing ``fn`` returns:

        * ``layer_index``: the MoE layer's position in execution order (0-based);
        * ``top_k_index``: the router's expert ids, [T, k] (T tokens of the
          forward, all batch rows together, row-major);
        * ``requests``: the engine requests of the calling thread's batch
          rows (``active_requests()``; one per row, so T // len(requests)
          tokens each; in a stacked serving step every row is another
          request), empty outside a traced forward.

        ``fn`` returns the [T, k] torch.int64 expert ids to use, on the same
        device as ``top_k_index``; shape, dtype and device are checked on
        every call (InvalidArgumentError naming what was expected), the ids
        by the engine. The routing weights stay the router's. ``fn`` runs
        while a CUDA graph is captured, too, and its tensor operations are
        captured: to follow a trace across replays, keep the position in a
        device tensor (as moe_infinity.bench.ForcedRouting does).

        Raises UnsupportedError for ModuleDict experts (SwitchTransformers,
        NLLB-MoE), whose routing is a capacity-limited one-hot mask, and
        InvalidArgumentError when ``fn`` is neither callable nor None."""
        if fn is not None:
            if not callable(fn):
                raise InvalidArgumentError(f"set_routing_override(fn): fn must be callable or None, got {type(fn).__name__}")
            if self.family.style != "fused":
                raise UnsupportedError(f"a routing override needs fused experts; {self.family.model_type} experts are a ModuleDict routed by a one-hot mask")
        with self._lock:
            self._routing_override = fn
            self._detour = fn is not None or self._experts_skipped > 0

    @contextlib.contextmanager
    def experts_skipped(self) -> Iterator[None]:
        """Within the block, every MoE layer's experts return zeros at once
        (a tensor shaped like the layer's hidden states) without calling the
        engine: nothing is traced, fetched, counted in moe_stats() or hook
        time, or logged. For timing the dense part of a step (attention,
        router, norms) alone; the model's outputs inside the block are
        meaningless. Nests; restored on leaving, also on an exception."""
        with self._lock:
            self._experts_skipped += 1
            self._detour = True
        try:
            yield
        finally:
            with self._lock:
                self._experts_skipped -= 1
                self._detour = self._routing_override is not None or self._experts_skipped > 0

    def _overridden(self, layer: MoELayer, top_k_index: torch.Tensor) -> torch.Tensor:
        """The routing override's ids for one layer call, checked."""
        fn = self._routing_override
        if fn is None:
            return top_k_index
        reqs = self.active_requests()
        got = fn(layer.index, top_k_index, list(reqs) if reqs else [])
        if not isinstance(got, torch.Tensor) or got.dtype != torch.int64 or got.shape != top_k_index.shape or got.device != top_k_index.device:
            what = f"a {got.dtype} tensor of shape {tuple(got.shape)} on {got.device}" if isinstance(got, torch.Tensor) else f"a {type(got).__name__}"
            raise InvalidArgumentError(
                f"the routing override returned {what} for MoE layer {layer.index}; it must return a torch.int64 tensor "
                f"of shape {tuple(top_k_index.shape)} (the router's top_k_index: tokens × k expert ids) on {top_k_index.device}"
            )
        return got

    def run_experts(self, layer_index: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: Sequence[int]) -> torch.Tensor:
        """A measurement probe outside the layer executor: one MoE layer's
        expert FFN computed by the engine's kernels (moe_layer_ffn) over the
        given experts, as the kernels path computes it, without tracing,
        statistics or the executor's choice of path. The benchmark times
        one layer's expert compute with it on resident experts; tests check
        the kernels with it.

        Args:
            layer_index: the MoE layer, 0-based in execution order.
            hidden: [T, hidden_size] activations in the kernels' dtype
                (bfloat16 or float16, as the model), on this runtime's device.
            top_k_index: [T, k] expert ids (any integer dtype).
            top_k_weights: [T, k] routing weights (any float dtype; computed
                in float32).
            experts: the distinct ids in ``top_k_index``.

        Returns the [T, hidden_size] output (the weighted sum over each
        token's experts), in hidden's dtype; on a GPU it is ready once the
        current stream reaches it. Experts not cached are brought in first.
        Raises UnsupportedError where the engine's kernels are off, and
        InvalidArgumentError for a bad layer, shape or dtype."""
        self.check_open()
        if not self.kernels:
            raise UnsupportedError("run_experts needs the engine's expert kernels, which are off here (load with kernels=True on a GPU, or engine_options={'reference_kernels': True} on the CPU)")
        if not 0 <= int(layer_index) < len(self.layers):
            raise InvalidArgumentError(f"run_experts: layer_index {layer_index} is not a MoE layer (0..{len(self.layers) - 1})")
        if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape or top_k_index.shape[0] != hidden.shape[0]:
            raise InvalidArgumentError(
                f"run_experts: hidden must be [T, hidden_size], top_k_index and top_k_weights [T, k]; got {tuple(hidden.shape)}, "
                f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}"
            )
        if hidden.shape[1] != self.ffn_hidden or _ACT_DTYPES.get(hidden.dtype, -1) != self.ffn_dtype:
            want = next((d for d, c in _ACT_DTYPES.items() if c == self.ffn_dtype), None)
            raise InvalidArgumentError(f"run_experts: hidden must be [T, {self.ffn_hidden}] {want}, got {tuple(hidden.shape)} {hidden.dtype}")
        if hidden.device.type != self.device.type:
            raise InvalidArgumentError(f"run_experts: the tensors must be on {self.device}, hidden is on {hidden.device}")
        T, k = top_k_index.shape
        topk = top_k_index.to(torch.int64).contiguous()
        weights = top_k_weights.to(torch.float32).contiguous()
        x = hidden.contiguous()
        out = torch.empty_like(x)
        scratch = torch.empty((T * k, self.ffn_inter), dtype=torch.float32, device=x.device)
        self.engine.layer_ffn(
            self.layers[int(layer_index)].index, [int(e) for e in experts], stream=self.stream(), x=x.data_ptr(), out=out.data_ptr(),
            scratch=scratch.data_ptr(), topk=topk.data_ptr(), weights=weights.data_ptr(), tokens=T, k=k, dtype=self.ffn_dtype,
        )
        return out

    #: The token counts probe_kernel_crossover times (one token: the kernels,
    #: always; the engine's kernel calls take at most 16).
    PROBE_TOKENS = (2, 4, 8, 16)

    def probe_kernel_crossover(self, layer_index: int = 0, tokens: Sequence[int] = PROBE_TOKENS, reps: int = 3) -> dict[str, Any]:
        """Times one MoE layer's experts on this machine with the engine's
        kernels and with transformers' code on slot views, for each token
        count in ``tokens`` (routed round-robin over as many experts as one
        call may pin, so that tokens share experts as a batch of requests
        does), both on resident experts, and gives the engine the crossover
        (``moe_tune(kernel_max_tokens=N)``): N is the most tokens up to which
        the kernels won every count (1 when they lost at the first).
        Decisions stay the engine's: this hands it what only Python can
        time, transformers' expert code. Runs at load on a GPU; the cache is
        flushed and the counters zeroed after.

        Returns ``{"tokens", "kernel_s", "torch_s", "kernel_max_tokens",
        "paths"}`` (seconds per layer call, the fastest of ``reps`` after
        one warm-up each; the executor's paths the probe's calls took, as
        ``moe_stats()["paths"]`` counts them). Raises UnsupportedError where the kernels do not serve the
        model or its experts are not a fused module."""
        self.check_open()
        ex = self.engine.plan["executor"]
        if not self.kernels or not ex.get("kernels"):
            raise UnsupportedError(f"probe_kernel_crossover needs the engine's expert kernels: {ex.get('kernels_off') or 'kernels=False'}")
        if self.family.style != "fused":
            raise UnsupportedError(f"probe_kernel_crossover times fused expert modules; {self.family.model_type} experts are a ModuleDict")
        if not tokens or not all(isinstance(t, int) and 2 <= t <= max(self.PROBE_TOKENS) for t in tokens) or int(reps) < 1:
            raise InvalidArgumentError(f"probe_kernel_crossover: tokens must be counts in 2..{max(self.PROBE_TOKENS)} (one token is the kernels' always) and reps >= 1; got {tokens!r}, {reps!r}")
        if not 0 <= int(layer_index) < len(self.layers):
            raise InvalidArgumentError(f"probe_kernel_crossover: layer_index {layer_index} is not a MoE layer (0..{len(self.layers) - 1})")
        layer = self.layers[int(layer_index)]
        dtype = next(d for d, c in _ACT_DTYPES.items() if c == self.ffn_dtype)
        k = int(getattr(getattr(layer.module, "config", None), "num_experts_per_tok", 0) or 2)
        n = max(min(self.num_experts, self.max_pin), 1)
        k = min(k, n)
        gen = torch.Generator().manual_seed(0)

        def timed(crossover: int, T: int) -> float:
            """The layer call of T tokens on the path the engine takes
            with the crossover at ``crossover`` tokens."""
            self.engine.tune(kernel_max_tokens=crossover)
            x = (torch.randn(T, self.ffn_hidden, generator=gen) * 0.1).to(self.device, dtype)
            ids = ((torch.arange(T).unsqueeze(1) * k + torch.arange(k)) % n).to(self.device)
            w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1).to(self.device, dtype)
            best = float("inf")
            with torch.no_grad():
                for rep in range(reps + 1):
                    self._sync()
                    t0 = time.perf_counter()
                    layer.module(x, ids, w)
                    self._sync()
                    if rep:  # the first brings the experts in
                        best = min(best, time.perf_counter() - t0)
            return best

        # Synchronous layers (routing on the host, experts in slots): the
        # kernels on resident experts against transformers' code on them,
        # with the CPU's part paused (it would compute misses of the
        # warm-up) and resumed after on the same threads (not measured
        # again).
        mapped, self._mapped = self._mapped, False
        hybrid_threads = int(ex.get("cpu_threads") or 0) if ex.get("hybrid") else 0
        if hybrid_threads:
            self.engine.tune(cpu_experts="off")
        tokens = sorted(int(t) for t in tokens)
        kernel_s, torch_s = [], []
        try:
            for T in tokens:
                kernel_s.append(timed(max(tokens), T))  # every count on the kernels
                torch_s.append(timed(1, T))  # every count of more than one token on transformers' code
        except BaseException:
            self.tune(kernel_max_tokens=0, flush=True, reset_stats=True)
            raise
        finally:
            self._mapped = mapped
            if hybrid_threads:
                self.engine.tune(cpu_experts=hybrid_threads)
        paths = {p: n for p, n in self.engine.stats()["paths"].items() if n}
        best = 1
        for T, ks, ts in zip(tokens, kernel_s, torch_s):
            if ks >= ts:
                break
            best = T
        self.tune(kernel_max_tokens=best, flush=True, reset_stats=True)
        out = {"tokens": tokens, "kernel_s": kernel_s, "torch_s": torch_s, "kernel_max_tokens": best, "paths": paths}
        self.plan["kernel_probe"] = out
        return out

    def tune(self, **changes: Any) -> None:
        """Engine.tune(**changes), then this runtime's copy of the plan
        brought up to date with it, its hook counters zeroed with the
        engine's (``reset_stats``) and its phase times cleared (what
        ``model.moe_tune`` does)."""
        self.check_open()
        self.engine.tune(**changes)
        for key in ("policy", "prefetch", "graph_misses", "executor"):
            self.plan[key] = self.engine.plan.get(key)
        if changes.get("reset_stats"):
            self.hook_ns = self.wait_ns = self.hook_calls = 0
        self.phase_ns.clear()

    def _sync(self) -> None:
        """Waits for this runtime's device (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- compute ----------------------------------------------------------------

    def run_fused(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any) -> torch.Tensor:
        """The experts forward of a fused MoE layer."""
        self.check_open()
        if self._detour:  # a measurement hook is on (one check when none is)
            if self._experts_skipped:
                return torch.zeros_like(hidden)
            top_k_index = self._overridden(layer, top_k_index)
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

    def _layer_args(self) -> Any:
        """This thread's moe_layer argument struct and experts buffer."""
        a = getattr(self._tls, "layer_args", None)
        if a is None:
            a = self._tls.layer_args = _native.LayerArgs()
            buf = self._tls.layer_experts = (ctypes.c_int32 * self.num_experts)()
            a.experts = ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32))
            cpu = self._tls.layer_cpu_experts = (ctypes.c_int32 * self.num_experts)()
            a.cpu_experts = ctypes.cast(cpu, ctypes.POINTER(ctypes.c_int32))
            a.experts_cap = self.num_experts
        return a

    def _set_requests(self, a: Any) -> None:
        """Points a moe_layer argument struct at this thread's requests."""
        reqs_c = getattr(self._tls, "reqs_c", None)
        a.nreq = len(reqs_c) if reqs_c is not None else 0
        a.reqs = ctypes.cast(reqs_c, ctypes.POINTER(ctypes.c_uint64)) if reqs_c is not None else None

    def _run_fused(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any) -> torch.Tensor:
        """One fused MoE layer through the engine's executor: the engine
        chooses the path; this passes the tensors, supplies the host routing
        when asked for it, and runs transformers' code when handed it."""
        t0 = time.perf_counter_ns()
        T = top_k_index.shape[0]
        k = top_k_index.shape[-1] if top_k_index.dim() > 1 else 1
        topk = top_k_index if top_k_index.dtype == torch.int64 and top_k_index.is_contiguous() else top_k_index.to(torch.int64).contiguous()
        met = self._meet(layer, topk)
        t0 = time.perf_counter_ns()
        a = self._layer_args()
        a.layer, a.tokens, a.k = layer.index, T, k
        self._set_requests(a)
        a.flags = (
            (0 if self._mapped and self.routing_log is None else _native.LAYER_NO_MAPPED)
            | (0 if self.kernels else _native.LAYER_NO_KERNELS)
            | (_native.LAYER_HOST_BATCHED if self._impl(layer.module) != "eager" else 0)
            | (_native.LAYER_ROWWISE if getattr(self._tls, "rowwise", False) else 0)
        )
        a.topk = topk.data_ptr()
        # The host routing, when the lockstep already brought it over or it
        # lives there: otherwise the engine asks for it only if it needs it.
        idx_host = met if met is not None else (topk if topk.device.type == "cpu" else None)
        a.topk_host = ctypes.cast(ctypes.c_void_p(idx_host.data_ptr()), ctypes.POINTER(ctypes.c_int64)) if idx_host is not None else None
        out = x = weights = partial = None
        if self.kernels:
            x = hidden.contiguous()
            weights = top_k_weights.contiguous()
            out = torch.empty_like(x)
            stream = self._raw_stream()
            # The kernels' scratch, float32 [T·k, inter], and the host
            # paths' CPU part (hybrid execution: the engine may compute some
            # experts into it), float32 [T, hidden].
            scratch = self._stream_buffer("scratch", stream, T * k * self.ffn_inter, x.device, least=16 * self.ffn_inter)
            partial = self._stream_buffer("partial", stream, x.numel(), x.device)
            a.stream, a.x, a.out, a.scratch, a.weights = stream, x.data_ptr(), out.data_ptr(), scratch.data_ptr(), weights.data_ptr()
            a.partial = partial.data_ptr()
            a.dtype, a.weights_dtype = _ACT_DTYPES.get(x.dtype, -1), _WDTYPES.get(weights.dtype, -1)
        else:
            a.stream = a.x = a.out = a.scratch = a.weights = a.partial = 0
            a.dtype = a.weights_dtype = -1
        t0 = self._phase("layer_args", t0)
        path = self.engine.layer(a)
        t0 = self._phase("engine_layer_call", t0)
        if path == _native.PATH_NEED_ROUTING:
            idx_host = self._routing_to_host(topk, as_tensor=True)
            a.topk_host = ctypes.cast(ctypes.c_void_p(idx_host.data_ptr()), ctypes.POINTER(ctypes.c_int64))
            t0 = time.perf_counter_ns()
            path = self.engine.layer(a)
            t0 = self._phase("engine_layer_call", t0)
        if idx_host is not None:
            self._log(layer, idx_host.numpy())
        if path in (_native.PATH_MAPPED, _native.PATH_KERNELS):
            return out
        needed = list(self._tls.layer_experts[: a.n_experts])
        stacked = path == _native.PATH_HOST_STACKED
        if T > 1 and getattr(self._tls, "rowwise", False):
            return self._run_torch_rows(layer, hidden, top_k_index, top_k_weights, original, needed, stacked)
        if a.n_cpu_experts > 0 and partial is not None:
            return self._run_torch_hybrid(layer, hidden, top_k_index, top_k_weights, original, needed, stacked, list(self._tls.layer_cpu_experts[: a.n_cpu_experts]), partial)
        return self._run_torch(layer, layer.module, hidden, top_k_index, top_k_weights, original, needed, stacked=stacked)

    def _stream_buffer(self, name: str, stream: int, numel: int, device: torch.device, least: int = 0) -> torch.Tensor:
        """This thread's float32 buffer ``name`` for this stream, of at
        least ``numel`` elements (grown to max(numel, least)), reused by
        every layer: each call's kernels and copies finish with it before
        the next call's start (stream order). Per thread too: threads
        computing at once (a lockstep batch; on the CPU every thread's
        stream is 0) must not share it."""
        bufs = self._tls.__dict__.setdefault(name, {})
        buf = bufs.get(stream)
        if buf is None or buf.numel() < numel:
            buf = bufs[stream] = torch.empty(max(numel, least), dtype=torch.float32, device=device)
        return buf

    def _run_torch_hybrid(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any, needed: list[int], stacked: bool, cpu: list[int], partial: torch.Tensor) -> torch.Tensor:
        """A host-path layer the CPU took part in (hybrid execution): the
        engine computed the pairs routed to the ``cpu`` experts into
        ``partial`` (float32). transformers' code computes the others: each
        CPU pair is given weight 0 and one of the needed experts (every
        transformers version's code follows such a pair; the empty place
        num_experts, which newer versions skip, is out of range for older
        ones), so it adds an exact zero; the partial is added in float32
        before the one rounding to the output's type."""
        gone = torch.isin(top_k_index, torch.tensor(cpu, dtype=top_k_index.dtype, device=top_k_index.device))
        if needed:
            idx = top_k_index.masked_fill(gone, needed[0])
            w = top_k_weights.masked_fill(gone, 0)
            out = self._run_torch(layer, layer.module, hidden, idx, w, original, needed, stacked=stacked)
        else:  # every pair is the CPU's
            out = torch.zeros_like(hidden)
        return (out.float() + partial[: out.numel()].view(out.shape)).to(out.dtype)

    def _run_torch_rows(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any, needed: list[int], stacked: bool) -> torch.Tensor:
        """transformers' expert code once per token (see rows(rowwise=True)),
        each call given that token's experts in the engine's order, as the
        engine hands them for the token alone."""
        rows = [(hidden[t : t + 1].clone(), top_k_index[t : t + 1].clone(), top_k_weights[t : t + 1].clone()) for t in range(hidden.shape[0])]
        if stacked:
            # The batched code over the step's experts stacked once: a
            # token's groups are the same products whichever other experts
            # (empty groups for it) are in the stack.
            call = self._stacked_call(layer, layer.module, needed, hidden.device, top_k_index)
            return torch.cat([call(h, i, w) for h, i, w in rows])
        idx = top_k_index.detach().to("cpu")
        out = []
        for t, (h, i, w) in enumerate(rows):
            mine = set(idx[t].tolist())
            out.append(self._run_torch(layer, layer.module, h, i, w, original, [e for e in needed if e in mine], stacked=False))
        return torch.cat(out)

    def _meet(self, layer: MoELayer, experts: Any) -> torch.Tensor | None:
        """In a lockstep batch, waits for the batch's other members to reach
        this layer (the union of their experts is then fetched together).
        Given the routing as a tensor, returns it in host memory (the caller
        hands it to the engine rather than copying it over again); None
        outside a lockstep batch or for a list of experts."""
        ls = self.lockstep
        if ls is None or not ls.enrolled():
            return None
        host = None
        if isinstance(experts, torch.Tensor):
            host = self._routing_to_host(experts, as_tensor=True)
            experts = np.unique(host.numpy()).tolist()
        t0 = time.perf_counter_ns()
        ls.at_layer(layer.index, experts)
        self._phase("lockstep_wait", t0)
        return host

    @staticmethod
    def _impl(module: torch.nn.Module) -> str:
        """The experts implementation transformers would run for module."""
        return getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"

    def _run_torch(self, layer: MoELayer, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, original: Any, needed: list[int], stacked: bool) -> torch.Tensor:
        """transformers' own expert code on slot views: its per-expert code
        streaming the needed experts through the slots, or (``stacked``, the
        engine's MOE_PATH_HOST_STACKED) its batched code on them stacked."""
        E = self.num_experts
        if not stacked:
            with _Streamer(self, layer.index, needed) as st:
                proxy = _ExpertsProxy(module, {name: _Indexer(st, name, (E, *shape), dtype, hidden.device) for name, (shape, dtype) in self.region_meta.items()})
                return original(proxy, hidden, top_k_index, top_k_weights)
        return self._stacked_call(layer, module, needed, hidden.device, top_k_index)(hidden, top_k_index, top_k_weights)

    def _stacked_call(self, layer: MoELayer, module: torch.nn.Module, needed: list[int], device: torch.device, like: torch.Tensor) -> Any:
        """transformers' batched expert code over ``needed`` stacked (in
        that order): a function of (hidden, top_k_index, top_k_weights)."""
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        E = self.num_experts
        fn = ALL_EXPERTS_FUNCTIONS[self._impl(module)]
        proxy = _ExpertsProxy(module, {**self._stack(layer.index, needed, device), "num_experts": len(needed)})
        remap = torch.full((E + 1,), len(needed), dtype=like.dtype, device=like.device)
        if needed:
            remap[torch.tensor(needed, device=like.device)] = torch.arange(len(needed), dtype=like.dtype, device=like.device)
        return lambda hidden, idx, weights: fn(proxy, hidden, remap[idx.clamp(0, E)], weights)

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
        """The experts forward of a ModuleDict MoE layer (Switch, NLLB): the
        engine's executor traces the routing and names the needed experts;
        the module's own forward then runs on their slot views, streamed."""
        self.check_open()
        if self._experts_skipped:
            return torch.zeros_like(hidden)
        t0 = time.perf_counter_ns()
        with torch.no_grad():
            needed = self._route_moduledict(layer, mask)
            self._meet(layer, needed)
        self._account(t0)
        streamers = self._tls.__dict__.setdefault("streamers", {})
        with _Streamer(self, layer.index, needed) as st:
            streamers[layer.index] = st
            try:
                return original(layer.module, hidden, mask, *rest)
            finally:
                streamers.pop(layer.index, None)

    def _route_moduledict(self, layer: MoELayer, mask: torch.Tensor) -> list[int]:
        """Hands a ModuleDict layer's routing to the engine's executor (which
        traces it) and returns the experts it needs, ascending.

        ``mask`` is the router's one-hot [T, k, E] selection or its [T, k]
        expert ids; every (token, expert) pair it selects becomes a place of
        a [T, k'] routing, k' the most experts a token has, with
        MOE_ROUTING_GAP filling the places of tokens the router sent to
        fewer (capacity dropping)."""
        E = self.num_experts
        onehot = mask if (mask.dim() == 3 and mask.shape[-1] == E) else F.one_hot(mask.long(), num_classes=E)
        T = int(onehot.shape[0])
        if T == 0:
            return []
        pairs = self._routing_to_host(onehot.reshape(T, -1, E).nonzero())
        tokens, experts = pairs[:, 0], pairs[:, 2]  # row-major: by token
        per = np.bincount(tokens, minlength=T)
        topk = np.full((T, max(1, int(per.max()))), _native.ROUTING_GAP, dtype=np.int64)
        topk[tokens, np.arange(len(tokens)) - (np.cumsum(per) - per)[tokens]] = experts
        a = self._layer_args()
        a.layer, a.tokens, a.k = layer.index, T, topk.shape[1]
        self._set_requests(a)
        # The module's own code, one expert at a time: never the kernels.
        a.flags = _native.LAYER_NO_MAPPED | _native.LAYER_NO_KERNELS | _native.LAYER_ROUTING_GAPS
        a.topk = topk.ctypes.data
        a.topk_host = topk.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
        a.stream = a.x = a.out = a.scratch = a.weights = 0
        a.dtype = a.weights_dtype = -1
        path = self.engine.layer(a)
        if path != _native.PATH_HOST_STREAM:
            raise StateError(f"the engine ran ModuleDict MoE layer {layer.index} on path {path}, which its own expert code cannot follow")
        return list(self._tls.layer_experts[: a.n_experts])

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
        st["cpu_seconds"] = st["cpu_ns"] / 1e9
        for info in st["layers"]:
            info["cpu_seconds"] = info["cpu_ns"] / 1e9
        st["plan"] = {k: self.plan.get(k) for k in ("slots", "slot_bytes", "arena_bytes", "policy", "prefetch", "backend", "kernel_build", "graph_misses", "link_rates", "link_rates_source", "executor")}
        st["hook_seconds"] = self.hook_ns / 1e9
        st["hook_wait_seconds"] = self.wait_ns / 1e9
        st["hook_calls"] = self.hook_calls
        st["hook_phase_seconds"] = {k: v / 1e9 for k, v in self.phase_ns.items()}
        return st
