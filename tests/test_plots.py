"""Plots: categorical axes (layer, KV group, query head) carry integer tick labels only."""

from __future__ import annotations

import pytest

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gqaprune.report import plots  # noqa: E402
from gqaprune.stages import STAGES  # noqa: E402


def _labels(axis) -> list[str]:
    axis.figure.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


def _assert_integer_labels(axis, count: int) -> None:
    labels = _labels(axis)
    assert labels, "no tick labels"
    values = [int(label.replace("\u2212", "-")) for label in labels]  # raises on "0.5", "-0.5", "1e1"
    assert all(0 <= v < count for v in values), values


@pytest.mark.parametrize("groups, layers", [(2, 3), (3, 30), (1, 2)])
def test_head_importance_ticks_are_layer_and_group_integers(groups, layers):
    stage = {"index": 1, "unit": "group", "score": "taylor",
             "layers": [{"group_scores": [float(g + l) for g in range(groups)], "removed_kv_heads": [0]}
                        for l in range(layers)]}
    fig, _ = STAGES['head_prune'].plot(stage, plt)
    ax = fig.axes[0]
    _assert_integer_labels(ax.xaxis, groups)
    _assert_integer_labels(ax.yaxis, layers)
    if groups <= plots.MAX_LABELLED_TICKS:
        assert _labels(ax.xaxis) == [str(g) for g in range(groups)]  # every group labelled


@pytest.mark.parametrize("layers", [3, 30])
def test_layer_scores_and_widths_ticks_are_integers(layers):
    stage = {"index": 0, "score": "block_influence", "layer_scores": [0.1 * i for i in range(layers)],
             "dropped_layers": [1]}
    _assert_integer_labels(STAGES['layer_drop'].plot(stage, plt)[0].axes[0].xaxis, layers)
    shape = {"num_attention_heads": 8, "intermediate_size": 1024}
    report = {"stages": [], "plan": [{"per_layer": [shape] * layers}], "eval": {"before": {}, "after": {}},
              "shapes_after": {"per_layer": [shape] * (layers - 1)}}
    seen = []
    real_close = plt.close
    plt.close = lambda fig: seen.append(fig)  # keep the figure write_plots saves
    try:
        import tempfile
        from pathlib import Path

        plots.write_plots(report, Path(tempfile.mkdtemp()))
    finally:
        plt.close = real_close
    for ax in seen[0].axes:
        _assert_integer_labels(ax.xaxis, layers)
