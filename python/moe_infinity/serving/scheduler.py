"""Continuous batching for an offloaded model: requests join the running
batch at the next step and leave it when they finish.

Two ways to run a batch, both giving each request exactly the tokens
``model.generate`` gives it alone, whoever else is in the batch:

- ``"stacked"`` (the default where the model supports it,
  :mod:`moe_infinity.serving.stacked`): one forward per decode step for the
  whole batch, its products and attention computed row by row;
- ``"threads"``: every request runs ``generate`` in its own worker thread
  and the threads meet at each MoE layer (below). Any model; each request's
  Python runs separately (one at a time, under the GIL).

In threads mode each admitted request is decoded by a worker thread running transformers'
``generate`` for it alone (batch 1); the worker threads meet at every MoE
layer (:mod:`moe_infinity.lockstep`), so one step fetches each expert once
for every request routed to it, and the engine's prefetcher and cache see the
whole batch. A request's tokens are exactly the tokens ``model.generate``
gives it alone, whoever else is in the batch.

Why not transformers' ``ContinuousBatchingManager`` (``generate_batch``)?
It runs with the engine's experts (its packed batch reaches the experts
module like any other), but it flattens every request's tokens into one row
and pages their attention: the numbers then depend on the batch's
composition (on the built-in model one of four prompts already changes its
10th greedy token), and the experts module cannot tell which token belongs to
which request, so request-level tracing is lost.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ClosedError, InvalidArgumentError, OverloadedError, StateError
from ..lockstep import Lockstep
from .stacked import StackedBatch, stacked_support

__all__ = ["SamplingParams", "Event", "Request", "Scheduler"]

log = logging.getLogger("moe_infinity.serving")


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: the most tokens to generate (≥ 1).
        temperature: 0 is greedy; otherwise logits are divided by it
            before sampling.
        top_p: nucleus sampling mass in (0, 1].
        seed: seeds this request's own sampler (None: a fresh random seed).
        stop_token_ids: extra token ids that end the request (the model's
            end-of-sequence tokens always do, unless ``ignore_eos``).
        ignore_eos: keep generating past end-of-sequence tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be a positive integer (got {self.max_tokens!r})")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise InvalidArgumentError(f"temperature must be between 0 and 100 (got {self.temperature!r})")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (got {self.top_p!r})")

    @property
    def greedy(self) -> bool:
        """True when decoding picks the most likely token."""
        return float(self.temperature) == 0.0


@dataclass(frozen=True)
class Event:
    """One thing that happened to a request, delivered to its callback from a
    worker thread.

    Attributes:
        token: a generated token id (None in the final event).
        finish_reason: set in the final event only: ``"stop"`` (an
            end-of-sequence or stop token), ``"length"`` (max_tokens),
            ``"cancelled"`` or ``"error"``.
        error: the exception, when finish_reason is ``"error"``.
    """

    token: int | None = None
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    """A submitted request: its tokens so far and its timings (seconds,
    ``time.monotonic``)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _on_finish: Callable[[Request], None] | None = None

    def cancel(self) -> None:
        """Asks the request to stop; it leaves the batch at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called."""
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request finished; True if it did."""
        return self._done.wait(timeout)

    def _emit(self, ev: Event) -> None:
        if ev.token is not None:
            now = time.monotonic()
            if self.first_token is None:
                self.first_token = now
            self.tokens.append(ev.token)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # noqa: BLE001 — a consumer's bug must not kill the worker
                log.exception("moe_infinity: request %s: event callback failed", self.id)

    def _end_reason(self, stops: tuple[int, ...]) -> str | None:
        """Why the request is done after its last token, or None: it was
        cancelled, the last token is one of ``stops``, or it has
        max_tokens tokens (in that order). The one stop rule of both
        batching modes."""
        if self.cancelled:
            return "cancelled"
        if self.tokens and self.tokens[-1] in stops:
            return "stop"
        if len(self.tokens) >= self.params.max_tokens:
            return "length"
        return None

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        self.finished = time.monotonic()
        if self._on_finish is not None:
            self._on_finish(self)
        self._emit(Event(finish_reason=reason, error=error))
        self._done.set()


class _Streamer:
    """transformers' streamer interface: forwards each new token (the first
    ``put`` is the prompt)."""

    def __init__(self, req: Request):
        self.req = req
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.req._emit(Event(token=int(t)))

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion: true once the request is cancelled."""

    def __init__(self, req: Request):
        self.req = req

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.req.cancelled, dtype=torch.bool, device=input_ids.device)


