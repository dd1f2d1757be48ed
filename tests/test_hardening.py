"""Numerical failures stop cleanly; half precision and dtype moves work; bad inputs are refused."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_experiment
from torch import nn

import prunebound as pb
from prunebound.theory import certify, plan
from prunebound.training.config import Experiment
from prunebound.training.experiment import run
from prunebound.training.loop import NonFiniteError, TrainConfig, train
from prunebound.training.resume import CHECKPOINT, read_checkpoint
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule


def _experiment(out: Path, **schedule: object) -> Experiment:
    return tiny_experiment(out, seed=1, **schedule)


# --- NaN / Inf ------------------------------------------------------------------------------


def test_diverging_retraining_names_round_and_epoch_and_keeps_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    exp = _experiment(tmp_path / "a", retrain_lr_scale=1e30)
    with pytest.raises(NonFiniteError) as info:
        run(exp, write_plots=False)
    e = info.value
    assert (e.round, e.epoch) == (1, 1)
    msg = str(e)
    assert "training loss became" in msg and "round 1, epoch 1 (step " in msg
    assert f"last good checkpoint is kept: {tmp_path / 'a' / CHECKPOINT}" in msg
    model = pb.models.mlp((64, 16, 10))
    progress, _ = read_checkpoint(tmp_path / "a" / CHECKPOINT, model, exp)
    assert progress.round_done and progress.round == 0  # the dense round end, before pruning
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not pb.is_pruned(model)
    assert not (tmp_path / "a" / "results.json").exists()


def test_injected_nan_in_dense_training_names_round_0(tmp_path: Path) -> None:
    data = pb.data.load_dataset("digits").flat().subsample(64, 32, seed=0)
    x = data.x_train.clone()
    x[40, 3] = math.nan  # second batch of the first epoch (shuffled) holds it somewhere
    bad = replace(data, x_train=x)
    model = pb.models.mlp((64, 8, 10))
    with pytest.raises(NonFiniteError, match=r"round 0 \(dense training\), epoch 1 \(step \d\)"):
        run_schedule(
            model, bad, TrainConfig(epochs=1, batch_size=16), Schedule(rounds=1),
            seed=torch.Generator().manual_seed(0),
        )  # fmt: skip


class _Unused(nn.Module):
    """A weight outside the forward pass: the loss stays finite even when it is not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.spare = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def test_non_finite_weight_at_epoch_end_is_caught_before_any_checkpoint() -> None:
    data = pb.data.load_dataset("digits").flat().subsample(64, 32, seed=0)
    model = _Unused()
    with torch.no_grad():
        model.spare.fill_(math.inf)
    seen: list[int] = []
    with pytest.raises(
        NonFiniteError, match=r"parameter 'spare' became NaN or infinite in epoch 1"
    ):
        train(model, data, TrainConfig(epochs=2), on_epoch=lambda s: seen.append(s.epoch))
    assert seen == []


def test_nan_weights_refused_before_pruning_model_untouched() -> None:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[1, 2] = math.nan
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="layer '': weight contains NaN or Inf; refusing to prune"):
        pb.prune(layer, "magnitude", 0.5)
    assert not pb.is_pruned(layer)
    assert torch.equal(layer.weight.isnan(), before.isnan())


@pytest.mark.parametrize(
    ("key", "value"),
    [("eps", math.nan), ("eps", math.inf), ("delta", math.nan), ("radius", math.inf)],
)
def test_plans_refuse_non_finite_inputs(key: str, value: float) -> None:
    args = {"eps": 0.1, "delta": 0.01, "radius": 1.0, key: value}
    with pytest.raises(ValueError, match=f"^{key} must be"):
        plan([8, 6, 3], **args)  # type: ignore[arg-type]


def test_certificates_refuse_non_finite_inputs() -> None:
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="radius"):
        certify(net, radius=math.nan)
    with torch.no_grad():
        net[2].weight[0, 0] = math.inf
    with pytest.raises(ValueError, match="must be finite"):
        certify(net, radius=1.0)


# --- dtypes and devices ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["magnitude", "random", "neuron"])
def test_half_precision_weights_prune_exactly(dtype: torch.dtype, method: str) -> None:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 5)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pb.prune(net, method, 0.5, seed=1)
    for name, keep in pb.masks(net).items():
        w = pb.original_weight(net.get_submodule(name))
        assert keep.dtype == torch.bool and keep.device == w.device and w.dtype == dtype
        if method == "neuron":
            assert int((~keep.any(1)).sum()) == round(0.5 * w.shape[0])
        else:
            assert int((~keep).sum()) == round(0.5 * w.numel())
        if method == "magnitude":  # the pruned are the smallest |w| (compared in float64)
            a = w.detach().double().abs()
            assert a[~keep].max() <= a[keep].min()
    assert net(torch.randn(3, 20).to(dtype)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_model_moved_with_to_after_pruning_keeps_masks(dtype: torch.dtype) -> None:
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    pb.prune(net, "magnitude", 0.6)
    before = {k: v.clone() for k, v in pb.masks(net).items()}
    net.to(dtype)
    for name, keep in pb.masks(net).items():
        layer = net.get_submodule(name)
        assert keep.dtype == torch.bool and torch.equal(keep, before[name])
        assert layer.weight.dtype == dtype and keep.device == layer.weight.device
        assert bool((layer.weight[~keep] == 0).all())
    x = torch.randn(2, 10).to(dtype)
    ref = net[2](net[1](nn.functional.linear(x, net[0].weight, net[0].bias)))
    assert torch.equal(net(x), ref)
    pb.prune(net, "magnitude", 0.5)  # pruning again in the new dtype composes
    assert all(not (pb.masks(net)[k] & ~before[k]).any() for k in before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_certify_in_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 3)
    half = pb.prune(net.to(dtype), "magnitude", 0.5)
    wide = copy.deepcopy(half).double()  # the same values (exact in float64), the same masks
    assert all(torch.equal(v, pb.masks(half)[k]) for k, v in pb.masks(wide).items())
    cert = certify(half, radius=1.0)
    ref = certify(wide, radius=1.0)
    assert math.isfinite(cert.bound) and cert.bound > 0
    assert cert.bound == pytest.approx(ref.bound, rel=1e-12)  # computed in float64 either way
    for term, layer in zip(cert.layers, (half[0], half[2]), strict=True):
        w = pb.original_weight(layer).detach().double()
        exact = float(torch.linalg.matrix_norm(w, 2))
        assert exact <= term.norm_w <= exact * (1 + 1e-9)


def test_masks_follow_the_model_to_another_device() -> None:
    """No GPU here: the meta device stands in for one (a device move, no data). Masks are
    buffers of the parametrization, so `.to(device)` moves them with the weights."""
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    pb.prune(net, "magnitude", 0.6)
    net.to("meta")
    for name, keep in pb.masks(net).items():
        layer = net.get_submodule(name)
        assert keep.device.type == "meta" and keep.dtype == torch.bool
        assert layer.weight.device.type == "meta"
    out = net(torch.empty(2, 10, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)
