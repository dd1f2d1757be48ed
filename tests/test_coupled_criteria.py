"""Data-aware structured criteria: group Taylor importance ("filter_taylor", "neuron_taylor").

Scores against hand computations (parameter gradients by autograd), exact counts, whole units
masked, residual groups pruned together, refusals leaving the model untouched, and `shrink`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import conv_bn_flatten_net, with_bn_stats
from torch import nn

import prunebound as pb
from prunebound.coupled_prune import prune_coupled, unit_taylor
from prunebound.coupling import unit_groups

pytest.importorskip("torch_pruning")


def _data(shape: tuple[int, ...], n: int = 12, classes: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def _param_taylor(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """p * dL/dp for every parameter (L the summed cross-entropy, eval mode), by autograd."""
    model = copy.deepcopy(model).eval()
    loss = F.cross_entropy(model(x), y, reduction="sum")
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params)
    return {n: (p * g).detach().double() for n, p, g in zip(names, params, grads, strict=True)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _dead_rows(model: nn.Module, name: str) -> torch.Tensor:
    return (~pb.masks(model)[name]).flatten(1).all(1)


def test_mlp_unit_score_is_the_hand_computed_group_taylor() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = _data((5,))
    pt = _param_taylor(net, x, y)
    want = (pt["0.weight"].sum(1) + pt["0.bias"]).abs()  # weight row and bias of each neuron
    groups = unit_groups(net, x)
    (score,) = unit_taylor(net, [g for g in groups if "0" in g.producers], (x, y), "t")
    torch.testing.assert_close(score, want)
    # the lowest two are pruned, whole (weight row and bias)
    pb.prune(net, "neuron_taylor", 2 / 6, coupled=True, example_inputs=x, data=(x, y))
    dead = _dead_rows(net, "0")
    assert sorted(dead.nonzero().flatten().tolist()) == sorted(want.argsort()[:2].tolist())
    assert bool((net[0].bias[dead] == 0).all()) and bool((net[0].bias[~dead] != 0).all())


def test_conv_bn_unit_score_sums_weights_bias_and_batchnorm() -> None:
    torch.manual_seed(1)
    net = conv_bn_flatten_net()
    x, y = _data((2, 6, 6))
    net = with_bn_stats(net, x)
    pt = _param_taylor(net, x, y)
    want = (pt["0.weight"].flatten(1).sum(1) + pt["0.bias"] + pt["1.weight"] + pt["1.bias"]).abs()
    groups = [g for g in unit_groups(net, x) if "0" in g.producers]
    assert list(groups[0].norms) == ["1"]
    torch.testing.assert_close(unit_taylor(net, groups, (x, y), "t")[0], want)
    # a batched DataLoader-style iterable gives the same sums
    split = [(x[:5], y[:5]), (x[5:], y[5:])]
    torch.testing.assert_close(unit_taylor(net, groups, split, "t")[0], want)


def test_uncoupled_row_score_is_the_weight_row_taylor() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = _data((5,))
    want = _param_taylor(net, x, y)["0.weight"].sum(1).abs()  # only the row is masked here
    pb.prune(net, "neuron_taylor", 0.5, data=(x, y))
    assert sorted(_dead_rows(net, "0").nonzero().flatten().tolist()) == sorted(
        want.argsort()[:3].tolist()
    )
    assert "2" not in pb.masks(net)  # the output layer is left alone


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.7])
def test_exact_counts_whole_units_and_shrink(amount: float) -> None:
    torch.manual_seed(0)
    x, y = _data((1, 12, 12), n=16, classes=10)
    net = with_bn_stats(pb.models.vgg_small(batch_norm=True, image_size=12), x)
    pb.prune(net, "filter_taylor", amount, coupled=True, example_inputs=x, data=(x, y))
    mods = dict(net.named_modules())
    for g in unit_groups(net, x):
        if isinstance(mods[next(iter(g.producers))], nn.Linear):
            continue  # the output layer
        (name,) = g.producers
        dead = _dead_rows(net, name)
        assert int(dead.sum()) == round(amount * g.size)
        (bn,) = g.norms
        for t in (mods[bn].weight, mods[bn].bias):  # BatchNorm entries masked with the rows
            assert bool((t[dead] == 0).all()) and bool((t[~dead] != 0).all())
    small = pb.shrink(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_residual_group_is_scored_and_pruned_together() -> None:
    torch.manual_seed(3)
    x, y = _data((1, 12, 12), n=16, classes=10)
    net = with_bn_stats(pb.models.resnet_small(), x)
    groups = unit_groups(net, x)
    stream = next(g for g in groups if "0" in g.producers)
    pt = _param_taylor(net, x, y)
    want = torch.zeros(stream.size, dtype=torch.float64)
    for n, per in (*stream.producers.items(), *stream.norms.items()):
        for kind in ("weight", "bias"):
            if (t := pt.get(f"{n}.{kind}")) is not None:
                want += t.reshape(t.shape[0], -1).sum(1)[list(per)]
    torch.testing.assert_close(unit_taylor(net, [stream], (x, y), "t")[0], want.abs())
    pb.prune(net, "filter_taylor", 0.5, coupled=True, example_inputs=x, data=(x, y))
    dead = {n: _dead_rows(net, n)[list(per)] for n, per in stream.producers.items()}
    first = dead.pop("0")
    assert int(first.sum()) == round(0.5 * stream.size)
    assert all(torch.equal(d, first) for d in dead.values())  # channel j of every producer
    assert sorted(first.nonzero().flatten().tolist()) == sorted(
        want.abs().argsort()[: int(first.sum())].tolist()
    )
    small = pb.shrink(net, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)


def test_missing_or_bad_data_is_refused_and_the_model_untouched() -> None:
    x, y = _data((1, 12, 12), n=8, classes=10)
    net = with_bn_stats(pb.models.resnet_small(), x)
    before = _state(net)
    with pytest.raises(ValueError, match="method 'filter_taylor' needs calibration data"):
        pb.prune(net, "filter_taylor", 0.5, coupled=True, example_inputs=x)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    meth = pb.METHODS["filter_taylor"]
    with pytest.raises(ValueError, match="method 'filter_taylor' needs calibration data"):
        prune_coupled(net, meth, 0.5, convs, scope="layer", seed=0, example_inputs=x)
    with pytest.raises(ValueError, match="calibration labels must be integer"):
        pb.prune(net, "filter_taylor", 0.5, coupled=True, example_inputs=x, data=(x, y.float()))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration loss is nan"):
        pb.prune(net, "filter_taylor", 0.5, coupled=True, example_inputs=x, data=(bad, y))
    with pytest.raises(ValueError, match="method 'neuron_taylor' needs calibration data"):
        pb.prune(net, "neuron_taylor", 0.5, layers=["8"])
    other = pb.methods.Method("rows", scores=lambda w: w.flatten(1).sum(1), unit="row",
                              needs=("grad",))  # fmt: skip
    with pytest.raises(ValueError, match=r"unit Taylor methods.*got 'rows'"):
        pb.prune(net, other, 0.5, coupled=True, example_inputs=x, data=(x, y))
    after = net.state_dict()
    assert not pb.is_pruned(net) and before.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_counts_per_group_match_a_given_number_of_channels() -> None:
    x, y = _data((1, 12, 12), n=8, classes=10)
    net = with_bn_stats(pb.models.resnet_small(), x)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    meth = pb.METHODS["filter_taylor"]
    with pytest.raises(ValueError, match=r"one integer in \[0, 16\]"):
        prune_coupled(net, meth, 0.5, convs, scope="layer", seed=0, example_inputs=x,
                      data=(x, y), counts={"0": 17})  # fmt: skip
    assert not pb.is_pruned(net)
    prune_coupled(net, meth, 0.5, convs, scope="layer", seed=0, example_inputs=x,
                  data=(x, y), counts={"3.conv2": 11})  # fmt: skip
    assert int(_dead_rows(net, "0").sum()) == 11  # the stream group, named by a producer
    assert int(_dead_rows(net, "3.conv1").sum()) == 8  # others: round(0.5 * 16)


def test_pruning_again_prunes_among_survivors() -> None:
    x, y = _data((1, 12, 12), n=8, classes=10)
    net = with_bn_stats(pb.models.resnet_small(), x)
    pb.prune(net, "filter_taylor", 0.5, coupled=True, example_inputs=x, data=(x, y))
    first = _dead_rows(net, "0")
    pb.prune(net, "filter_taylor", 0.5, coupled=True, example_inputs=x, data=(x, y))
    second = _dead_rows(net, "0")
    assert bool((second & first).eq(first).all()) and int(second.sum()) == 8 + 4
