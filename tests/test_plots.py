"""Plots: what a reader needs is on them (titles, readable labels, axes that show the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from prunebound import report

NAMES = [f"layer{b}.{i}.conv{j}" for b in (1, 2) for i in (0, 1) for j in (1, 2)]
NAMES += ["features.0.downsample.0", "classifier.fc"]


def _run(layers: dict[str, float], accuracies: tuple[float, ...] = (0.944, 0.956, 0.94)) -> dict:
    rounds = [
        {"sparsity": s, "accuracy": a, "layers": layers}
        for s, a in zip((0.0, 0.68, 0.9), accuracies, strict=True)
    ]
    config = {"schedule": {"method": "magnitude"}, "model": {"name": "m"}, "data": {"name": "d"}}
    return {"config": config, "rounds": rounds}


def _verify(gaps: list[float], eps: float = 2.0, certificates: Any = None) -> dict[str, Any]:
    return {
        "eps": eps, "gaps": gaps, "gap_quantile": sorted(gaps)[int(0.95 * (len(gaps) - 1))],
        "delta": 0.05, "method": "magnitude", "violations": sum(g > eps for g in gaps),
        "rate_upper": 0.05, "confidence": 0.95, "certificates": certificates,
    }  # fmt: skip


def test_layer_sparsity_has_a_title_and_labels_that_do_not_overlap() -> None:
    run = _run({n: 0.5 + 0.04 * k for k, n in enumerate(NAMES)})
    fig = report.layer_sparsity_figure(run)
    ax = fig.axes[0]
    assert "per-layer sparsity" in ax.get_title() and "90.0% overall" in ax.get_title()
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels] == NAMES  # every name, in full
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(b.x0 >= 0 for b in boxes)  # not cut off at the left edge
    plt.close(fig)


def test_gaps_histogram_fills_the_axis_when_eps_is_far_away() -> None:
    gaps = [0.1 + 0.3 * k / 99 for k in range(100)]  # 0.05 .. 0.2 eps (eps = 2)
    fig = report.gaps_figure(_verify(gaps, certificates=[g * 1.5 for g in gaps]))  # to 0.3 eps
    ax = fig.axes[0]
    left, right = ax.get_xlim()
    assert left == 0 and 0.3 <= right <= 0.33  # zoomed to the data (eps = 1 would be 3x out)
    notes = [t.get_text() for t in ax.texts]
    assert any("eps = 1 is off-scale" in n for n in notes)
    assert ax.get_title().startswith("magnitude: 0 violations")
    plt.close(fig)
    near = [0.5 + 1.6 * k / 99 for k in range(100)]  # up to 1.05 eps: eps drawn to scale
    fig = report.gaps_figure(_verify(near))
    ax = fig.axes[0]
    assert ax.get_xlim()[1] >= 1.05 and not ax.texts
    assert any(line.get_label() == "eps" for line in ax.get_lines())
    plt.close(fig)


def test_accuracy_axis_spans_at_least_10_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = report.plot_accuracy_vs_sparsity(_run({"a": 0.9}), tmp_path / "acc.png")
    assert path.stat().st_size > 1000
    seen: dict[str, Any] = {}  # the figure is closed after saving: look at it when saved

    def spy(fig: Any, *args: Any, **kwargs: Any) -> None:
        seen["ylim"], seen["title"] = fig.axes[0].get_ylim(), fig.axes[0].get_title()

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    report.plot_accuracy_vs_sparsity(_run({"a": 0.9}), tmp_path / "unused.png")
    lo, hi = seen["ylim"]
    assert hi - lo >= 10 and lo <= 94.0 <= 95.6 <= hi  # a 1.6-point wobble is not a cliff
    assert seen["title"] == "test accuracy vs sparsity: m on d"


@pytest.mark.parametrize("count", [1, 40])
def test_layer_sparsity_height_grows_with_layers(count: int) -> None:
    fig = report.layer_sparsity_figure(_run({f"block.{i}.fc": 0.5 for i in range(count)}))
    assert fig.get_figheight() >= 0.3 * count
    plt.close(fig)
