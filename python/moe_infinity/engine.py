"""A thin, typed Python face of one engine instance (see capi/moe_infinity.h).

Typical use::

    with Engine(budget_bytes=2 << 30) as eng:
        eng.add_checkpoint("path/to/model")
        plan = eng.configure(layout={"regions": [...]})
        slots, lease = eng.acquire(layer=0, experts=[3, 5])
        ...  # compute on the slot memory
        eng.release(lease)
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from . import _native
from .errors import ClosedError, InvalidArgumentError, StateError

__all__ = ["Engine"]

#: Host tensor dtypes: expert weights, and uint8 for MXFP4 blocks and e8m0 scales.
_TORCH_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.uint8": "uint8"}
_NUMPY_DTYPES = {"float32": "float32", "float16": "float16"}


def _json_scalar(v: Any) -> Any:
    """numpy and torch scalars as plain numbers; anything else is a bad option."""
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    raise InvalidArgumentError(f"engine option value {v!r} ({type(v).__name__}) is not a number, string or bool")


class Engine:
    """One offloading engine: a checkpoint index, an expert cache, a tracer
    and a prefetcher.

    Args:
        budget_bytes: memory for the expert cache, in bytes.
        policy: eviction policy, ``"priority"`` (default), ``"lru"`` or ``"lfu"``.
        prefetch: trace-driven prefetching and router hints on (default) or off.
        trace_path: trace file loaded at configure and written at close.
        backend: ``"cpu"`` (default) or ``"cuda"``.
        device: CUDA device ordinal for the ``"cuda"`` backend.
        **options: further engine settings, passed to the engine as they are;
            the engine checks them and names the valid keys when one is
            unknown (``None`` means the default). They are:
        eamc_capacity: number of request activation matrices kept (default 1000).
        matches: most similar stored matrices used for a prediction (default 4).
        prefetch_window: prefetch loads in flight at most (default 2).
        workers: copy workers of the CPU backend (default min(4, cores)).
        max_slots: cap on cache slots (default: as many as the budget holds).
        admit_margin: mapped mode copies a missed expert in only when the
            eviction policy values it (1 + margin) times its best victim
            (default 1.0; LRU ignores it).
        graph_misses: how the layers of a CUDA-graph step get missed
            experts: ``"read"`` in place over PCIe, ``"copy"`` by the copy
            engine while the layer waits inside the replay, or ``"auto"``
            (default: chosen from the link rates, and without them
            ``"copy"`` for experts of 32 MiB and more).
        link_rates: the host→device link's rates
            (``{"dma_gbps", "zero_copy_gbps", "reaction_us"}``) that
            ``"auto"`` and the CPU/GPU cost model rest on; left out, the
            engine measures them at configure when the backend can (CUDA).
        measure_link: ``True`` measures the link at configure when
            ``link_rates`` is not given (default ``False`` until the CUDA
            measurement has been validated on a GPU).
        model_link: ``True`` makes the CPU backend stand in for a device's
            link: each copy into a slot takes ``reaction_us`` plus its bytes
            at ``dma_gbps`` of ``link_rates`` (required), one at a time, for
            measuring without a GPU what link-bound choices cost in time.
        kernel_build: the CUDA kernels' build: ``"sm80"`` (default; A100,
            H100 and later) or ``"sm89"`` (compute capability 8.9 and
            higher: the FP8 kernels decode weights with the hardware's e4m3
            conversion, same results bit for bit; opt-in, not yet run on a
            GPU; an older device raises UnsupportedError naming its compute
            capability). The CPU backend ignores it; ``plan["kernel_build"]``
            says which build was loaded (``"none"`` on the CPU).
        prefetch_confidence, prefetch_min_evidence, prefetch_min_token_share:
            the prefetch planner's filters (0 = default, negative = off):
            predicted share at least confidence × uniform (default 2),
            predictions resting on at least this many routed tokens
            (default 64), experts predicted for at least this fraction of a
            layer's tokens (default 0.5).
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        policy: str = "priority",
        prefetch: bool = True,
        trace_path: str | os.PathLike[str] | None = None,
        backend: str = "cpu",
        device: int = 0,
        **options: Any,
    ):
        cfg: dict[str, Any] = {
            "budget_bytes": int(budget_bytes),
            "policy": policy,
            "prefetch": bool(prefetch),
            "backend": backend,
            "device": int(device),
        }
        if trace_path is not None:
            cfg["trace_path"] = os.fspath(trace_path)
        # The engine validates every option (names, types, ranges) and names
        # the valid keys when one is unknown: the list lives in Go only.
        cfg.update({k: v for k, v in options.items() if v is not None})
        handle = ctypes.c_uint64(0)
        _native.call("moe_engine_create", json.dumps(cfg, default=_json_scalar).encode(), ctypes.byref(handle))
        self._handle: int | None = handle.value
        self._lock = threading.Lock()
        self._host: dict[str, Any] = {}  # name -> host tensor the engine reads
        self._plan: dict[str, Any] | None = None
        self._layer_fn: Any = None
        self.config = cfg

    # -- lifecycle -----------------------------------------------------------

    def _h(self) -> int:
        h = self._handle
        if h is None:
            raise ClosedError("the engine is closed")
        return h

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._handle is None

    def close(self) -> None:
        """Stops the engine's goroutines and frees its memory. Idempotent.

        Slot memory must no longer be read afterwards.
        """
        with self._lock:
            h, self._handle = self._handle, None
        if h is not None:
            _native.call("moe_engine_close", ctypes.c_uint64(h))
        self._host.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 — never raise from a finalizer
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("configured" if self._plan else "open")
        return f"<moe_infinity.Engine {state} budget={self.config['budget_bytes']} policy={self.config['policy']}>"

    # -- setup -----------------------------------------------------------------

    def add_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Maps a safetensors checkpoint (directory, file or index JSON)."""
        _native.call("moe_engine_add_checkpoint", ctypes.c_uint64(self._h()), os.fsencode(path))

    def add_compressed(self, source: str | os.PathLike[str], directory: str | os.PathLike[str], key: str) -> dict[str, Any]:
        """Compresses the routed experts of the float checkpoint at ``source``
        to block FP8 once, into ``directory`` (reused while ``key``, the
        source's files and the block size match), and maps that copy as the
        experts' checkpoint (``moe_engine_add_compressed``). Returns what was
        done: ``reused``, ``quant_method``, ``weight_block_size``, ``bytes``,
        ``source_bytes``, ... ; ``progress()`` reports it meanwhile."""
        req = {"source": os.fspath(source), "dir": os.fspath(directory), "key": key}
        return _native.call_json("moe_engine_add_compressed", ctypes.c_uint64(self._h()), json.dumps(req).encode())

    def add_host_tensor(self, name: str, tensor: Any) -> None:
        """Registers an expert tensor that lives in host memory.

        ``tensor`` is a contiguous CPU ``torch.Tensor`` (float32, float16 or
        bfloat16) or a C-contiguous numpy array (float32, float16). The engine
        keeps a reference until close().
        """
        dtype, shape, ptr, nbytes = _describe(tensor)
        shape_arr = (ctypes.c_int64 * max(1, len(shape)))(*shape)
        _native.call(
            "moe_engine_add_host_tensor",
            ctypes.c_uint64(self._h()),
            name.encode(),
            dtype.encode(),
            len(shape),
            shape_arr,
            ctypes.c_void_p(ptr),
            nbytes,
        )
        self._host[name] = tensor

    def compress_host(self, prefix: str) -> dict[str, Any]:
        """Replaces the float experts of MoE module ``prefix`` (everything
        before ``.experts.`` in their names), added with add_host_tensor, by
        their block-FP8 copy in memory the engine owns
        (``moe_engine_compress_host``: the bytes add_compressed writes), and
        drops this engine's references to the tensors added for it, which
        it no longer reads. Returns ``quant_method``, ``weight_block_size``,
        ``released`` (host tensors no longer read), ``tensors``, ``bytes``,
        ``source_bytes``."""
        res = _native.call_json("moe_engine_compress_host", ctypes.c_uint64(self._h()), json.dumps({"prefix": prefix}).encode())
        mark = prefix + ".experts."
        gone = [name for name in self._host if name.startswith(mark)]
        if len(gone) != res["released"]:
            raise StateError(f"compress_host({prefix!r}): the engine released {res['released']} tensors but {len(gone)} were added for the module")
        for name in gone:
            del self._host[name]
        return res

    def modules(self) -> list[dict[str, Any]]:
        """The MoE modules found: prefix, num_experts, fused, roles."""
        return _native.call_json("moe_engine_modules", ctypes.c_uint64(self._h()))

    def configure(
        self, layout: dict[str, Any], layers: Sequence[str] | None = None, budget_bytes: int | None = None, ffn: str | None = None,
        ffn_params: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Fixes the slot layout and layer order, sizes the cache (from
        ``budget_bytes`` when given, else the engine's budget), and returns
        the plan. ``ffn`` names the experts' computation when the engine's
        kernels implement it (``"swiglu"``, ``"gpt_oss"``); ``ffn_params``
        its constants (gpt-oss: ``swiglu_alpha``, ``swiglu_limit``). The
        plan's ``executor`` says what the layer executor can do with it."""
        setup: dict[str, Any] = {"layout": layout, "layers": list(layers or [])}
        if budget_bytes is not None:
            setup["budget_bytes"] = int(budget_bytes)
        if ffn is not None:
            setup["ffn"] = ffn
        for k, v in (ffn_params or {}).items():
            setup[k] = float(v)
        self._plan = _native.call_json("moe_engine_configure", ctypes.c_uint64(self._h()), json.dumps(setup).encode())
        return self._plan

    def slot_plan(self, layout: dict[str, Any], layers: Sequence[str] | None = None) -> dict[str, Any]:
        """The slot layout configure() would make for ``layout`` and
        ``layers``, without configuring: ``slot_bytes`` (one expert's
        slot), ``layout``, and for quantized experts ``view_bytes``. For
        sizing a memory budget before configure()."""
        setup = {"layout": layout, "layers": list(layers or [])}
        return _native.call_json("moe_engine_slot_plan", ctypes.c_uint64(self._h()), json.dumps(setup).encode())

    @property
    def plan(self) -> dict[str, Any]:
        """The plan returned by configure()."""
        if self._plan is None:
            raise InvalidArgumentError("the engine is not configured yet")
        return self._plan

    def arena(self) -> tuple[int, int]:
        """(address, size in bytes) of the slot memory."""
        addr, size = ctypes.c_uint64(0), ctypes.c_int64(0)
        _native.call("moe_engine_arena", ctypes.c_uint64(self._h()), ctypes.byref(addr), ctypes.byref(size))
        return addr.value, size.value

    def slot_address(self, slot: int) -> int:
        """Address of one slot."""
        addr = ctypes.c_uint64(0)
        _native.call("moe_engine_slot_addr", ctypes.c_uint64(self._h()), slot, ctypes.byref(addr))
        return addr.value

    @property
    def max_pin(self) -> int:
        """Most distinct experts one acquire() may ask for (the number of slots)."""
        n = ctypes.c_int32(0)
        _native.call("moe_engine_max_pin", ctypes.c_uint64(self._h()), ctypes.byref(n))
        return n.value

    # -- per request / per layer ---------------------------------------------

    def begin_request(self) -> int:
        """Starts tracing a request; returns its id."""
        req = ctypes.c_uint64(0)
        _native.call("moe_request_begin", ctypes.c_uint64(self._h()), ctypes.byref(req))
        return req.value

    def end_request(self, req: int) -> None:
        """Retires a request's activation matrix into the trace collection."""
        _native.call("moe_request_end", ctypes.c_uint64(self._h()), ctypes.c_uint64(req))

    def observe(self, layer: int, reqs: Sequence[int], counts: Any) -> None:
        """Records routing: ``counts[i][x]`` tokens of request ``reqs[i]`` went
        to expert ``x`` in MoE layer ``layer``. ``counts`` is a float32 array
        (numpy or torch, CPU) of shape [len(reqs), num_experts]."""
        n = len(reqs)
        if n == 0:
            return
        arr = _as_float32(counts, n * self.plan["num_experts"])
        ids = (ctypes.c_uint64 * n)(*reqs)
        _native.call(
            "moe_observe",
            ctypes.c_uint64(self._h()),
            layer,
            n,
            ids,
            ctypes.cast(ctypes.c_void_p(arr[0]), ctypes.POINTER(ctypes.c_float)),
        )

    def acquire(self, layer: int, experts: Iterable[int], stream: int = 0) -> tuple[list[int], int]:
        """Makes experts resident and pins them. Returns (slots, lease);
        release(lease) once the computation reading the slots is done (CPU)
        or submitted to ``stream`` (CUDA: a raw CUstream handle, e.g.
        ``torch.cuda.current_stream().cuda_stream``)."""
        xs = list(experts)
        n = len(xs)
        arr = (ctypes.c_int32 * max(1, n))(*xs)
        out = (ctypes.c_int32 * max(1, n))()
        lease = ctypes.c_uint64(0)
        _native.call("moe_acquire", ctypes.c_uint64(self._h()), layer, n, arr, out, ctypes.byref(lease), ctypes.c_uint64(stream))
        return list(out[:n]), lease.value

    def release(self, lease: int, stream: int = 0) -> None:
        """Drops the pins of a lease (after the work on ``stream`` that reads them)."""
        _native.call("moe_release", ctypes.c_uint64(self._h()), ctypes.c_uint64(lease), ctypes.c_uint64(stream))

    def ffn_shape(self) -> tuple[int, int, int]:
        """(hidden, intermediate, dtype code) of the engine's expert FFN;
        raises UnsupportedError when the layout does not fit the kernels."""
        h, i, d = ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int32(0)
        _native.call("moe_ffn_shape", ctypes.c_uint64(self._h()), ctypes.byref(h), ctypes.byref(i), ctypes.byref(d))
        return h.value, i.value, d.value

    def layer_ffn(
        self,
        layer: int,
        experts: Sequence[int],
        *,
        stream: int,
        x: int,
        out: int,
        scratch: int,
        topk: int,
        weights: int,
        tokens: int,
        k: int,
        dtype: int,
    ) -> None:
        """One MoE layer's expert FFN computed by the backend (see
        ``moe_layer_ffn`` in moe_infinity.h): ``experts`` are the distinct ids
        in ``topk`` ([T, k] int64), ``weights`` is [T, k] float32; addresses
        are data pointers."""
        n = len(experts)
        arr = (ctypes.c_int32 * max(1, n))(*experts)
        _native.call("moe_layer_ffn", ctypes.c_uint64(self._h()), layer, n, arr, *_ffn_args(stream, x, out, scratch, topk, weights, tokens, k, dtype))

    def layer(self, args: _native.LayerArgs) -> int:
        """Runs one MoE layer through the engine's executor (``moe_layer``):
        the engine chooses how the layer runs, writes the path it took to
        ``args.path`` (and, for the caller's own code, the experts it needs
        to ``args.experts``) and this returns it (``_native.PATH_*``). The
        hot path: one foreign call on a reused argument struct."""
        fn = self._layer_fn
        if fn is None:
            fn = self._layer_fn = _native.lib().moe_layer
        st = fn(self._h(), ctypes.byref(args))
        if st != 0:
            _native.raise_status("moe_layer", st)
        return args.path

    def capture_begin(self) -> None:
        """Before capturing a decode step of mapped layers in a CUDA graph
        (``moe_capture_begin``)."""
        _native.call("moe_capture_begin", ctypes.c_uint64(self._h()))

    def capture_end(self) -> int:
        """Ends the capture; returns the number of MoE layers it holds."""
        n = ctypes.c_int32(0)
        _native.call("moe_capture_end", ctypes.c_uint64(self._h()), ctypes.byref(n))
        return n.value

    def graph_step(self, stream: int, reqs: Any, nreq: int) -> None:
        """After each replay of the captured step: traces its routing
        (``reqs``: a ctypes uint64 array of ``nreq`` request ids, or None)."""
        st = _native.lib().moe_graph_step(self._h(), stream, nreq, reqs)
        if st != 0:
            _native.raise_status("moe_graph_step", st)

    def progress(self) -> tuple[int, int]:
        """(done, total) bytes of the long loading work in progress: the host tier
        prepared during configure(), or before it the experts add_compressed() compressed."""
        d, t = ctypes.c_int64(0), ctypes.c_int64(0)
        _native.call("moe_engine_progress", ctypes.c_uint64(self._h()), ctypes.byref(d), ctypes.byref(t))
        return d.value, t.value

    def hint(self, layer: int, experts: Iterable[int]) -> None:
        """Hints that ``layer`` will use ``experts`` (they are prefetched first)."""
        xs = list(experts)
        arr = (ctypes.c_int32 * max(1, len(xs)))(*xs)
        _native.call("moe_hint", ctypes.c_uint64(self._h()), layer, len(xs), arr)

    def tune(
        self,
        *,
        policy: str | None = None,
        prefetch: bool | None = None,
        graph_misses: str | None = None,
        cpu_experts: str | int | None = None,
        kernel_max_tokens: int | None = None,
        flush: bool = False,
        reset_stats: bool = False,
    ) -> None:
        """Changes the running engine: eviction policy, prefetching on/off,
        how the next captured CUDA-graph step gets missed experts
        (``graph_misses``: ``"auto"``, ``"read"`` or ``"copy"``), pausing
        (``cpu_experts="off"``) or resuming (``"auto"``, or a thread count,
        which measures the CPU side again on that many threads) the CPU's
        part in computing experts that configure set up, the kernel
        crossover measured on this machine (``kernel_max_tokens``: the most
        tokens for which the expert kernels beat transformers' code, 1..16;
        0 for the default), emptying the cache (``flush``) and zeroing the
        counters."""
        t: dict[str, Any] = {"flush": flush, "reset_stats": reset_stats}
        if policy is not None:
            t["policy"] = policy
        if prefetch is not None:
            t["prefetch"] = bool(prefetch)
        if graph_misses is not None:
            t["graph_misses"] = str(graph_misses)
        if cpu_experts is not None:
            # A count travels as a JSON number, a name as a string.
            t["cpu_experts"] = cpu_experts if isinstance(cpu_experts, int) and not isinstance(cpu_experts, bool) else str(cpu_experts)
        if kernel_max_tokens is not None:
            t["kernel_max_tokens"] = kernel_max_tokens
        _native.call("moe_engine_tune", ctypes.c_uint64(self._h()), json.dumps(t).encode())
        if self._plan is not None:  # the engine's plan, as tuning changed it
            self._plan = _native.call_json("moe_engine_plan", ctypes.c_uint64(self._h()))

    # -- observability -------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: hits, misses, prefetch_hits, late_prefetches,
        wasted_prefetches, loads, prefetch_loads, evictions, bytes_moved,
        stall_ns, cpu_computed (experts the CPU computed from host memory
        instead of a slot; each then offered to the cache like an in-place read), cpu_ns (its time for them), ... totalled and under ``"layers"`` per layer; each layer
        also has ``expert_tokens``, the tokens routed to each of its experts
        since the last reset."""
        return _native.call_json("moe_stats", ctypes.c_uint64(self._h()))

    def reset_stats(self) -> None:
        """Zeroes the counters."""
        _native.call("moe_reset_stats", ctypes.c_uint64(self._h()))

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Writes the trace collection to ``path`` atomically."""
        _native.call("moe_save_trace", ctypes.c_uint64(self._h()), os.fsencode(path))


def _ffn_args(stream: int, x: int, out: int, scratch: int, topk: int, weights: int, tokens: int, k: int, dtype: int) -> tuple:
    """The trailing arguments of moe_layer_ffn."""
    return (*(ctypes.c_uint64(v) for v in (stream, x, out, scratch, topk, weights)), tokens, k, dtype)


def _describe(tensor: Any) -> tuple[str, list[int], int, int]:
    """(dtype name, shape, data address, size in bytes) of a host tensor."""
    mod = type(tensor).__module__
    if mod.startswith("torch"):
        if tensor.device.type != "cpu":
            raise InvalidArgumentError(f"host tensors must be on the CPU, got device {tensor.device}")
        if not tensor.is_contiguous():
            raise InvalidArgumentError("host tensors must be contiguous")
        dtype = _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise InvalidArgumentError(f"unsupported expert dtype {tensor.dtype} (float32, float16, bfloat16; uint8 for MXFP4 blocks and scales)")
        return dtype, list(tensor.shape), tensor.data_ptr(), tensor.numel() * tensor.element_size()
    if mod.startswith("numpy"):
        if not tensor.flags["C_CONTIGUOUS"]:
            raise InvalidArgumentError("host arrays must be C-contiguous")
        dtype = _NUMPY_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise InvalidArgumentError(f"unsupported expert dtype {tensor.dtype} (float32, float16)")
        return dtype, list(tensor.shape), tensor.ctypes.data, tensor.nbytes
    raise InvalidArgumentError(f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__name__}")


def _as_float32(counts: Any, n: int) -> tuple[int, Any]:
    """(address, owner) of ``counts`` as n contiguous float32 values."""
    mod = type(counts).__module__
    if mod.startswith("torch"):
        import torch

        t = counts.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if t.numel() != n:
            raise InvalidArgumentError(f"counts has {t.numel()} values, expected {n}")
        return t.data_ptr(), t
    import numpy as np

    a = np.ascontiguousarray(counts, dtype=np.float32)
    if a.size != n:
        raise InvalidArgumentError(f"counts has {a.size} values, expected {n}")
    return a.ctypes.data, a
