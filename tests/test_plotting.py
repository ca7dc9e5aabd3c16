"""moe_infinity.plotting: the stats table, the expert heatmap and the
hit-rate chart (drawn with matplotlib's Agg backend), fed from statistics
dicts, models and engines; and the error when matplotlib is missing."""

from __future__ import annotations

import builtins

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from safetensors.torch import save_file

import moe_infinity as mi
from moe_infinity import plotting

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def layer(tokens, hits=3, misses=1, module="model.layers.0.mlp.experts"):
    return {
        "module": module, "hits": hits, "misses": misses, "prefetch_hits": 1, "wasted_prefetches": 0,
        "bytes_moved": 2_000_000, "stall_ns": 1_500_000, "expert_tokens": tokens,
    }


def stats(layers):
    total = {k: sum(l[k] for l in layers) for k in ("hits", "misses", "prefetch_hits", "wasted_prefetches", "bytes_moved", "stall_ns")}
    return {**total, "layers": layers}


STATS = stats([layer([4, 0, 1, 3, 0]), layer([0, 2, 2, 2, 2], hits=0, misses=0), layer([8, 0, 0, 0, 0])])


class FakeModel:
    """Anything with moe_stats(), as models from from_pretrained have."""

    def moe_stats(self):
        return STATS


def test_expert_activations_is_layers_by_experts():
    assert plotting.expert_activations(STATS) == [[4, 0, 1, 3, 0], [0, 2, 2, 2, 2], [8, 0, 0, 0, 0]]
    assert plotting.expert_activations(FakeModel()) == plotting.expert_activations(STATS)


def test_expert_activations_from_an_engine_counts_observed_tokens(tmp_path):
    # A Mixtral-style checkpoint of 2 layers × 4 experts.
    ts = {"model.embed_tokens.weight": torch.zeros(4, 8)}
    for lay in range(2):
        for x in range(4):
            p = f"model.layers.{lay}.block_sparse_moe.experts.{x}."
            ts |= {p + "w1.weight": torch.ones(4, 8), p + "w2.weight": torch.ones(8, 4), p + "w3.weight": torch.ones(4, 8)}
    save_file(ts, str(tmp_path / "model.safetensors"))
    regions = [
        {"name": "gate_up_proj", "parts": ["w1.weight", "w3.weight"], "dtype": "float32"},
        {"name": "down_proj", "parts": ["w2.weight"], "dtype": "float32"},
    ]
    with mi.Engine(budget_bytes=1 << 20) as eng:
        eng.add_checkpoint(tmp_path)
        eng.configure({"regions": regions})
        a, b = eng.begin_request(), eng.begin_request()
        eng.observe(0, [a, b], torch.tensor([[0, 3, 0, 1], [2, 0, 0, 1]], dtype=torch.float32))
        eng.observe(1, [a], torch.tensor([[0, 0, 5, 0]], dtype=torch.float32))
        eng.end_request(a)
        eng.end_request(b)
        assert plotting.expert_activations(eng) == [[2, 3, 0, 2], [0, 0, 5, 0]]
        eng.reset_stats()
        assert plotting.expert_activations(eng) == [[0] * 4, [0] * 4]


def test_heatmap_has_one_cell_per_layer_and_expert():
    ax = plotting.plot_expert_activations(STATS, title="t")
    (im,) = ax.images
    assert im.get_array().shape == (3, 5)
    assert im.get_array()[2, 0] == 8
    assert ax.get_title() == "t" and ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE layer"
    assert len(ax.figure.axes) == 2, "heatmap and its colour bar"


def test_heatmap_draws_on_a_given_axes():
    _, axes = plt.subplots(1, 2)
    assert plotting.plot_expert_activations(FakeModel(), ax=axes[1]) is axes[1]
    assert not axes[0].images and len(axes[1].images) == 1


def test_hit_rates_one_bar_per_run():
    ax = plotting.plot_hit_rates({"priority": 0.5, "lru": STATS, "lfu": FakeModel()})
    bars = ax.patches
    assert len(bars) == 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["priority", "lru", "lfu"]
    assert bars[0].get_height() == pytest.approx(0.5)
    assert bars[1].get_height() == pytest.approx(STATS["hits"] / (STATS["hits"] + STATS["misses"]))
    assert [t.get_text() for t in ax.texts] == ["50.0%", "75.0%", "75.0%"]


@pytest.mark.parametrize("results, match", [({}, "non-empty"), ({"x": 1.5}, r"outside \[0, 1\]"), ({"x": object()}, "model_or_stats")])
def test_hit_rates_bad_input_names_the_argument(results, match):
    with pytest.raises(mi.InvalidArgumentError, match=match):
        plotting.plot_hit_rates(results)


def test_stats_without_expert_tokens_are_reported():
    old = stats([{k: v for k, v in layer([1, 2]).items() if k != "expert_tokens"}])
    with pytest.raises(mi.InvalidArgumentError, match="expert_tokens"):
        plotting.expert_activations(old)


def test_stats_table_rows_html_and_text():
    table = plotting.stats_table(STATS)
    assert [r["layer"] for r in table.rows] == [0, 1, 2, "total"]
    assert table.rows[-1]["hits"] == 6 and table.rows[-1]["hit rate"] == pytest.approx(0.75)
    assert table.rows[1]["hit rate"] == 0.0, "a layer with no uses has rate 0, not a division error"
    html = table._repr_html_()
    assert html.startswith("<table") and html.count("<tr>") == 1 + 4
    assert "<td>75.0%</td>" in html and "<td>model.layers.0.mlp.experts</td>" in html
    text = str(table).splitlines()
    assert len(text) == 5 and text[0].split()[:2] == ["layer", "module"]


def test_stats_table_escapes_html():
    table = plotting.stats_table(stats([layer([1], module="<b>x</b>")]))
    assert "&lt;b&gt;x&lt;/b&gt;" in table._repr_html_() and "<b>" not in table._repr_html_()


def test_missing_matplotlib_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for draw in (lambda: plotting.plot_expert_activations(STATS), lambda: plotting.plot_hit_rates({"lru": 0.5})):
        with pytest.raises(mi.MissingDependencyError, match="pip install matplotlib") as err:
            draw()
        assert isinstance(err.value, ImportError) and isinstance(err.value, mi.MoEInfinityError)
    # The table needs no matplotlib.
    assert plotting.stats_table(STATS).rows

