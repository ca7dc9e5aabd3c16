"""Greedy decoding with every decode step replayed from one CUDA graph.

At batch 1 an eager decode step of a transformers model is bound by the
host: Python and one kernel launch per operation (measured on an H100:
~70 ms of host time per step for the Qwen3-30B-A3B shape, against ~3 ms of
GPU work). moe_infinity's mapped mode submits nothing that depends on the
host — each MoE layer's kernels read resident experts from their slots and
the others from pinned host memory, and the routing reaches the engine
asynchronously — so a whole decode step can be captured once and replayed
with one launch per token. The engine keeps tracing, caching and
prefetching between replays (``moe_graph_step``).

    from moe_infinity.graphs import GraphDecoder
    dec = GraphDecoder(model, max_len=prompt_len + new_tokens)
    ids = dec.generate(input_ids, max_new_tokens=32)

Needs a CUDA device, the engine's kernels in mapped mode and a model whose
decode step transformers can run on a StaticCache without host
synchronisation (the MoE families of this package).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ._compat import cache_kwargs
from .errors import StateError, UnsupportedError


class GraphDecoder:
    """Captures one decode step of ``model`` (loaded by moe_infinity) on a
    StaticCache of ``max_len`` positions for ``batch`` rows, and decodes
    greedily by replaying it."""

    def __init__(self, model: Any, max_len: int, batch: int = 1):
        rt = getattr(model, "moe_runtime", None)
        if rt is None:
            raise StateError("GraphDecoder needs a model loaded by moe_infinity")
        if rt.device.type != "cuda" or not rt.mapped:
            raise UnsupportedError("GraphDecoder needs a CUDA device with the engine's kernels in mapped mode")
        self.model, self.rt, self.max_len, self.batch = model, rt, int(max_len), int(batch)
        self.device = rt.device
        self.stream = torch.cuda.Stream(self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.cache: Any = None
        self.capture_s = 0.0
        #: Replays in flight at most with generate(pipeline=True).
        self.depth = 2
        self.layers_captured = 0
        self.step_s: list[float] = []
        # Host time of each replayed step up to its synchronisation: the
        # inputs' update, the replay launch and moe_graph_step.
        self.host_s: list[float] = []
        # The part of host_s spent in the engine (moe_graph_step).
        self.engine_s: list[float] = []
        # The part of host_s spent launching the captured graph (torch's
        # CUDAGraph.replay, i.e. cudaGraphLaunch).
        self.launch_s: list[float] = []

    def _cache(self) -> Any:
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=self.max_len)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        P = input_ids.shape[1]
        out = self.model(input_ids=input_ids, **cache_kwargs(self.model, self.cache), cache_position=torch.arange(P, device=self.device), use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True)

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, **cache_kwargs(self.model, self.cache), cache_position=self.pos, use_cache=True)
        logits = out.logits[:, -1, :]
        # The step feeds itself: the next replay reads the token this one
        # chose at the next position, so replays can be queued back to back.
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def _capture(self) -> None:
        """Warms the step up on the capture stream (allocations and lazy
        initialisation happen outside the graph), then captures it. The
        cache's write counter is left advanced: prefill again after."""
        t0 = time.perf_counter()
        for _ in range(2):  # on the capture stream (generate's)
            self._step()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        eng = self.rt.engine
        eng.capture_begin()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.logits = self._step()
        finally:
            self.layers_captured = eng.capture_end()
        if self.layers_captured != len(self.rt.layers):
            raise UnsupportedError(
                f"only {self.layers_captured} of {len(self.rt.layers)} MoE layers ran in mapped mode during the capture"
            )
        self.graph = graph
        self.capture_s = time.perf_counter() - t0

    def _stepwise(self, first: torch.Tensor, P: int, n: int, reqs_c: Any, stop: "_Stop") -> torch.Tensor:
        """Up to n replays from position P, reading each token before the next."""
        nxt, toks = first, []
        eng = self.rt.engine
        for i in range(n):
            if stop.done():
                break
            t0 = time.perf_counter()
            self.ids.copy_(nxt)
            self.pos.fill_(P + i)
            tl = time.perf_counter()
            self.graph.replay()
            t1 = time.perf_counter()
            eng.graph_step(self.stream.cuda_stream, reqs_c, len(reqs_c))
            self.engine_s.append(time.perf_counter() - t1)
            self.launch_s.append(t1 - tl)
            nxt = self.logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            self.host_s.append(time.perf_counter() - t0)
            self.stream.synchronize()
            self.step_s.append(time.perf_counter() - t0)
            stop.see(nxt)
        return torch.cat(toks, dim=1) if toks else first[:, :0]

    def _pipelined(self, first: torch.Tensor, P: int, n: int, reqs_c: Any, stop: "_Stop") -> torch.Tensor:
        """Up to n replays from position P, queued without waiting for
        tokens: token i is looked at (for end of sequence) once replay
        i + depth is about to be queued, so up to depth replays past the
        end run and are dropped."""
        self.ids.copy_(first)
        self.pos.fill_(P)
        toks = torch.empty((self.batch, n), dtype=torch.long, device=self.device)
        seen = torch.empty((self.batch, n), dtype=torch.long, pin_memory=True) if stop.active else None
        # Blocking events: a spinning cudaEventSynchronize polls the driver
        # for the whole step (depth replays ahead there is slack to wake
        # up), and those polls slow the engine's own driver calls, which
        # copy mode makes while a layer waits for them.
        events = [torch.cuda.Event(enable_timing=True, blocking=True) for _ in range(n + 1)]
        events[0].record(self.stream)
        eng = self.rt.engine
        issued = looked = 0
        for i in range(n):
            if i >= self.depth:
                events[i + 1 - self.depth].synchronize()
                if seen is not None:  # token i - depth is on the host now
                    stop.see(seen[:, looked : looked + 1])
                    looked += 1
            if stop.done():
                break
            t0 = time.perf_counter()
            self.graph.replay()
            t1 = time.perf_counter()
            eng.graph_step(self.stream.cuda_stream, reqs_c, len(reqs_c))
            self.engine_s.append(time.perf_counter() - t1)
            self.launch_s.append(t1 - t0)
            toks[:, i : i + 1].copy_(self.ids)
            if seen is not None:
                seen[:, i : i + 1].copy_(self.ids, non_blocking=True)
            events[i + 1].record(self.stream)
            self.host_s.append(time.perf_counter() - t0)
            issued = i + 1
        self.stream.synchronize()
        while seen is not None and looked < issued and not stop.done():
            stop.see(seen[:, looked : looked + 1])
            looked += 1
        self.step_s = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(issued)]
        return toks[:, :issued]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        on_prefill: Any = None,
        pipeline: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Prefill (eager) then ``max_new_tokens`` greedy tokens (graph
        replays); returns the prompt followed by the new tokens.
        ``on_prefill()``, if given, runs after the prefill, before the first
        replay (the benchmark resets the statistics there). Per-step
        wall times (host synchronised) are in ``step_s``, the host time of
        submitting each step in ``host_s``.

        ``pipeline=True`` queues each replay before the previous token is
        read (at most ``depth`` replays in flight, so the engine's cache
        updates take effect within ``depth`` tokens): the GPU never waits
        for the host, and ``step_s`` holds the GPU-side interval between
        consecutive replays (H100, Qwen3-30B-A3B shape: 11.2 ms/token against
        12.8 stepwise; BENCHMARKS.md).

        ``eos_token_id`` (an id or a list of ids) ends a row at its first
        end-of-sequence token, as transformers' ``generate`` does: decoding
        stops once every row has ended, and the tokens of an ended row after
        its end are ``pad_token_id`` (default: the first end id). With
        ``pipeline=True`` the end is seen ``depth`` tokens late; the replays
        queued past it are dropped."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be [{self.batch}, prompt_len], got {tuple(input_ids.shape)}")
        P = input_ids.shape[1]
        if P + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {P} + {max_new_tokens} new tokens exceed max_len {self.max_len}")
        input_ids = input_ids.to(self.device)
        self.cache = self._cache() if self.cache is None else self.cache
        self.cache.reset()
        rt = self.rt
        out_tokens = [input_ids]
        self.step_s = []
        self.host_s = []
        self.engine_s = []
        self.launch_s = []
        caller = torch.cuda.current_stream(self.device)
        # Everything runs on the capture stream: the engine orders its table
        # updates on the stream the layers run on, and the replays must see
        # the prefill's cache writes.
        self.stream.wait_stream(caller)
        with rt.requests(self.batch), torch.cuda.stream(self.stream):
            nxt = self._prefill(input_ids)
            if self.graph is None:
                self.ids = nxt.clone()
                self.pos = torch.tensor([P], device=self.device)
                self._capture()
                # transformers' StaticCache writes each update at its own
                # device-side counter (cumulative_length), not at
                # cache_position: the warm-up steps advanced it past P.
                # Start over from a clean cache so that every replay writes
                # at the position it attends from.
                self.cache.reset()
                nxt = self._prefill(input_ids)
            out_tokens.append(nxt)
            if on_prefill is not None:
                on_prefill()
            stop = _Stop(eos_token_id, pad_token_id, self.batch)
            stop.see(nxt)
            run = self._pipelined if pipeline else self._stepwise
            out_tokens.append(run(nxt, P, max_new_tokens - 1, rt._tls.reqs_c, stop))
        caller.wait_stream(self.stream)
        return stop.finish(torch.cat(out_tokens, dim=1), P)


class _Stop:
    """End-of-sequence bookkeeping on the host: which rows have ended and at
    which new token (``see`` takes each new [batch, 1] column in order)."""

    def __init__(self, eos: int | list[int] | None, pad: int | None, batch: int):
        ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        self.eos = set(ids)
        self.active = bool(ids)
        self.pad = pad if pad is not None else (ids[0] if ids else None)
        self.ended = [None] * batch  # index among the new tokens of each row's end
        self.count = 0

    def see(self, column: torch.Tensor) -> None:
        if self.active:
            for r, tok in enumerate(column.reshape(-1).tolist()):
                if self.ended[r] is None and tok in self.eos:
                    self.ended[r] = self.count
        self.count += 1

    def done(self) -> bool:
        return self.active and all(e is not None for e in self.ended)

    def finish(self, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Drops the new tokens after the last row's end and pads each
        ended row after its own end."""
        if not self.active:
            return ids
        if self.done():
            ids = ids[:, : prompt_len + max(self.ended) + 1]
        ids = ids.clone()
        for r, e in enumerate(self.ended):
            if e is not None:
                ids[r, prompt_len + e + 1 :] = self.pad
        return ids
