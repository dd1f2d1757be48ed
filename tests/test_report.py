"""Tables and plots from result dicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunebound import report

RES = {
    "config": {"schedule": {"method": "magnitude", "kind": "iterative"}},
    "rounds": [
        {
            "round": 0,
            "sparsity": 0.0,
            "compression": 1.0,
            "accuracy": 0.97,
            "loss": 0.1,
            "sparse_flops": 1000,
            "layers": {"a": 0.0, "b": 0.0},
        },
        {
            "round": 1,
            "sparsity": 0.5,
            "compression": 2.0,
            "accuracy": 0.96,
            "loss": 0.12,
            "sparse_flops": 500,
            "layers": {"a": 0.6, "b": 0.2},
        },
    ],
}


def test_format_table_percent_columns_only() -> None:
    text = report.format_table([{"layer": "a", "sparsity": 0.25, "loss": 0.5}])
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "sparsity", "loss"]
    assert lines[2].split() == ["a", "25.0%", "0.5"]
    assert report.format_table([]) == "(no rows)"


def test_plots_written(tmp_path: Path) -> None:
    paths = report.plot_run(RES, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_sparsity.png", "layer_sparsity.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_load_results_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results directory"):
        report.load_results(tmp_path)
