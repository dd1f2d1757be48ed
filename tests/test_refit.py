"""`refit`: least-squares refit of a pruned model's surviving weights towards the original.

Checked against closed-form least squares (torch.linalg.lstsq) for structured and unstructured
masks, masks and `shrink` preserved, the output error reduced, and refusals that leave both
models untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import with_bn_stats
from torch import nn

import prunebound as pb

pytest.importorskip("torch_pruning")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def test_structured_refit_is_the_least_squares_fit_of_the_original_outputs() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    x = torch.randn(50, 6, dtype=torch.float64)
    net = copy.deepcopy(dense)
    pb.prune(net, "neuron_group", 3 / 8, coupled=True, example_inputs=x)
    dead = (~pb.masks(net)["0"]).all(1)
    pb.refit(net, dense, x, damp=0.0)
    # the first layer sees the same inputs in both models: its survivors fit exactly as they were
    torch.testing.assert_close(net[0].weight[~dead], dense[0].weight[~dead])
    torch.testing.assert_close(net[0].bias[~dead], dense[0].bias[~dead])
    assert bool((net[0].weight[dead] == 0).all()) and bool((net[0].bias[dead] == 0).all())
    # the consumer: the surviving columns and the bias, fitted to the original's outputs
    with torch.no_grad():
        h = torch.relu(dense[0](x))
        target = dense(x)
    design = torch.cat([h[:, ~dead], torch.ones(50, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, target).solution.t()
    torch.testing.assert_close(net[2].weight[:, ~dead], sol[:, :-1])
    torch.testing.assert_close(net[2].bias, sol[:, -1])
    # columns reading removed units see only zeros: the fit leaves them at zero
    assert "2" not in pb.masks(net) and bool((net[2].weight[:, dead] == 0).all())


def test_unstructured_rows_are_each_the_least_squares_fit() -> None:
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(10, 12)).double()
    x = torch.randn(40, 10, dtype=torch.float64)
    net = copy.deepcopy(dense)
    pb.prune(net, "magnitude", 0.5, layers=["0"])
    keep = pb.masks(net)["0"]
    stored = pb.original_weight(net[0]).detach().clone()
    pb.refit(net, dense, x, damp=0.0)
    with torch.no_grad():
        y = dense(x)
    assert len(torch.unique(keep, dim=0)) > 8  # many row masks: conjugate gradients
    for row in range(12):
        design = torch.cat([x[:, keep[row]], torch.ones(40, 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(design, y[:, row : row + 1]).solution.flatten()
        torch.testing.assert_close(net[0].weight[row, keep[row]], sol[:-1])
        torch.testing.assert_close(net[0].bias[row], sol[-1])
    assert torch.equal(pb.masks(net)["0"], keep) and bool((net[0].weight[~keep] == 0).all())
    # pruned entries keep their stored values: `reset` revives them
    torch.testing.assert_close(pb.original_weight(net[0])[~keep], stored[~keep])
    assert pb.masks(net)["0"].sum() == 60


def test_cnn_refit_keeps_whole_units_removable_and_closes_the_gap() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 1, 12, 12)
    dense = with_bn_stats(pb.models.resnet_small(), x)
    net = copy.deepcopy(dense)
    pb.prune(net, "filter_group", 0.5, coupled=True, example_inputs=x)
    before_masks = pb.masks(net)
    with torch.no_grad():
        gap_before = float((net(x) - dense(x)).square().mean())
    pb.refit(net, dense, x)
    after = pb.masks(net)
    assert before_masks.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in before_masks.items())
    with torch.no_grad():
        gap_after = float((net(x) - dense(x)).square().mean())
        small = pb.shrink(net, x)
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-5)
    assert gap_after < 0.5 * gap_before
    assert "0" in pb.masks(net) and pb.is_pruned(net)


def test_bad_input_is_refused_and_both_models_untouched() -> None:
    torch.manual_seed(3)
    x = torch.randn(16, 1, 12, 12)
    dense = with_bn_stats(pb.models.vgg_small(batch_norm=True, image_size=12), x)
    net = copy.deepcopy(dense)
    pb.prune(net, "filter_group", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    keep_net, keep_dense, keep_small = _state(net), _state(dense), _state(small)
    with pytest.raises(ValueError, match=r"reference must be the model before pruning: layer '0'"):
        pb.refit(small, dense, x)  # a shrunk model against its dense original
    with pytest.raises(TypeError, match=r"separate nn\.Module"):
        pb.refit(net, net, x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pb.refit(net, dense, bad)
    with pytest.raises(ValueError, match="input channels"):
        pb.refit(net, dense, torch.randn(4, 3, 12, 12))
    with pytest.raises(ValueError, match="damp must be >= 0"):
        pb.refit(net, dense, x, damp=-1.0)
    with pytest.raises(ValueError, match="matches no"):
        pb.refit(net, dense, x, layers=["nope"])
    assert _same(keep_net, _state(net)) and _same(keep_dense, _state(dense))
    assert _same(keep_small, _state(small))
    dense.train()
    pb.refit(net, dense, x)  # modes are restored
    assert dense.training and not _same(keep_net, _state(net)) and _same(keep_dense, _state(dense))


def test_shared_and_unfittable_layers() -> None:
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"layers \[.0.\] run more than once"):
        pb.refit(shared, copy.deepcopy(shared), x)
    with pytest.raises(ValueError, match=r"method 'obs': layers \['0'\] run more than once"):
        pb.prune(shared, "obs", 0.5, data=x)  # the OBS reconstruction has the same limit
    assert not pb.is_pruned(shared)
    depthwise = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten())
    xs = torch.randn(8, 2, 5, 5)
    with pytest.warns(UserWarning, match=r"refit leaves \['1'\]"):
        pb.refit(depthwise, copy.deepcopy(depthwise), xs)
    with pytest.raises(ValueError, match="layer '1'"):
        pb.refit(depthwise, copy.deepcopy(depthwise), xs, layers=["1"])


def test_a_singular_undamped_fit_is_refused() -> None:
    dense = nn.Sequential(nn.Linear(2, 3))
    x = torch.ones(5, 2)  # both inputs and the bias see the same column: X^T X is singular
    net = copy.deepcopy(dense)
    with pytest.raises(ValueError, match=r"layer '0'.*singular; pass damp > 0"):
        pb.refit(net, dense, x, damp=0.0)
    assert _same(_state(net), _state(dense))
    pb.refit(net, dense, x)  # damped: fine


def test_a_refitted_model_is_certified_against_the_original_only_when_told() -> None:
    torch.manual_seed(4)
    dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(50, 6)
    net = copy.deepcopy(dense)
    pb.prune(net, "magnitude", 0.5)
    pb.refit(net, dense, x)
    alone = pb.theory.certify(net, radius=1.0)
    # reset(net) revives the refitted weights, not the original: the certificate says so
    assert "were trained after pruning" in str(alone)
    against = pb.theory.certify(net, radius=1.0, reference=dense)
    with torch.no_grad():
        u = torch.randn(256, 6)
        u = u / u.norm(dim=1, keepdim=True)
        gap = float((net(u) - dense(u)).norm(dim=1).max())
    assert gap <= against.bound