class _SeededSampler:
    """A logits processor that samples with the request's own generator
    (temperature, then top-p) and leaves only the drawn token, so that
    greedy decoding in ``generate`` returns it: each request's randomness is
    its own, whatever runs beside it."""

    def __init__(self, params: SamplingParams):
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.gen = torch.Generator(device="cpu")
        if params.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(int(params.seed))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float().cpu() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True, dim=-1)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < self.top_p
            keep[..., 0] = True
            mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep)
            probs = torch.where(mask, probs, torch.zeros_like(probs))
        token = torch.multinomial(probs, 1, generator=self.gen).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token, 0.0)


class _Row:
    """A request in a stacked batch: its trace handle, sampler and the token
    it feeds the next step."""

    def __init__(self, req: Request, handle: int, stops: tuple[int, ...]):
        self.req = req
        self.handle = handle
        self.stops = stops
        self.sampler = None if req.params.greedy else _SeededSampler(req.params)
        self.next = -1

    def take(self, logits: torch.Tensor) -> bool:
        """Picks the next token from this row's logits ([1, vocab], float32)
        as ``generate`` would, emits it, and says whether the request is
        done (finishing it)."""
        req = self.req
        scores = logits if self.sampler is None else self.sampler(None, logits)
        tok = int(scores.argmax(-1)[0])
        req._emit(Event(token=tok))
        self.next = tok
        reason = req._end_reason(self.stops)
        if reason is None:
            return False
        req._finish(reason)
        return True


