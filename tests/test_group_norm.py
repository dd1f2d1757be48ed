"""Group-norm structured criteria ("filter_group", "neuron_group").

A unit's score is the L2 norm of everything it owns: its producer rows, its consumers' input
columns and its BatchNorm scales. Checked against hand computations, against Torch-Pruning's
own `MagnitudePruner` (the same channels, weight for weight), on masked models, and refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import conv_bn_flatten_net, with_bn_stats
from torch import nn

import prunebound as pb
from prunebound.coupled_prune import group_norms, prune_coupled
from prunebound.coupling import unit_groups

tp = pytest.importorskip("torch_pruning")


def _dead_rows(model: nn.Module, name: str) -> torch.Tensor:
    return (~pb.masks(model)[name]).flatten(1).all(1)


def test_conv_bn_flatten_linear_score_is_the_hand_computed_group_norm() -> None:
    torch.manual_seed(0)
    net = conv_bn_flatten_net()
    x = torch.randn(6, 2, 6, 6)
    net = with_bn_stats(net, x)
    groups = unit_groups(net, x)
    first = next(g for g in groups if "0" in g.producers)
    w0, g1, w3 = net[0].weight.detach(), net[1].weight.detach(), net[3].weight.detach()
    want = w0.flatten(1).pow(2).sum(1) + g1.pow(2) + w3.transpose(0, 1).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(group_norms(net, [first])[0], want.double().sqrt())
    # the conv before the Flatten: each channel owns a block of 16 columns of the Linear
    second = next(g for g in groups if "3" in g.producers)
    assert [len(c) for c in second.consumers["6"]] == [16] * 4
    w6 = net[6].weight.detach().reshape(3, 4, 16).transpose(0, 1).flatten(1)
    want = net[3].weight.detach().flatten(1).pow(2).sum(1) + w6.pow(2).sum(1)
    torch.testing.assert_close(group_norms(net, [second])[0], want.double().sqrt())


def test_a_unit_with_small_outgoing_weights_goes_first() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[2] = 1.2  # the largest incoming row ...
        net[2].weight.fill_(1.0)
        net[2].weight[:, 2] = 0.0  # ... feeds nothing
    x = torch.randn(5, 3)
    before = copy.deepcopy(net)
    pb.prune(before, "neuron", 0.25, coupled=True, example_inputs=x)
    assert _dead_rows(before, "0").nonzero().flatten().tolist() == [0]  # the row norm keeps 2
    pb.prune(net, "neuron_group", 0.25, coupled=True, example_inputs=x)
    assert _dead_rows(net, "0").nonzero().flatten().tolist() == [2]


@pytest.mark.parametrize("build", ["vgg_small", "resnet_small"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_same_channels_as_torch_pruning_magnitude_pruner(build: str, ratio: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 12, 12)
    kwargs = {"batch_norm": True, "image_size": 12} if build == "vgg_small" else {}
    net = with_bn_stats(getattr(pb.models, build)(**kwargs), x)
    ref = copy.deepcopy(net)
    head = [m for m in ref.modules() if isinstance(m, nn.Linear)][-1]
    tp.pruner.MagnitudePruner(
        ref, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[head],
    ).step()  # fmt: skip
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    # Torch-Pruning keeps int(n (1 - ratio)) channels of a group of n
    counts = {
        min(g.producers): g.size - int(g.size * (1 - ratio))
        for g in unit_groups(net, x)
        if set(g.producers) <= set(convs)
    }
    meth = pb.METHODS["filter_group"]
    prune_coupled(net, meth, ratio, convs, scope="layer", seed=0, example_inputs=x, counts=counts)
    small = pb.shrink(net, x)
    ours, theirs = dict(small.named_parameters()), dict(ref.named_parameters())
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


def test_pruning_again_scores_the_masked_weights() -> None:
    x = torch.randn(8, 1, 12, 12)
    net = with_bn_stats(pb.models.resnet_small(), x)
    pb.prune(net, "filter_group", 0.5, coupled=True, example_inputs=x)
    first = _dead_rows(net, "0")
    pb.prune(net, "filter_group", 0.5, coupled=True, example_inputs=x)
    second = _dead_rows(net, "0")
    assert bool((second & first).eq(first).all()) and int(second.sum()) == 8 + 4
    small = pb.shrink(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)


def test_uncoupled_use_is_refused_and_the_model_untouched() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 2)
    )
    before = copy.deepcopy(net.state_dict())
    for method in ("neuron_group", "filter_group"):
        with pytest.raises(ValueError, match="pass coupled=True"):
            pb.prune(net, method, 0.5)
    assert not pb.is_pruned(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
