"""Plots and tables from result dicts (the only module that imports matplotlib)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_results(directory: str | Path) -> dict[str, Any]:
    """Read `results.json` from a run directory."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a prunebound results directory?")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


PERCENT_WORDS = ("sparsity", "acc", "rate", "fraction")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table; columns named like sparsity/accuracy/rate/fraction as percentages."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(col: str, v: Any) -> str:
        if isinstance(v, float):
            if any(w in col for w in PERCENT_WORDS):
                return f"{100 * v:.1f}%"
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(c, r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def rounds_table(results: Mapping[str, Any]) -> str:
    """One row per round of a run: sparsity, compression, accuracy, loss, FLOPs."""
    rows = [
        {
            "round": r["round"],
            "sparsity": r["sparsity"],
            "compression": r["compression"],
            "accuracy": r["accuracy"],
            "loss": r["loss"],
            "MFLOPs": (r["sparse_flops"] or 0) / 1e6,
        }
        for r in results["rounds"]
    ]
    return format_table(rows)


def plot_accuracy_vs_sparsity(runs: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Test accuracy against sparsity, one line per named run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in runs.items():
        xs = [100 * r["sparsity"] for r in res["rounds"]]
        ys = [100 * r["accuracy"] for r in res["rounds"]]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_layer_sparsity(results: Mapping[str, Any], path: str | Path) -> Path:
    """Per-layer sparsity of the final round as bars."""
    layers = results["rounds"][-1]["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(layers), [100 * v for v in layers.values()])
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_run(results: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """The standard plots of one run into its directory."""
    d = Path(directory)
    name = results["config"]["schedule"]["method"]
    return [
        plot_accuracy_vs_sparsity({name: results}, d / "accuracy_vs_sparsity.png"),
        plot_layer_sparsity(results, d / "layer_sparsity.png"),
    ]
