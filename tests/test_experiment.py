"""Experiments from TOML, and the results directory they write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import prunebound as pb
from prunebound.experiment import Experiment, run

CONFIG = """
seed = 1
out_dir = "{out}"
[model]
name = "lenet_300_100"
args = {{ in_features = 64 }}
[data]
name = "digits"
[train]
epochs = 3
batch_size = 64
lr = 0.002
[schedule]
kind = "oneshot"
method = "magnitude"
target_sparsity = 0.5
retrain_epochs = 1
"""


def test_toml_run_writes_results_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out"))
    exp = Experiment.from_toml(cfg)
    assert exp.schedule.rounds == 1 and exp.train.lr == 0.002
    res = run(exp)
    out = tmp_path / "out"
    for f in (
        "results.json",
        "rounds.csv",
        "model.safetensors",
        "accuracy_vs_sparsity.png",
        "layer_sparsity.png",
    ):
        assert (out / f).is_file(), f
    d = json.loads((out / "results.json").read_text())
    assert d["config"]["seed"] == 1 and d["config_hash"] == exp.hash()
    assert set(d["versions"]) >= {"prunebound", "torch", "numpy"}
    assert [r["round"] for r in d["rounds"]] == [0, 1]
    assert d["rounds"][1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert d["rounds"][1]["layers"].keys() == {"1", "3", "5"}
    assert d["rounds"][0]["dense_flops"] == 2 * (64 * 300 + 300 * 100 + 100 * 10)
    with (out / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[1]["accuracy"]) == res.rounds[1].accuracy
    model = pb.models.build_model("lenet_300_100", in_features=64)
    pb.load(model, out / "model.safetensors")
    assert pb.sparsity(model).sparsity == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ("[train]\nepochz = 3\n", "unknown key 'train.epochz'"),
        ("colour = 1\n", "unknown key 'colour'"),
        ('[schedule]\nrounds = "five"\n', "schedule.rounds has the wrong type"),
        ("[model]\nname = 3\n", "model.name has the wrong type"),
        ("seed = 1.5\n", "seed has the wrong type"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, patch: str, match: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(patch)
    with pytest.raises(ValueError, match=match):
        Experiment.from_toml(cfg)


def test_missing_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Experiment.from_toml(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("seed = = 1")
    with pytest.raises(ValueError, match="invalid TOML"):
        Experiment.from_toml(tmp_path / "bad.toml")


def test_shipped_configs_parse() -> None:
    for cfg in Path(__file__).parents[1].glob("configs/*.toml"):
        Experiment.from_toml(cfg)