class Scheduler:
    """Runs requests against one offloaded model with continuous batching.

    Args:
        model: a model returned by ``moe_infinity.from_pretrained``.
        max_batch: requests decoded at once (worker threads).
        max_queue: requests waiting for a place in the batch; one more is
            refused with OverloadedError (the server's 429), so memory stays
            bounded under any load.
        context_length: the model's context in tokens (default: the config's
            ``max_position_embeddings``).
        batching: ``"stacked"`` (one forward per step for the whole batch),
            ``"threads"`` (a thread per request, meeting at each MoE layer)
            or ``"auto"``: stacked where the model supports it
            (:func:`~moe_infinity.serving.stacked.stacked_support`), else
            threads; ``batching_reason`` says why threads were chosen.
        exact: stacked steps compute every row as it would be computed
            alone, so each request gets its alone tokens. False stacks the
            rows' products plainly: faster on a GPU, but a request's last
            bits (and sometimes tokens) then depend on the batch.
    """

    def __init__(self, model: Any, *, max_batch: int = 16, max_queue: int = 64, context_length: int | None = None, batching: str = "auto", exact: bool = True):
        if batching not in ("auto", "stacked", "threads"):
            raise InvalidArgumentError(f"batching must be 'auto', 'stacked' or 'threads' (got {batching!r})")
        if max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be at least 1 (got {max_batch})")
        if max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be 0 or more (got {max_queue})")
        rt = getattr(model, "moe_runtime", None)
        if rt is None:
            raise InvalidArgumentError("Scheduler needs a model loaded with moe_infinity.from_pretrained")
        if getattr(model.config, "is_encoder_decoder", False):
            raise InvalidArgumentError(f"serving {model.config.model_type} (an encoder-decoder model) is not supported; serve a decoder-only model")
        self.model = model
        self.rt = rt
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = int(context_length or getattr(model.config, "max_position_embeddings", 0) or 0) or None
        gc = model.generation_config
        eos = gc.eos_token_id
        self.eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        if rt.scheduler is not None:
            raise StateError("this model already has a running Scheduler; close it first (one scheduler per model)")
        why = stacked_support(model) if batching != "threads" else None
        if batching == "stacked" and why is not None:
            raise InvalidArgumentError(f"batching='stacked' cannot serve this model: {why}; use batching='threads'")
        self.batching = "stacked" if batching != "threads" and why is None else "threads"
        self.batching_reason = why if batching == "auto" and why is not None else None
        if self.batching_reason:
            log.info("moe_infinity: batching with threads: %s", why)
        self.exact = bool(exact)
        self.lockstep: Lockstep | None = None
        if self.batching == "threads":
            self.lockstep = Lockstep(hint=rt.engine.hint)
            rt.lockstep = self.lockstep
        rt.scheduler = self
        self._steps = 0
        self._step_rows = 0
        self._max_rows = 0
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting = 0  # requests in the queue
        self._running: set[Request] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count()
        self._streams: dict[int, Any] = {}
        self.counters = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rejected": 0}
        self.finished: dict[str, int] = {}
        if self.batching == "stacked":
            self._workers = [threading.Thread(target=self._drive, name="moe_infinity-batch", daemon=True)]
        else:
            self._workers = [threading.Thread(target=self._work, name=f"moe_infinity-batch-{i}", daemon=True) for i in range(max_batch)]
        for w in self._workers:
            w.start()

    # -- requests ---------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises InvalidArgumentError when the request cannot run (an empty
        prompt, or prompt plus max_tokens past the context)."""
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty")
        n = len(prompt_ids)
        if self.context_length is not None and n + params.max_tokens > self.context_length:
            over = n + params.max_tokens - self.context_length
            raise InvalidArgumentError(
                f"this model's context is {self.context_length} tokens; the prompt has {n} and max_tokens asks for "
                f"{params.max_tokens} more: {over} too many. Shorten the prompt or lower max_tokens."
            )

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, on_event: Callable[[Event], None] | None = None, request_id: str | None = None) -> Request:
        """Queues a request; it joins the batch at the next step with a free
        place. ``on_event`` receives its tokens and its final event from a
        worker thread. Raises InvalidArgumentError for a request that cannot
        run, OverloadedError when the queue is full and ClosedError after
        close()."""
        params = params or SamplingParams()
        self.check(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", [int(t) for t in prompt_ids], params, on_event)
        req._on_finish = self._account
        with self._lock:
            if self._closed:
                raise ClosedError("the server is shutting down")
            free = self.max_batch - len(self._running)
            if self._waiting >= self.max_queue + max(0, free):
                self.counters["rejected"] += 1
                raise OverloadedError(f"the server is busy: {len(self._running)} requests running and {self._waiting} queued (max_queue={self.max_queue}); retry later")
            self._waiting += 1
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(req.prompt_ids)
        self._queue.put(req)
        return req

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, timeout: float | None = None) -> Request:
        """Submits a request and waits for it to finish."""
        req = self.submit(prompt_ids, params)
        req.wait(timeout)
        return req

    # -- workers ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running.add(req)
            try:
                if req.cancelled:
                    req._finish("cancelled")
                    continue
                self.lockstep.enroll()
                try:
                    self._run(req)
                finally:
                    self.lockstep.leave()
            except BaseException as e:  # noqa: BLE001 — reported to the request, the worker lives on
                log.warning("moe_infinity: request %s failed: %s", req.id, e)
                req._finish("error", e)
            finally:
                with self._lock:
                    self._running.discard(req)

    def _drive(self) -> None:
        """Stacked batching: the one thread that runs the batch. Between
        steps it admits queued requests (each prefilled alone, then added as
        a row) and drops finished ones; each step is one forward of every
        row."""
        batch = StackedBatch(self.model, exact=self.exact)
        rows: list[_Row] = []
        stopping = False
        with self._stream():
            while True:
                while not stopping and len(rows) < self.max_batch:
                    try:
                        req = self._queue.get(block=not rows)
                    except queue.Empty:
                        break
                    if req is None:
                        stopping = True
                        break
                    with self._lock:
                        self._waiting -= 1
                        self._running.add(req)
                    row = self._admit(batch, req)
                    if row is not None:
                        rows.append(row)
                if not rows:
                    if stopping:
                        return
                    continue
                try:
                    logits = self._in_rows([r.handle for r in rows], batch.step, [r.next for r in rows], rowwise=self.exact)
                except BaseException as e:  # noqa: BLE001 — every row fails; the driver lives on
                    log.warning("moe_infinity: a batch step of %d requests failed: %s", len(rows), e)
                    self._leave(batch, rows, range(len(rows)), "error", e)
                    rows = []
                    continue
                self._steps += 1
                self._step_rows += len(rows)
                self._max_rows = max(self._max_rows, len(rows))
                done: list[int] = []
                for i, r in enumerate(rows):
                    if r.take(logits[i : i + 1]):
                        done.append(i)
                if done:
                    rows = self._leave(batch, rows, done)

    def _in_rows(self, handles: list[int], fn: Callable[..., Any], *args: Any, rowwise: bool = False) -> Any:
        with self.rt.rows(handles, rowwise=rowwise):
            return fn(*args)

    def _admit(self, batch: StackedBatch, req: Request) -> _Row | None:
        """Prefills a request alone and adds it to the batch; None when it
        already finished (cancelled, failed, or done after one token). A
        finished request leaves the running set through _account."""
        if req.cancelled:
            req._finish("cancelled")
            return None
        handle = None
        try:
            req.started = time.monotonic()
            handle = self.rt.engine.begin_request()
            cache, logits = self._in_rows([handle], batch.prefill, req.prompt_ids)
            row = _Row(req, handle, self._stops(req.params))
            if row.take(logits):
                self._end(handle)
                return None
            batch.add(cache, len(req.prompt_ids))
            return row
        except BaseException as e:  # noqa: BLE001 — reported to the request
            log.warning("moe_infinity: request %s failed: %s", req.id, e)
            if handle is not None:
                self._end(handle)
            req._finish("error", e)
            return None

    def _leave(self, batch: StackedBatch, rows: list[_Row], which: Any, reason: str | None = None, error: BaseException | None = None) -> list[_Row]:
        """Removes rows from the batch (finishing them with ``reason`` when
        given); returns the rows left."""
        which = set(which)
        for i in sorted(which):
            r = rows[i]
            self._end(r.handle)
            if reason is not None:
                r.req._finish(reason, error)
        batch.remove(sorted(which))
        return [r for i, r in enumerate(rows) if i not in which]

    def _end(self, handle: int) -> None:
        try:
            self.rt.engine.end_request(handle)
        except Exception as e:  # noqa: BLE001 — the request's tokens are out already
            log.warning("moe_infinity: ending a request's trace failed: %s", e)

    def _stops(self, p: SamplingParams) -> tuple[int, ...]:
        eos = () if p.ignore_eos else self.eos_ids
        return tuple(dict.fromkeys((*eos, *p.stop_token_ids)))

    def _account(self, req: Request) -> None:
        """Counts a finished request (before its final event is delivered,
        so that a client who saw it finish sees it counted)."""
        with self._lock:
            self._running.discard(req)
            self.counters["completion_tokens"] += len(req.tokens)
            self.finished[req.finish_reason or "error"] = self.finished.get(req.finish_reason or "error", 0) + 1

    def _run(self, req: Request) -> None:
        with self._stream():
            self._generate(req)

    def _stream(self) -> Any:
        """On a GPU, this worker's own CUDA stream, so that members' kernels
        run concurrently instead of queueing on one stream (each thread has
        its own kernel scratch either way)."""
        dev = self.model.device
        if dev.type != "cuda":
            return contextlib.nullcontext()
        tid = threading.get_ident()
        st = self._streams.get(tid)
        if st is None:
            st = self._streams[tid] = torch.cuda.Stream(device=dev)
        return torch.cuda.stream(st)

    def _generate(self, req: Request) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        p = req.params
        req.started = time.monotonic()
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.model.device)
        stops = self._stops(p)
        kwargs: dict[str, Any] = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": p.max_tokens,
            "do_sample": False,
            "streamer": _Streamer(req),
            "stopping_criteria": StoppingCriteriaList([_Cancelled(req)]),
            "eos_token_id": list(stops) if stops else None,
            "pad_token_id": self.pad_id,
        }
        if not p.greedy:
            kwargs["logits_processor"] = LogitsProcessorList([_SeededSampler(p)])
        self.model.generate(ids, **kwargs)
        # generate stops only for these reasons; a limit of its own (the
        # config's max_length) counts as length.
        req._finish(req._end_reason(stops) or "length")

    # -- state ------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        return self._waiting

    def stats(self) -> dict[str, Any]:
        """Counters since start: requests, tokens, finish reasons, the
        queue, and the batch sizes the steps had."""
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
            out["finished"] = dict(self.finished)
            out["running"] = len(self._running)
            out["queued"] = self._waiting
        if self.lockstep is not None:
            out["batch"] = {"mode": "threads", **self.lockstep.stats()}
        else:
            out["batch"] = {
                "mode": "stacked",
                "exact": self.exact,
                "steps": self._steps,
                "mean_batch": self._step_rows / self._steps if self._steps else 0.0,
                "max_batch": self._max_rows,
                "members": len(self._running),
            }
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stops accepting requests, cancels queued ones, lets running ones
        finish for up to ``timeout`` seconds, cancels the rest, and stops the
        workers. The model stays open. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._running)
        drained: list[Request] = []
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                drained.append(r)
        for r in drained:
            with self._lock:
                self._waiting -= 1
            r._finish("cancelled")
        deadline = time.monotonic() + timeout
        for r in running:
            r.wait(max(0.0, deadline - time.monotonic()))
        for r in list(self._running):
            r.cancel()
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=max(1.0, deadline - time.monotonic() + 30.0))
        if self.lockstep is not None and self.rt.lockstep is self.lockstep:
            self.rt.lockstep = None
        if self.rt.scheduler is self:
            self.rt.scheduler = None

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
