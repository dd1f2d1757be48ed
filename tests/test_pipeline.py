"""Training loops and schedules on the bundled digits."""

from __future__ import annotations

import pytest
import torch

import prunebound as pb
from prunebound.data import load_digits
from prunebound.models import build_model
from prunebound.pipeline import TrainConfig, evaluate, train
from prunebound.schedule import Schedule, run_schedule

DENSE = TrainConfig(epochs=20, batch_size=32, lr=2e-3)


@pytest.fixture(scope="module")
def digits() -> pb.data.Dataset:
    return load_digits(seed=0)


def test_end_to_end_dense_90_and_sparse_88(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    sched = Schedule(kind="iterative", target_sparsity=0.9, rounds=5, retrain_epochs=4)
    rounds = run_schedule(model, digits, DENSE, sched, generator=torch.Generator().manual_seed(0))
    assert rounds[0].sparsity == 0.0
    assert rounds[0].accuracy >= 0.90, rounds[0]
    assert rounds[-1].sparsity == pytest.approx(0.9, abs=1e-3)
    assert rounds[-1].accuracy >= 0.88, rounds[-1]
    assert pb.sparsity(model).sparsity == pytest.approx(0.9, abs=1e-3)


def test_iterative_sparsity_is_count_exact(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    sched = Schedule(target_sparsity=0.75, rounds=3, retrain_epochs=0)
    run_schedule(model, digits, TrainConfig(epochs=0), sched, generator=torch.Generator())
    rate = sched.per_round
    for layer in pb.sparsity(model).layers:
        alive = layer.total
        for _ in range(3):
            alive -= round(rate * alive)
        assert layer.total - layer.zeros == alive


def test_lottery_rewinds_survivors_to_init_and_keeps_masks(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=1, in_features=64)
    init = pb.snapshot(model)
    sched = Schedule(kind="lottery", target_sparsity=0.5, rounds=1, retrain_epochs=0)
    run_schedule(model, digits, TrainConfig(epochs=2), sched, generator=torch.Generator())
    for name, m in pb.prunable_layers(model).items():
        assert torch.equal(pb.original_weight(m), init[f"{name}.weight"])  # rewound, 0 retrain
    assert pb.sparsity(model).sparsity == pytest.approx(0.5, abs=1e-3)


def test_lottery_rewind_epoch_beyond_training_is_refused(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=1, in_features=64)
    sched = Schedule(kind="lottery", rounds=1, rewind_epoch=5)
    with pytest.raises(ValueError, match="rewind_epoch=5 exceeds"):
        run_schedule(model, digits, TrainConfig(epochs=2), sched, generator=torch.Generator())


def test_last_layer_scale_keeps_output_denser(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    sched = Schedule(
        target_sparsity=0.9, rounds=2, retrain_epochs=0, scope="global", last_layer_scale=0.5
    )
    run_schedule(model, digits, TrainConfig(epochs=0), sched, generator=torch.Generator())
    last = pb.sparsity(model).layers[-1]
    rate = sched.per_round * 0.5
    alive = last.total
    for _ in range(2):
        alive -= round(rate * alive)
    assert last.total - last.zeros == alive  # about 57% sparse, vs 90% elsewhere
    assert pb.sparsity(model).sparsity > 0.89


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_pruned_weights_stay_zero_while_training(digits: pb.data.Dataset, opt: str) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    pb.prune(model, "magnitude", 0.8)
    train(model, digits, TrainConfig(epochs=1, optimizer=opt, weight_decay=0.1, lr=0.01))
    for name, m in pb.prunable_layers(model).items():
        assert torch.all(m.weight[~pb.masks(model)[name]] == 0)


def test_same_seed_same_masks_and_metrics(digits: pb.data.Dataset) -> None:
    outs = []
    for _ in range(2):
        model = build_model("lenet_300_100", seed=3, in_features=64)
        sched = Schedule(method="random", target_sparsity=0.5, rounds=2, retrain_epochs=1)
        rounds = run_schedule(
            model, digits, TrainConfig(epochs=1), sched, generator=torch.Generator().manual_seed(3)
        )
        outs.append(([r.accuracy for r in rounds], [r.loss for r in rounds], pb.masks(model)))
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    for k, v in outs[0][2].items():
        assert torch.equal(v, outs[1][2][k])


def test_evaluate_restores_mode_and_counts(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    model.train()
    ev = evaluate(model, digits)
    assert model.training
    assert 0.0 <= ev.accuracy <= 0.3  # untrained: about chance


def test_nan_loss_stops_with_clear_error(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    with pytest.raises(RuntimeError, match="training loss became"):
        train(model, digits, TrainConfig(epochs=1, lr=1e30, optimizer="sgd"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "train.epochs"),
        ({"optimizer": "rmsprop"}, "train.optimizer"),
        ({"lr": float("nan")}, "train.lr"),
        ({"lr_schedule": "linear"}, "train.lr_schedule"),
    ],
)
def test_train_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "gradual"}, "schedule.kind"),
        ({"method": "smallest"}, "schedule.method"),
        ({"target_sparsity": 1.0}, "schedule.target_sparsity"),
        ({"rounds": 0}, "schedule.rounds"),
    ],
)
def test_schedule_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_explicit_steps_hit_each_sparsity(digits: pb.data.Dataset) -> None:
    model = build_model("lenet_300_100", seed=0, in_features=64)
    sched = Schedule(steps=(0.5, 0.8, 0.95), retrain_epochs=0)
    assert sched.rounds == 3 and sched.target_sparsity == 0.95
    rounds = run_schedule(model, digits, TrainConfig(epochs=0), sched, generator=torch.Generator())
    assert [round(r.sparsity, 3) for r in rounds] == [0.0, 0.5, 0.8, 0.95]
    with pytest.raises(ValueError, match="schedule.steps"):
        Schedule(steps=(0.5, 0.4))
