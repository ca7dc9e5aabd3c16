"""Lockstep: many requests, each decoded by its own thread, share every MoE
layer's experts.

Continuous batching usually stacks the batch's tokens into one forward. That
changes each request's numbers: a matrix product over 16 rows does not round
like the same product over one row (torch's CPU GEMM differs from M = 2 on),
so a request's greedy tokens would depend on who else is in the batch.
Lockstep keeps every request's computation exactly what ``generate`` does for
it alone and batches only what costs: the experts' bytes.

Each member thread runs the unmodified model for its own request. A *step* is
one forward of every member; a thread joins or leaves only between steps. At
each MoE layer a member waits until every member of the step has reached that
layer; the last to arrive hints the union of their experts to the engine, so
the misses of the whole batch are fetched together, and each member then
computes its own tokens on experts that are resident (an expert brought over
once serves every member routed to it). The engine sees every member's
routing of layer L (each request keeps its own activation matrix) before any
member moves on to layer L+1, so prefetching and eviction see the batch.

A member that fails mid-forward leaves the step (the runtime's forward hook
always runs), so the others never wait on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .errors import StateError

__all__ = ["Lockstep"]

_INF = 1 << 62


class Lockstep:
    """Groups the MoE layers of threads decoding concurrently.

    Args:
        hint: called by the last thread to reach a layer, with
            ``(layer, experts)``: every member's experts of that layer.
        stall_timeout: seconds a member may wait for the others before the
            wait fails with StateError (a safety net against a member stuck
            outside the model; a healthy step never comes near it).
    """

    def __init__(self, hint: Callable[[int, list[int]], None] | None = None, stall_timeout: float = 600.0):
        self._hint = hint
        self._timeout = stall_timeout
        self._cv = threading.Condition()
        self._enrolled: set[int] = set()  # threads taking part in steps
        self._waiting: set[int] = set()  # enrolled, waiting for the next step
        self._running: set[int] = set()  # members of the current step still in their forward
        self._pos: dict[int, int] = {}  # member → the last MoE layer it reached
        self._union: dict[int, set[int]] = {}  # layer → experts of the members that reached it
        self._hinted: set[int] = set()
        self.steps = 0  #: steps started
        self.member_steps = 0  #: sum over steps of the members (mean batch = member_steps / steps)
        self.max_members = 0  #: the most members one step had

    # -- membership -------------------------------------------------------------

    def enroll(self) -> None:
        """The calling thread takes part in steps from its next forward on."""
        with self._cv:
            self._enrolled.add(threading.get_ident())

    def leave(self) -> None:
        """The calling thread stops taking part (its request finished or
        failed). Idempotent."""
        tid = threading.get_ident()
        with self._cv:
            self._enrolled.discard(tid)
            self._waiting.discard(tid)
            self._end_locked(tid)
            self._maybe_start_locked()
            self._cv.notify_all()

    def enrolled(self) -> bool:
        """True when the calling thread takes part in steps."""
        return threading.get_ident() in self._enrolled

    @property
    def members(self) -> int:
        """Threads enrolled now (requests decoding)."""
        return len(self._enrolled)

    # -- steps ------------------------------------------------------------------

    def begin_forward(self) -> None:
        """Called at the start of each forward of an enrolled thread: waits
        until a step starts that includes it (every enrolled thread is
        waiting for one, no step running)."""
        tid = threading.get_ident()
        with self._cv:
            self._waiting.add(tid)
            self._maybe_start_locked()
            self._wait_locked(lambda: tid in self._running, "the next step")

    def end_forward(self) -> None:
        """Called when an enrolled thread's forward returns (or fails)."""
        tid = threading.get_ident()
        with self._cv:
            self._end_locked(tid)
            self._maybe_start_locked()
            self._cv.notify_all()

    def at_layer(self, layer: int, experts: Iterable[int]) -> None:
        """Called by a member before it computes MoE layer ``layer`` (layers
        are visited in increasing order within a forward) with the experts
        its tokens route to: waits until every member of the step has
        reached the layer or finished its forward."""
        tid = threading.get_ident()
        with self._cv:
            if tid not in self._running:
                return
            self._pos[tid] = layer
            self._union.setdefault(layer, set()).update(int(e) for e in experts)
            # Only the last to arrive wakes the others (one wake-up per
            # member per layer, not one per arrival).
            if self._all_reached(layer):
                self._cv.notify_all()
            else:
                self._wait_locked(lambda: self._all_reached(layer), f"MoE layer {layer}")
            if layer in self._hinted:
                return
            self._hinted.add(layer)
            union = sorted(self._union.pop(layer, ()))
        if self._hint is not None and union:
            self._hint(layer, union)

    # -- internals --------------------------------------------------------------

    def _all_reached(self, layer: int) -> bool:
        return all(p >= layer for p in self._pos.values())

    def _end_locked(self, tid: int) -> None:
        if tid in self._running:
            self._running.discard(tid)
            self._pos[tid] = _INF

    def _maybe_start_locked(self) -> None:
        """Starts a step when no member is still in the last one and every
        enrolled thread is waiting for the next."""
        if self._running or not self._waiting or (self._enrolled - self._waiting):
            return
        self._running = set(self._waiting)
        self._waiting.clear()
        self._pos = {t: -1 for t in self._running}
        self._union.clear()
        self._hinted.clear()
        self.steps += 1
        self.member_steps += len(self._running)
        self.max_members = max(self.max_members, len(self._running))
        self._cv.notify_all()

    def _wait_locked(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self._timeout
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise StateError(f"lockstep: waited {self._timeout:g} s for {what}; a member of the batch stopped responding")
            self._cv.wait(left)

    def stats(self) -> dict[str, Any]:
        """Steps taken and the batch sizes they had."""
        with self._cv:
            return {
                "steps": self.steps,
                "mean_batch": self.member_steps / self.steps if self.steps else 0.0,
                "max_batch": self.max_members,
                "members": len(self._enrolled),
            }
