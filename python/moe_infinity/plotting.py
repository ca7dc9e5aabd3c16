"""Pictures and tables of ``moe_stats()`` for notebooks and reports.

- :func:`stats_table` — the per-layer counters as a table that renders as
  HTML in Jupyter (and as text elsewhere); no pandas needed.
- :func:`expert_activations` — tokens routed to each expert of each MoE
  layer (a layers × experts matrix of plain lists).
- :func:`plot_expert_activations` — that matrix as a heatmap.
- :func:`plot_hit_rates` — cache hit rates of several runs (for example
  one per ``cache_policy``) as a bar chart.

Each function takes a model loaded by ``moe_infinity.from_pretrained`` (or
an :class:`~moe_infinity.Engine`) or a statistics dict already read from
one. matplotlib is imported only when a plot is drawn: install it with
``pip install matplotlib`` (or ``pip install 'moe_infinity[notebook]'``);
without it the plot functions raise :class:`MissingDependencyError`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArgumentError, MissingDependencyError

__all__ = ["StatsTable", "stats_table", "expert_activations", "hit_rate", "plot_expert_activations", "plot_hit_rates"]


def _pyplot() -> Any:
    """matplotlib.pyplot, or a MissingDependencyError saying how to get it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError(
            "moe_infinity.plotting needs matplotlib to draw: pip install matplotlib "
            "(or pip install 'moe_infinity[notebook]')"
        ) from e
    return plt


def _stats(model_or_stats: Any) -> Mapping[str, Any]:
    """The statistics dict of a model (``moe_stats()``), an Engine
    (``stats()``), or a dict passed through."""
    if isinstance(model_or_stats, Mapping):
        st = model_or_stats
    elif callable(getattr(model_or_stats, "moe_stats", None)):
        st = model_or_stats.moe_stats()
    elif callable(getattr(model_or_stats, "stats", None)):
        st = model_or_stats.stats()
    else:
        raise InvalidArgumentError(
            f"model_or_stats: expected a model from moe_infinity.from_pretrained, an Engine or a "
            f"moe_stats() dict, got {type(model_or_stats).__name__}"
        )
    if not isinstance(st.get("layers"), list):
        raise InvalidArgumentError("model_or_stats: the statistics have no per-layer counters ('layers')")
    return st


def hit_rate(stats: Mapping[str, Any]) -> float:
    """Hits / (hits + misses) of a statistics dict (0.0 before any use)."""
    if "hit_rate" in stats:
        return float(stats["hit_rate"])
    uses = stats["hits"] + stats["misses"]
    return stats["hits"] / uses if uses else 0.0


# -- the table ------------------------------------------------------------------

_COLUMNS = ("layer", "module", "hits", "misses", "hit rate", "prefetch hits", "wasted prefetches", "MB moved", "stall ms")


def _row(name: Any, module: str, s: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "layer": name,
        "module": module,
        "hits": s["hits"],
        "misses": s["misses"],
        "hit rate": hit_rate(s),
        "prefetch hits": s["prefetch_hits"],
        "wasted prefetches": s["wasted_prefetches"],
        "MB moved": s["bytes_moved"] / 1e6,
        "stall ms": s["stall_ns"] / 1e6,
    }


def _fmt(v: Any, col: str) -> str:
    if col == "hit rate":
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


class StatsTable:
    """Per-layer cache counters with a total row.

    ``rows`` is a list of dicts keyed by ``columns``; Jupyter renders the
    table as HTML (``_repr_html_``), ``str()`` gives aligned text."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.columns: tuple[str, ...] = _COLUMNS
        self.rows = rows

    def _cells(self) -> list[list[str]]:
        return [[_fmt(r[c], c) for c in self.columns] for r in self.rows]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>" for cells in self._cells()
        )
        return f'<table class="moe-stats"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __str__(self) -> str:
        cells = [list(self.columns)] + self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)).rstrip() for row in cells)

    def __repr__(self) -> str:
        return str(self)


def stats_table(model_or_stats: Any) -> StatsTable:
    """The cache counters of each MoE layer and their total: hits, misses,
    hit rate, prefetch hits, wasted prefetches, megabytes moved and stall
    time. Display it in a notebook, or read ``.rows``."""
    st = _stats(model_or_stats)
    rows = [_row(i, layer.get("module", ""), layer) for i, layer in enumerate(st["layers"])]
    rows.append(_row("total", "", st))
    return StatsTable(rows)


# -- plots ----------------------------------------------------------------------


def expert_activations(model_or_stats: Any) -> list[list[float]]:
    """Tokens routed to each expert of each MoE layer since the statistics
    were last reset: ``m[layer][expert]`` (a token counts once for each of
    its top-k experts)."""
    st = _stats(model_or_stats)
    out = []
    for i, layer in enumerate(st["layers"]):
        if "expert_tokens" not in layer:
            raise InvalidArgumentError(
                f"model_or_stats: layer {i} has no expert_tokens (statistics from an engine older than this package?)"
            )
        out.append([float(v) for v in layer["expert_tokens"]])
    return out


def plot_expert_activations(model_or_stats: Any, ax: Any = None, *, title: str | None = "Tokens per expert") -> Any:
    """Draws :func:`expert_activations` as a heatmap (rows: MoE layers,
    columns: experts, colour: tokens) with a colour bar, on ``ax`` or a new
    figure. Returns the Axes."""
    plt = _pyplot()
    m = expert_activations(model_or_stats)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(m[0]) + 2), max(2.5, 0.35 * len(m) + 1.5)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, label="tokens")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if len(m[0]) <= 32:
        ax.set_xticks(range(len(m[0])))
    if len(m) <= 32:
        ax.set_yticks(range(len(m)))
    if title:
        ax.set_title(title)
    return ax


def plot_hit_rates(results: Mapping[str, Any], ax: Any = None, *, title: str | None = "Expert cache hit rate") -> Any:
    """Draws one bar per entry of ``results`` — a name (e.g. the cache
    policy) mapped to a hit rate in [0, 1] or to a statistics dict (a model,
    Engine or ``moe_stats()``) — on ``ax`` or a new figure, each bar labelled
    with its percentage. Returns the Axes."""
    if not isinstance(results, Mapping) or not results:
        raise InvalidArgumentError("results: expected a non-empty mapping of name to hit rate or statistics")
    rates = {}
    for name, v in results.items():
        rate = float(v) if isinstance(v, (int, float)) else hit_rate(_stats(v))
        if not 0.0 <= rate <= 1.0:
            raise InvalidArgumentError(f"results[{name!r}]: hit rate {rate} is outside [0, 1]")
        rates[str(name)] = rate
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(rates) + 1), 3.0))
    bars = ax.bar(list(rates), list(rates.values()), color="tab:blue")
    ax.bar_label(bars, labels=[f"{r:.1%}" for r in rates.values()], padding=2)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("hit rate")
    if title:
        ax.set_title(title)
    return ax
