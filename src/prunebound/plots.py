"""Plots of result dicts (the only module that imports matplotlib); `report` re-exports them.

Each takes the `to_dict()` of a result, as the tables of `report` do: a run's `results.json`
(accuracy against sparsity, per-layer sparsity) or a `VerifyReport` (gaps). The `*_figure`
functions return the matplotlib figure (for tests and notebooks); `plot_*` write a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def plot_accuracy_vs_sparsity(results: Mapping[str, Any], path: str | Path) -> Path:
    """Test accuracy against sparsity: one run's results dict, or {label: results} for several.

    Writes a PNG to `path` and returns it.
    """
    runs: Mapping[str, Any]
    if "rounds" in results:
        runs = {str(results.get("config", {}).get("schedule", {}).get("method", "run")): results}
    else:
        runs = results
    if not runs:
        raise ValueError("plot_accuracy_vs_sparsity: no runs to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    every = []
    for label, res in runs.items():
        xs = [100 * r["sparsity"] for r in res["rounds"]]
        ys = [100 * r["accuracy"] for r in res["rounds"]]
        every += ys
        ax.plot(xs, ys, marker="o", label=label)
    first = next(iter(runs.values()))
    if first["rounds"] and first["rounds"][0]["sparsity"] == 0:
        dense = 100 * first["rounds"][0]["accuracy"]
        ax.axhline(dense, color="grey", linestyle=":", label=f"dense {dense:.1f}%")
    # at least 10 points of accuracy on the axis: a 1-point wobble must not look like a cliff
    hi = min(100.0, max(every) + 1.0)
    ax.set_ylim(max(0.0, min(min(every) - 1.0, hi - 10.0)), hi)
    ax.set_xlim(-2, 100)
    ax.set_xlabel("sparsity of prunable weights (%)")
    ax.set_ylabel("test accuracy (%)")
    config = first.get("config", {})
    model, data = config.get("model", {}).get("name"), config.get("data", {}).get("name")
    ax.set_title("test accuracy vs sparsity" + (f": {model} on {data}" if model and data else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def layer_sparsity_figure(results: Mapping[str, Any]) -> Figure:
    """Per-layer sparsity of the final round: horizontal bars, one row per layer (long dotted
    module names stay readable), the figure as tall as the layers need; the caller closes it."""
    final = results["rounds"][-1]
    layers = final["layers"]
    names = [str(k) or "(model)" for k in layers]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * max(len(names), 3)))
    y = list(range(len(names)))
    bars = ax.barh(y, [100 * v for v in layers.values()], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlim(0, 112)  # room for the labels of bars near 100%
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("sparsity (% of the layer's weights pruned)")
    method = results.get("config", {}).get("schedule", {}).get("method")
    overall = f", {100 * final['sparsity']:.1f}% overall" if "sparsity" in final else ""
    ax.set_title(f"per-layer sparsity after round {len(results['rounds']) - 1}{overall}"
                 + (f" ({method})" if method else ""))  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_layer_sparsity(results: Mapping[str, Any], path: str | Path) -> Path:
    """Per-layer sparsity of the final round (`layer_sparsity_figure`) as a PNG at `path`."""
    fig = layer_sparsity_figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_run(results: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """The standard plots of one run into its directory."""
    d = Path(directory)
    return [
        plot_accuracy_vs_sparsity(results, d / "accuracy_vs_sparsity.png"),
        plot_layer_sparsity(results, d / "layer_sparsity.png"),
    ]


def gaps_figure(report: Mapping[str, Any]) -> Figure:
    """Histogram of a `VerifyReport.to_dict()`'s worst-gap estimates relative to eps, with the
    (1 - delta)-quantile, the certificates (if computed) on the same bins, and eps. When every
    value is far below eps the axis zooms to the data, and eps is marked off-scale at the right
    edge (drawn to scale, the histogram would fill a sliver of the axis). Caller closes it."""
    eps = float(report["eps"])
    gaps = [g / eps for g in report["gaps"]]
    certs = [c / eps for c in report.get("certificates") or ()]
    q = float(report["gap_quantile"]) / eps
    top = max([*gaps, *certs, q, 0.0])
    zoom = top < 0.5  # eps (1.0) would squeeze the data into less than half of the axis
    right = 1.05 * top if zoom else max(1.05, 1.05 * top)
    right = right if right > 0 else 1.0
    bins = [float(b) for b in np.linspace(0.0, right, 41)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    counts, _, _ = ax.hist(
        gaps, bins=bins, alpha=0.8, label=f"worst-gap estimate ({len(gaps)} networks)"
    )
    peak = float(np.max(counts)) if len(gaps) else 1.0
    if certs:
        c, _, _ = ax.hist(certs, bins=bins, alpha=0.5, label="certificate (upper bound)")
        peak = max(peak, float(np.max(c)))
    label = f"{1 - report['delta']:.0%} quantile of the estimates"
    ax.axvline(q, color="black", linestyle="--", label=label)
    ax.set_xlim(0.0, right)
    ax.set_ylim(0.0, 1.45 * peak)  # headroom: legend and eps note above the bars
    if zoom:
        ax.annotate(
            f"eps = 1 is off-scale →\n(all values ≤ {top:.2g} eps)",
            xy=(1.0, 0.97), xycoords="axes fraction", ha="right", va="top", color="red",
        )  # fmt: skip
    else:
        ax.axvline(1.0, color="red", label="eps")
    ax.set_xlabel("sup gap / eps")
    ax.set_ylabel("networks")
    ax.set_title(
        f"{report['method']}: {report['violations']} violations of eps, rate <= "
        f"{report['rate_upper']:.3g} ({report['confidence']:.0%} CP)"
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_gaps(report: Mapping[str, Any], path: str | Path) -> Path:
    """`gaps_figure` as a PNG at `path`; returns it."""
    fig = gaps_figure(report)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
