"""`shrink = true` in a schedule: the run ends with the shrunk model, its file and its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunebound as pb
from prunebound.training.config import Experiment
from prunebound.training.experiment import run
from prunebound.training.schedule import Schedule

pytest.importorskip("torch_pruning")

CONFIG = """
seed = 1
out_dir = "{out}"
quiet = true
[model]
name = "lenet_300_100"
args = {{ in_features = 64 }}
[data]
name = "digits"
[train]
epochs = 1
batch_size = 64
[schedule]
kind = "oneshot"
method = "neuron"
target_sparsity = 0.5
retrain_epochs = 1
shrink = true
"""


def test_schedule_with_shrink_reports_and_writes_the_shrunk_model(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out"))
    exp = Experiment.from_toml(cfg)
    assert exp.schedule.shrink and exp.schedule.to_dict()["shrink"] is True
    run(exp, write_plots=False)
    out = tmp_path / "out"
    d = json.loads((out / "results.json").read_text())["shrink"]
    assert d["params"] == {
        "masked": 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10,
        "shrunk": 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10,
    }
    assert d["macs"]["shrunk"] < d["macs"]["masked"] and d["speedup"] > 0 and d["batch"] == 64
    masked = pb.load(pb.models.lenet_300_100(in_features=64), out / "model.safetensors")
    small = pb.load_shrunk(
        pb.models.lenet_300_100(in_features=64), out / "model.shrunk.safetensors"
    )
    x = torch.rand(5, 64)
    assert torch.allclose(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_shrink_needs_a_structured_method_and_keeps_old_hashes() -> None:
    with pytest.raises(ValueError, match=r"schedule\.shrink needs a structured method"):
        Schedule(method="magnitude", shrink=True)
    with pytest.raises(ValueError, match=r"schedule\.shrink must be true or false"):
        Schedule(method="neuron", shrink=1)  # type: ignore[arg-type]
    assert "shrink" not in Schedule(method="neuron").to_dict()
