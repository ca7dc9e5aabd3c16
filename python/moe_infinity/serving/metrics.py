"""``/metrics`` in the Prometheus text exposition format (version 0.0.4),
written out directly: every number is read at scrape time from the
scheduler's and the engine's own counters, so nothing is counted twice and
several servers in one process (tests, Ray replicas) never share a
registry."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Histogram", "HTTPCounter", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: time to first token, request latency, time per output token.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """A cumulative histogram of seconds (thread-safe)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    def lines(self, name: str) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, acc = [], 0
        for le, c in zip((*(_num(b) for b in self.buckets), "+Inf"), counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out.append(f"{name}_sum {_num(total)}")
        out.append(f"{name}_count {acc}")
        return out


class HTTPCounter:
    """HTTP responses by path and status code."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        with self._lock:
            self.counts[(path, status)] = self.counts.get((path, status), 0) + 1

    def items(self) -> list[tuple[tuple[str, int], int]]:
        with self._lock:
            return sorted(self.counts.items())


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    out += [f"{name}{labels} {_num(v)}" for labels, v in samples]
    return out


def render(sched_stats: dict[str, Any], moe_stats: dict[str, Any] | None, http: HTTPCounter, hists: dict[str, tuple[str, Histogram]], draining: bool) -> str:
    """The exposition text. ``moe_stats`` is None once the model closed."""
    p = "moe_infinity_"
    s = sched_stats
    ls = s["batch"]
    out: list[str] = []
    fam = lambda n, k, h, v: out.extend(_family(p + n, k, h, v))  # noqa: E731
    fam("requests_total", "counter", "Requests accepted into the queue.", [("", s["requests"])])
    fam("requests_rejected_total", "counter", "Requests refused because the queue was full (HTTP 429).", [("", s["rejected"])])
    fam(
        "requests_finished_total",
        "counter",
        "Requests finished, by the scheduler's finish reason: stop (end of sequence), length, cancelled (stop strings, clients that left, shutdown), error.",
        [(f'{{finish_reason="{_esc(k)}"}}', v) for k, v in sorted(s["finished"].items())],
    )
    fam("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [("", s["prompt_tokens"])])
    fam("generation_tokens_total", "counter", "Tokens generated.", [("", s["completion_tokens"])])
    fam("requests_running", "gauge", "Requests in the running batch.", [("", s["running"])])
    fam("requests_waiting", "gauge", "Requests queued for a place in the batch.", [("", s["queued"])])
    fam("batch_steps_total", "counter", "Decode steps (one forward of every request in the batch).", [("", ls["steps"])])
    fam("batch_size_mean", "gauge", "Mean requests per step since start.", [("", float(ls["mean_batch"]))])
    fam("batch_size_max", "gauge", "Most requests one step had.", [("", ls["max_batch"])])
    fam("draining", "gauge", "1 while the server shuts down (new requests get 503).", [("", int(draining))])
    if moe_stats is not None:
        m = moe_stats
        fam("expert_hits_total", "counter", "Expert lookups served from the device cache.", [("", m["hits"])])
        fam("expert_misses_total", "counter", "Expert lookups that had to wait for a transfer.", [("", m["misses"])])
        fam("expert_prefetch_hits_total", "counter", "Hits on experts a prefetch brought in.", [("", m["prefetch_hits"])])
        fam("expert_evictions_total", "counter", "Experts evicted from the device cache.", [("", m["evictions"])])
        fam("expert_cache_hit_rate", "gauge", "Hits / (hits + misses) since start.", [("", float(m["hit_rate"]))])
        fam("expert_bytes_moved_total", "counter", "Bytes of expert weights moved to the device.", [("", m["bytes_moved"])])
        fam("expert_stall_seconds_total", "counter", "Seconds the model waited for experts to arrive.", [("", float(m["stall_seconds"]))])
        fam("expert_cache_resident", "gauge", "Experts resident in the device cache.", [("", m["resident"])])
        fam("expert_cache_slots", "gauge", "Expert slots in the device cache.", [("", m["slots"])])
        fam("engine_active_requests", "gauge", "Requests the engine is tracing now.", [("", m["active_requests"])])
        fam("eamc_size", "gauge", "Expert activation matrices in the collection.", [("", m["eamc_size"])])
    fam(
        "http_responses_total",
        "counter",
        "HTTP responses by path and status code.",
        [(f'{{path="{_esc(path)}",code="{code}"}}', n) for (path, code), n in http.items()],
    )
    for name, (help_, h) in hists.items():
        out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram", *h.lines(p + name)]
    return "\n".join(out) + "\n"
