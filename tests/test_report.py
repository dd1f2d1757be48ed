"""Tables and plots from result dicts."""

from __future__ import annotations

import json
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


def test_accuracy_plot_takes_one_run_or_several(tmp_path: Path) -> None:
    one = report.plot_accuracy_vs_sparsity(RES, tmp_path / "one.png")
    two = report.plot_accuracy_vs_sparsity({"a": RES, "b": RES}, tmp_path / "two.png")
    assert one.read_bytes()[:4] == b"\x89PNG" and two.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no runs"):
        report.plot_accuracy_vs_sparsity({}, tmp_path / "none.png")


def test_rounds_and_layers_tables() -> None:
    rounds = report.rounds_table(RES).splitlines()
    assert rounds[0].split() == ["round", "sparsity", "compression", "accuracy", "loss", "MFLOPs"]
    assert rounds[3].split()[:4] == ["1", "50.0%", "2", "96.0%"]
    assert report.layers_table(RES) == "(no rows)"
    final = {
        "layers": [{"name": "a", "shape": [3, 4], "total": 12, "zeros": 6, "sparsity": 0.5}],
        "total": 12,
        "zeros": 6,
        "sparsity": 0.5,
    }
    lines = report.layers_table({**RES, "final_sparsity": final}).splitlines()
    assert lines[2].split() == ["a", "3x4", "12", "6", "50.0%"]
    assert lines[3].split() == ["all", "12", "6", "50.0%"]


def test_load_results_round_trip(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(RES))
    assert report.load_results(tmp_path) == RES


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ({"config": {}}, r"key 'config\.schedule' is missing"),
        ({"config": {"schedule": {"kind": "oneshot"}}}, r"key 'config\.schedule\.method'"),
        ({**RES, "rounds": []}, "key 'rounds' is empty"),
        ({**RES, "rounds": "x"}, "key 'rounds' is not a list"),
        ({**RES, "rounds": [{"round": 0}]}, r"key 'rounds\[0\]\.sparsity' is missing"),
        (
            {**RES, "final_sparsity": {"layers": [{"name": "a"}]}},
            r"key 'final_sparsity\.layers\[0\]\.shape'",
        ),
        ({**RES, "final_sparsity": {"layers": []}}, None),
    ],
)
def test_load_results_names_what_is_missing(
    tmp_path: Path, results: dict[str, object], match: str | None
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(results))
    if match is None:
        assert report.load_results(tmp_path) == results
        return
    with pytest.raises(ValueError, match="is not a prunebound results file: " + match):
        report.load_results(tmp_path)


def test_load_results_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(ValueError, match="not a prunebound results file: invalid JSON"):
        report.load_results(tmp_path)
