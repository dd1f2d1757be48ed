"""prune(..., coupled=True): coupled groups scored and pruned together, whole units masked."""

from __future__ import annotations

import pytest
import torch
from helpers import with_bn_stats
from torch import nn

import prunebound as pb
from prunebound._masks import count_units
from prunebound.coupling import unit_groups
from prunebound.theory import certify

pytest.importorskip("torch_pruning")


def test_resnet_groups_tie_the_residual_stream() -> None:
    groups = unit_groups(pb.models.resnet_small(), torch.randn(2, 1, 16, 16))
    stream = next(sorted(g.producers) for g in groups if "0" in g.producers)
    assert stream == ["0", "3.conv2"]
    assert sorted(next(g for g in groups if "4.conv2" in g.producers).producers) == [
        "4.conv2",
        "4.shortcut.0",
    ]
    assert sum(len(g.producers) for g in groups) == 10  # each conv/linear in one group


def test_global_scope_ranks_units_across_groups() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.mul_(10)  # the first layer's neurons all outrank the second's
    pb.prune(net, "neuron", 0.5, coupled=True, example_inputs=torch.randn(3, 4), scope="global")
    assert [count_units(net[i], "row")[1] for i in (0, 2)] == [8, 0]  # 8 of 16 pruned
    assert "0" not in pb.masks(net)


def test_whole_units_stay_dead_in_training_and_reset_revives_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    net = with_bn_stats(pb.models.resnet_small(), x)
    bias_before = net[1].bias.detach().clone()
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    net.train()
    net(x).square().sum().backward()
    grad = net[1].parametrizations.bias.original.grad
    dead = ~pb.masks(net)["0"].flatten(1).any(1)
    assert grad is not None and bool((grad[dead] == 0).all()) and bool((grad[~dead] != 0).any())
    pb.reset(net)
    assert torch.equal(net[1].bias.detach(), bias_before) and not pb.is_pruned(net)


def test_certify_models_whole_unit_masks_and_refuses_foreign_parametrizations() -> None:
    from soundness import worst_gap
    from torch.nn.utils import parametrize

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    pb.prune(net, "neuron", 0.5, coupled=True, example_inputs=torch.randn(3, 4))
    assert isinstance(net[0].parametrizations.bias[0], pb.Mask)
    assert worst_gap(net, input_shape=(4,)) <= certify(net, radius=1.0).bound

    class Double(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return 2 * b

    parametrize.register_parametrization(net[2], "bias", Double())
    with pytest.raises(ValueError, match=r"'2'.*parametrization other than prunebound's"):
        certify(net, radius=1.0)


def test_bad_example_inputs_leave_the_model_unpruned() -> None:
    net = pb.models.lenet_300_100()
    with pytest.raises(ValueError, match="cannot run on example_inputs of shape"):
        pb.prune(net, "neuron", 0.5, coupled=True, example_inputs=torch.randn(2, 10))
    with pytest.raises(ValueError, match="amount"):
        pb.prune(net, "neuron", counts={"1": 3}, coupled=True, example_inputs=torch.randn(2, 784))
    assert not pb.is_pruned(net)
