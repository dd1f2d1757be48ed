"""Schedules count units as `prune` does: GPT-2 `Conv1D` neurons are columns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunebound as pb
from prunebound._masks import count_units
from prunebound.training.schedule import Schedule, prune_round


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
