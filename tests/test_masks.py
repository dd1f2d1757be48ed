"""Mask mechanics: parametrization, gradients, optimizers, remove/reset, sparsity and FLOPs."""

from __future__ import annotations

import pytest
import torch
from helpers import make_cnn, make_mlp
from torch import nn

import prunebound as pb


def test_forward_equals_hand_masked_weights_and_param_identity(mlp: nn.Sequential) -> None:
    params_before = {id(p) for p in mlp.parameters()}
    pb.prune(mlp, "magnitude", 0.6)
    assert {id(p) for p in mlp.parameters()} == params_before  # optimizers stay valid
    x = torch.randn(5, 12)
    ref = make_mlp()
    with torch.no_grad():
        for name, m in pb.prunable_layers(ref).items():
            m.weight.mul_(pb.masks(mlp)[name])
    torch.testing.assert_close(mlp(x), ref(x), rtol=0, atol=0)


def test_mask_is_one_byte_per_weight(mlp: nn.Sequential) -> None:
    pb.prune(mlp, "magnitude", 0.5)
    for keep in pb.masks(mlp).values():
        assert keep.dtype == torch.bool
        assert keep.element_size() == 1


def test_gradients_zero_at_pruned_entries(mlp: nn.Sequential) -> None:
    pb.prune(mlp, "random", 0.5, seed=0)
    mlp(torch.randn(8, 12)).sum().backward()
    for name, m in pb.prunable_layers(mlp).items():
        grad = pb.original_weight(m).grad
        assert grad is not None
        assert torch.all(grad[~pb.masks(mlp)[name]] == 0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd_momentum", "adam", "adamw_decay"],
)
def test_pruned_weights_stay_zero_through_training(make_opt) -> None:  # type: ignore[no-untyped-def]
    model = make_cnn()
    opt = make_opt(model.parameters())  # built BEFORE pruning: identity is preserved
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(3):  # momentum / Adam state exists before pruning
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pb.prune(model, "magnitude", 0.7)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name, m in pb.prunable_layers(model).items():
        keep = pb.masks(model)[name]
        assert torch.all(m.weight[~keep] == 0)
        assert int((m.weight != 0).sum()) <= int(keep.sum())


def test_remove_bakes_and_reset_revives(mlp: nn.Sequential) -> None:
    x = torch.randn(4, 12)
    dense_out = mlp(x)
    pb.prune(mlp, "magnitude", 0.5)
    pruned_out = mlp(x)
    baked = pb.remove(make_mlp())  # no masks: no-op
    assert not pb.is_pruned(baked)
    pb.remove(mlp)
    assert not pb.is_pruned(mlp)
    torch.testing.assert_close(mlp(x), pruned_out, rtol=0, atol=0)
    assert pb.sparsity(mlp).sparsity == pytest.approx(0.5, abs=0.01)
    again = make_mlp()
    pb.prune(again, "magnitude", 0.5)
    pb.reset(again)
    torch.testing.assert_close(again(x), dense_out, rtol=0, atol=0)


def test_sparsity_report_counts_and_flops(cnn: nn.Sequential) -> None:
    pb.prune(cnn, "magnitude", 0.5)
    rep = pb.sparsity(cnn, input_shape=(1, 8, 8))
    by = {r.name: r for r in rep.layers}
    assert by["0"].total == 36
    assert by["0"].zeros == 18
    assert by["2"].total == 216
    assert by["2"].zeros == 108
    assert by["5"].total == 270
    assert by["5"].zeros == 135
    assert rep.total == 522
    assert rep.zeros == 261
    assert rep.compression == pytest.approx(2.0)
    # conv0: 8x8 outputs; conv2: stride 2, no padding -> 3x3; linear: 1 position
    assert by["0"].dense_flops == 2 * 36 * 64
    assert by["0"].sparse_flops == 2 * 18 * 64
    assert by["2"].dense_flops == 2 * 216 * 9
    assert by["5"].dense_flops == 2 * 270
    assert rep.dense_flops == 2 * (36 * 64 + 216 * 9 + 270)
    assert rep.sparse_flops * 2 == rep.dense_flops
    params = sum(p.numel() for p in cnn.parameters())
    assert rep.model_params == params
    assert rep.model_nonzero == params - 261
    assert pb.sparsity(cnn).dense_flops is None
    assert rep.to_dict()["layers"][0]["name"] == "0"


def test_model_moved_after_pruning_keeps_working(mlp: nn.Sequential) -> None:
    pb.prune(mlp, "magnitude", 0.5)
    mlp.to(torch.float64)
    out = mlp(torch.randn(3, 12, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert all(v.dtype == torch.bool for v in pb.masks(mlp).values())


def test_deep_copies_are_independent_through_reset_and_remove(mlp: nn.Sequential) -> None:
    import copy

    pb.prune(mlp, "magnitude", 0.5)
    x = torch.randn(3, 12)
    out = mlp(x)
    twin = copy.deepcopy(mlp)
    pb.reset(twin)  # must not break the original (shared parametrized class)
    torch.testing.assert_close(mlp(x), out, rtol=0, atol=0)
    torch.testing.assert_close(twin(x), make_mlp()(x), rtol=0, atol=0)
    other = copy.deepcopy(mlp)
    pb.remove(mlp)
    torch.testing.assert_close(other(x), out, rtol=0, atol=0)
    assert pb.is_pruned(other)
    assert type(mlp[0]) is nn.Linear
