"""`run_schedule` progress: a tqdm bar over rounds on a terminal, one log line per round."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from prunebound.data import Dataset
from prunebound.training.loop import TrainConfig
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule


def _toy() -> tuple[nn.Module, Dataset]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), Dataset(
        "toy", x, y, x, y, 3, (6,)
    )


def test_one_log_line_per_round(caplog: pytest.LogCaptureFixture) -> None:
    model, data = _toy()
    sched = Schedule(target_sparsity=0.75, rounds=2, retrain_epochs=1)
    with caplog.at_level(logging.INFO, logger="prunebound.training.runner"):
        run_schedule(model, data, TrainConfig(epochs=1, batch_size=8), sched, seed=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "prunebound.training.runner"]
    assert [line.split(":")[0] for line in lines] == ["round 0/2", "round 1/2", "round 2/2"]
    assert "sparsity 75.00%" in lines[-1] and "accuracy" in lines[-1]


def test_a_terminal_gets_a_bar_over_rounds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = _toy()
    sched = Schedule(target_sparsity=0.5, rounds=2, retrain_epochs=0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_schedule(model, data, TrainConfig(epochs=1), sched, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "rounds: 100%" in err and "3/3" in err and "sparsity 50.0%" in err, err
    run_schedule(*_toy(), TrainConfig(epochs=1), sched, seed=0, progress=False)
    assert "rounds" not in capsys.readouterr().err
