"""Schedules count units as `prune` does (GPT-2 `Conv1D` neurons are columns) and report the
quantity their target speaks of."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunebound as pb
from prunebound import report
from prunebound._masks import count_units
from prunebound.data import Dataset
from prunebound.training.loop import TrainConfig
from prunebound.training.runner import Round, run_schedule
from prunebound.training.schedule import Schedule, prune_round, target_fraction


class Conv1D(nn.Module):
    """transformers' GPT-2 `Conv1D` (x @ W + b, weight (in, out)), without transformers."""

    def __init__(self, nf: int, nx: int, g: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf, generator=g))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


Conv1D.__module__ = "transformers.pytorch_utils"  # what `layer_types.TRANSPOSED_LINEAR` finds


def _gpt2_like() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    return nn.Sequential(Conv1D(4, 16, g), nn.ReLU(), Conv1D(6, 4, g), nn.ReLU(), Conv1D(2, 6, g))


def test_count_units_counts_conv1d_columns() -> None:
    layer = _gpt2_like()[0]  # weight (16, 4): 4 output neurons
    assert count_units(layer, "row") == (4, 4)
    assert count_units(layer, "weight") == (64, 64)
    pb.prune(layer, "neuron", counts={"": 1})
    assert count_units(layer, "row") == (4, 3)
    assert count_units(layer, "weight") == (64, 48)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_neuron_schedule_prunes_conv1d_columns(scope: str) -> None:
    model = _gpt2_like()
    schedule = Schedule(kind="oneshot", method="neuron", target_sparsity=0.5, scope=scope)
    prune_round(model, schedule, torch.Generator().manual_seed(0), 1)
    masks = pb.masks(model)
    pruned_columns = {name: int((~m.any(dim=0)).sum()) for name, m in masks.items()}
    assert set(masks) == {"0", "2"}  # the output layer "4" is left alone, as by `prune`
    if scope == "layer":  # every layer reaches round(0.5 * n) exactly
        assert pruned_columns == {"0": 2, "2": 3}
    else:  # one ranking: half of all 10 neurons
        assert sum(pruned_columns.values()) == 5
    for m in masks.values():  # whole columns: a neuron goes with all its inputs
        assert torch.equal(m, m.any(dim=0, keepdim=True).expand_as(m))
    out = model(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (3, 2)


def test_structured_schedule_reports_the_quantity_its_target_speaks_of() -> None:
    # issue 10 item 7: a filter schedule's target is on the filters of the conv layers, while
    # `sparsity` counts all prunable weights (the Linear head too): report both, and say which
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    data = Dataset("toy", x, y, x, y, 3, (1, 8, 8))
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )  # fmt: skip
    sched = Schedule(kind="oneshot", method="filter", target_sparsity=0.5, retrain_epochs=0)
    first, last = run_schedule(model, data, TrainConfig(epochs=0), sched, seed=0)
    assert (first.target, first.achieved) == (0.0, 0.0)
    assert (last.target, last.achieved) == (0.5, 0.5)  # 2 of 4 and 3 of 6 filters
    assert last.target_of == "rows of layers 0, 2"
    assert last.sparsity == (2 * 9 + 3 * 36) / (36 + 216 + 288)  # all prunable weights
    assert target_fraction(model, sched) == (0.5, "rows of layers 0, 2")
    line = report.round_line(last.to_dict())
    assert "sparsity  23.3%" in line and "(50.0% of the rows of layers 0, 2; target 50.0%)" in line
    old = {k: v for k, v in last.to_dict().items() if k not in ("target", "achieved", "target_of")}
    assert Round(**old).target is None  # rounds of older checkpoints still load


def test_unstructured_schedule_target_is_the_reported_sparsity() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    sched = Schedule(kind="oneshot", target_sparsity=0.4)
    prune_round(model, sched, 0, 1)
    assert target_fraction(model, sched) == (
        pb.sparsity(model).sparsity,
        "weights of all prunable layers",
    )


def test_schedule_layers_opt_in_the_output_layer_and_keep_old_hashes() -> None:
    model = _gpt2_like()
    sched = Schedule(kind="oneshot", method="neuron", target_sparsity=0.5, layers=("2", "4"))
    prune_round(model, sched, 0, 1)
    pruned = {name: int((~m.any(dim=0)).sum()) for name, m in pb.masks(model).items()}
    assert pruned == {"2": 3, "4": 1}  # named: the output layer "4" is pruned too
    assert target_fraction(model, sched) == (0.5, "rows of layers 2, 4")
    assert "layers" not in Schedule().to_dict()  # configs without layers keep their hash
    assert Schedule(layers=("a*",)).to_dict()["layers"] == ["a*"]
    with pytest.raises(ValueError, match=r"schedule\.layers must be layer names"):
        Schedule(layers=(3,))  # type: ignore[arg-type]


def test_rounds_table_shows_target_and_achieved_when_they_differ_from_sparsity() -> None:
    rows = [
        {"round": 0, "sparsity": 0.0, "compression": 1.0, "accuracy": 0.5, "loss": 1.0,
         "sparse_flops": None, "target": 0.0, "achieved": 0.0, "target_of": "rows of layers 0, 2"},
        {"round": 1, "sparsity": 0.2333, "compression": 1.3, "accuracy": 0.4, "loss": 1.1,
         "sparse_flops": None, "target": 0.5, "achieved": 0.5, "target_of": "rows of layers 0, 2"},
    ]  # fmt: skip
    lines = report.rounds_table({"rounds": rows}).splitlines()
    assert lines[0].split()[-4:] == ["target", "sparsity", "achieved", "sparsity"]
    assert lines[3].split()[-2:] == ["50.0%", "50.0%"] and "23.3%" in lines[3]
    assert lines[-1] == "target / achieved: share of the rows of layers 0, 2 pruned"
    plain = [{**r, "target_of": "weights of all prunable layers"} for r in rows]
    assert "target" not in report.rounds_table({"rounds": plain})
