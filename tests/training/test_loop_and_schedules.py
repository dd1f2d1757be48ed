"""Training loops and schedules on the bundled digits (training.loop, .schedule, .runner)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import prunebound as pb
from prunebound.data import load_digits
from prunebound.models import build_model
from prunebound.training.loop import TrainConfig, evaluate, train
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule, prune_round, retrain_config

DENSE = TrainConfig(epochs=20, batch_size=32, lr=2e-3)


@pytest.fixture(scope="module")
def digits() -> pb.data.Dataset:
    return load_digits(seed=0)


def _attr(m: torch.nn.Module, name: str) -> torch.Tensor:
    """A tensor attribute of a layer (`weight` is the masked, effective weight), typed."""
    t = getattr(m, name)
    assert isinstance(t, torch.Tensor)
    return t


def _lenet(seed: int = 0) -> torch.nn.Module:
    return build_model("lenet_300_100", seed=seed, in_features=64)


def test_end_to_end_dense_90_and_sparse_88(digits: pb.data.Dataset) -> None:
    model = _lenet()
    sched = Schedule(kind="iterative", target_sparsity=0.9, rounds=5, retrain_epochs=4)
    rounds = run_schedule(model, digits, DENSE, sched, seed=torch.Generator().manual_seed(0))
    assert rounds[0].sparsity == 0.0
    assert rounds[0].accuracy >= 0.90, rounds[0]
    assert rounds[-1].sparsity == pytest.approx(0.9, abs=1e-3)
    assert rounds[-1].accuracy >= 0.88, rounds[-1]
    assert [r.round for r in rounds] == list(range(6))
    assert all(b.sparsity > a.sparsity for a, b in itertools.pairwise(rounds))


@pytest.mark.parametrize(
    ("target", "rounds", "scope"), [(0.75, 3, "layer"), (0.9, 7, "layer"), (0.9, 4, "global")]
)
def test_iterative_reaches_target_count_exact(
    digits: pb.data.Dataset, target: float, rounds: int, scope: str
) -> None:
    model = _lenet()
    sched = Schedule(target_sparsity=target, rounds=rounds, retrain_epochs=0, scope=scope)  # type: ignore[arg-type]
    run_schedule(model, digits, TrainConfig(epochs=0), sched, seed=torch.Generator())
    sp = pb.sparsity(model)
    if scope == "layer":
        for layer in sp.layers:
            assert layer.zeros == round(target * layer.total), layer
    assert sp.zeros == round(target * sp.total) or scope == "layer"
    assert abs(sp.zeros - target * sp.total) <= len(sp.layers)


def test_round_targets_are_cumulative_and_exact(digits: pb.data.Dataset) -> None:
    model = _lenet()
    sched = Schedule(target_sparsity=0.8, rounds=4, retrain_epochs=0)
    g = torch.Generator()
    for r in range(1, 5):
        prune_round(model, sched, g, r)
        s = 1 - 0.2 ** (r / 4)
        for layer in pb.sparsity(model).layers:
            assert layer.zeros == round(s * layer.total)


def test_given_amount_derives_rounds_and_stops_at_target() -> None:
    sched = Schedule(target_sparsity=0.9, amount=0.5)
    # 1 - 0.5^3 = 0.875 < 0.9 <= 1 - 0.5^4: four rounds, the last one clipped to the target
    assert sched.rounds == 4
    assert sched.steps == pytest.approx((0.5, 0.75, 0.875, 0.9))
    assert sched.rate(1) == pytest.approx(0.5) and sched.rate(4) == pytest.approx(0.2)
    assert Schedule(kind="oneshot", target_sparsity=0.6, rounds=7).steps == (0.6,)
    default = Schedule(target_sparsity=0.99, rounds=2)
    assert default.steps == pytest.approx((0.9, 0.99))
    assert [default.rate(r) for r in (1, 2)] == pytest.approx([0.9, 0.9])


def test_lottery_rewinds_survivors_to_init_and_keeps_masks(digits: pb.data.Dataset) -> None:
    model = _lenet(seed=1)
    init = pb.snapshot(model)
    sched = Schedule(kind="lottery", target_sparsity=0.5, rounds=1, retrain_epochs=0)
    run_schedule(model, digits, TrainConfig(epochs=2), sched, seed=torch.Generator())
    masks = pb.masks(model)
    for name, m in pb.prunable_layers(model).items():
        assert torch.equal(pb.original_weight(m), init[f"{name}.weight"])  # rewound, 0 retrain
        assert torch.equal(
            _attr(m, "weight"), init[f"{name}.weight"] * masks[name]
        )  # masks persist
        assert torch.equal(_attr(m, "bias"), init[f"{name}.bias"])
    assert pb.sparsity(model).sparsity == pytest.approx(0.5, abs=1e-3)


def test_lottery_rewind_to_epoch_k(digits: pb.data.Dataset) -> None:
    """rewind_epoch=1 restores the weights after dense epoch 1, not the init or the end."""
    seen: dict[str, torch.Tensor] = {}

    def grab(epoch: int, m: torch.nn.Module) -> None:
        if epoch == 1:
            seen.update(pb.snapshot(m))

    ref = _lenet(seed=2)
    train(
        ref,
        digits,
        TrainConfig(epochs=3),
        seed=torch.Generator().manual_seed(5),
        callback=grab,
    )
    model = _lenet(seed=2)
    sched = Schedule(
        kind="lottery", target_sparsity=0.6, rounds=2, retrain_epochs=0, rewind_epoch=1
    )
    run_schedule(model, digits, TrainConfig(epochs=3), sched, seed=torch.Generator().manual_seed(5))
    for name, m in pb.prunable_layers(model).items():
        assert torch.equal(pb.original_weight(m), seen[f"{name}.weight"])
    first = next(iter(pb.prunable_layers(model)))
    final = _attr(pb.prunable_layers(ref)[first], "weight")
    assert not torch.equal(pb.original_weight(pb.prunable_layers(model)[first]), final)


def test_lottery_rewind_to_iteration_k(digits: pb.data.Dataset) -> None:
    """rewind_step=k restores the weights after k optimizer steps of the dense run, mid-epoch."""
    seen: dict[str, torch.Tensor] = {}
    k = 7  # mid-epoch 1 (the digits fixture has more than 7 batches of 64 per epoch)

    def grab(step: int, m: torch.nn.Module) -> None:
        if step == k:
            seen.update(pb.snapshot(m))

    cfg = TrainConfig(epochs=2)
    ref = _lenet(seed=2)
    train(ref, digits, cfg, seed=torch.Generator().manual_seed(5), on_step=grab)
    after_epoch_1: dict[str, torch.Tensor] = {}
    train(
        _lenet(seed=2),
        digits,
        TrainConfig(epochs=1),
        seed=torch.Generator().manual_seed(5),
        callback=lambda e, m: after_epoch_1.update(pb.snapshot(m)),
    )
    model = _lenet(seed=2)
    sched = Schedule(kind="lottery", steps=(0.5,), retrain_epochs=0, rewind_step=k)
    run_schedule(model, digits, cfg, sched, seed=torch.Generator().manual_seed(5))
    for name, m in pb.prunable_layers(model).items():
        assert torch.equal(pb.original_weight(m), seen[f"{name}.weight"])
        assert not torch.equal(seen[f"{name}.weight"], after_epoch_1[f"{name}.weight"])
    steps = 2 * -(-digits.x_train.shape[0] // cfg.batch_size)
    with pytest.raises(
        ValueError, match=f"rewind_step={steps + 1} exceeds the dense run's {steps}"
    ):
        run_schedule(
            _lenet(seed=2),
            digits,
            cfg,
            Schedule(kind="lottery", rounds=1, rewind_step=steps + 1),
            seed=torch.Generator(),
        )
    with pytest.raises(ValueError, match="rewind_epoch or rewind_step, not both"):
        Schedule(kind="lottery", rewind_epoch=1, rewind_step=3)


def test_lottery_rewind_epoch_beyond_training_is_refused_before_training(
    digits: pb.data.Dataset,
) -> None:
    model = _lenet(seed=1)
    before = pb.snapshot(model)
    sched = Schedule(kind="lottery", rounds=1, rewind_epoch=5)
    with pytest.raises(ValueError, match="rewind_epoch=5 exceeds"):
        run_schedule(model, digits, TrainConfig(epochs=2), sched, seed=torch.Generator())
    after = pb.snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_last_layer_scale_keeps_output_denser(digits: pb.data.Dataset, scope: str) -> None:
    model = _lenet()
    sched = Schedule(
        target_sparsity=0.9,
        rounds=2,
        retrain_epochs=0,
        scope=scope,  # type: ignore[arg-type]
        last_layer_scale=0.5,
    )
    run_schedule(model, digits, TrainConfig(epochs=0), sched, seed=torch.Generator())
    sp = pb.sparsity(model)
    last, body = sp.layers[-1], sp.layers[:-1]
    rate = 1 - math.sqrt(0.1)  # per-round rate of the schedule
    assert last.zeros == round((1 - (1 - 0.5 * rate) ** 2) * last.total)  # about 57%
    # the other layers make up for it: the overall target still holds
    if scope == "global":
        assert sp.zeros == round(0.9 * sp.total)
    else:
        assert abs(sp.zeros - 0.9 * sp.total) <= len(sp.layers)
        s_body = sum(x.zeros for x in body) / sum(x.total for x in body)
        assert all(abs(x.sparsity - s_body) < 1e-3 for x in body)
        assert all(x.sparsity > 0.9 for x in body)


@pytest.mark.parametrize(("opt", "wd"), [("sgd", 0.0), ("sgd", 0.1), ("adam", 0.0), ("adamw", 0.1)])
def test_pruned_weights_stay_zero_while_training(
    digits: pb.data.Dataset, opt: str, wd: float
) -> None:
    model = _lenet()
    pb.prune(model, "magnitude", 0.8)
    before = {k: v.clone() for k, v in pb.masks(model).items()}
    train(model, digits, TrainConfig(epochs=1, optimizer=opt, weight_decay=wd, lr=0.01))  # type: ignore[arg-type]
    masks = pb.masks(model)
    for name, m in pb.prunable_layers(model).items():
        assert torch.equal(masks[name], before[name])
        assert torch.all(_attr(m, "weight")[~masks[name]] == 0)
        assert torch.count_nonzero(_attr(m, "weight")[masks[name]]) > 0.99 * int(masks[name].sum())


def test_same_seed_same_masks_and_metrics(digits: pb.data.Dataset) -> None:
    outs = []
    for seed in (3, 3, 4):
        model = _lenet(seed=3)
        sched = Schedule(method="random", target_sparsity=0.5, rounds=2, retrain_epochs=1)
        rounds = run_schedule(
            model,
            digits,
            TrainConfig(epochs=1),
            sched,
            seed=torch.Generator().manual_seed(seed),
        )
        outs.append(([r.accuracy for r in rounds], [r.loss for r in rounds], pb.masks(model)))
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    assert all(torch.equal(v, outs[1][2][k]) for k, v in outs[0][2].items())
    assert not all(torch.equal(v, outs[2][2][k]) for k, v in outs[0][2].items())  # seed matters


def test_lr_schedules() -> None:
    cos = TrainConfig(epochs=4, lr=1.0, lr_schedule="cosine")
    assert [round(cos.lr_at(e), 4) for e in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    step = TrainConfig(epochs=5, lr=1.0, lr_schedule="step", step_epochs=2)
    assert [step.lr_at(e) for e in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert TrainConfig(epochs=3, lr=0.5).lr_at(2) == 0.5


def test_retrain_lr_rewind_replays_the_tail_of_the_dense_schedule() -> None:
    dense = TrainConfig(epochs=10, lr=1.0, lr_schedule="cosine")
    rew = retrain_config(dense, Schedule(retrain_epochs=3, retrain_lr="rewind"))
    assert [rew.lr_at(e) for e in range(3)] == pytest.approx([dense.lr_at(e) for e in (7, 8, 9)])
    res = retrain_config(dense, Schedule(retrain_epochs=3, retrain_lr="restart"))
    assert res.lr_at(0) == 1.0 and res.lr_at(2) == pytest.approx(0.25)
    const = retrain_config(dense, Schedule(retrain_epochs=3, retrain_lr="constant"))
    assert [const.lr_at(e) for e in range(3)] == [1.0, 1.0, 1.0]
    long = retrain_config(dense, Schedule(retrain_epochs=20, retrain_lr="rewind"))
    assert long.lr_at(0) == 1.0 and long.lr_at(10) == pytest.approx(0.5)
    scaled = retrain_config(dense, Schedule(retrain_epochs=3, retrain_lr_scale=2.0))
    assert [scaled.lr_at(e) for e in range(3)] == pytest.approx(
        [2 * rew.lr_at(e) for e in range(3)]
    )


def test_train_records_lr_and_loss_decreases(digits: pb.data.Dataset) -> None:
    model = _lenet()
    res = train(model, digits, TrainConfig(epochs=3, lr=1e-3, lr_schedule="step", step_epochs=2))
    assert res.lrs == pytest.approx((1e-3, 1e-3, 1e-4))
    assert res.losses[-1] < res.losses[0]
    assert len(res.accuracies) == 3 and res.to_dict()["lrs"] == res.lrs


def test_evaluate_restores_mode_and_counts(digits: pb.data.Dataset) -> None:
    model = _lenet()
    model.train()
    ev = evaluate(model, digits, batch_size=7)
    assert model.training
    assert 0.0 <= ev.accuracy <= 0.3  # untrained: about chance
    model.eval()
    ev2 = evaluate(model, digits)
    assert not model.training
    assert ev2.accuracy == ev.accuracy and ev2.loss == pytest.approx(ev.loss)


def test_nan_loss_stops_with_clear_error(digits: pb.data.Dataset) -> None:
    model = _lenet()
    with pytest.raises(RuntimeError, match="training loss became"):
        train(model, digits, TrainConfig(epochs=1, lr=1e30, optimizer="sgd"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, r"train\.epochs must be an int >= 0, got -1"),
        ({"batch_size": 0}, r"train\.batch_size"),
        ({"optimizer": "rmsprop"}, r"train\.optimizer"),
        ({"lr": float("nan")}, r"train\.lr"),
        ({"weight_decay": -1.0}, r"train\.weight_decay"),
        ({"lr_schedule": "linear"}, r"train\.lr_schedule"),
        ({"lr_horizon": 0}, r"train\.lr_horizon"),
    ],
)
def test_train_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cubic"}, r"schedule\.kind"),
        ({"method": "smallest"}, r"schedule\.method"),
        (
            {"target_sparsity": 1.0},
            r"schedule\.target_sparsity must be a float in \[0, 1\), got 1\.0",
        ),
        ({"rounds": 0}, r"schedule\.rounds"),
        ({"amount": 1.0}, r"schedule\.amount"),
        ({"steps": (0.5, 0.4)}, r"schedule\.steps"),
        ({"kind": "oneshot", "steps": (0.5, 0.6)}, r"schedule\.steps"),
        ({"last_layer_scale": 2.0}, r"schedule\.last_layer_scale"),
        ({"retrain_lr": "warm"}, r"schedule\.retrain_lr"),
        ({"rewind_epoch": -1}, r"schedule\.rewind_epoch"),
        ({"rewind_step": -2}, r"schedule\.rewind_step"),
        (
            {"retrain_lr_scale": 0.0},
            r"schedule\.retrain_lr_scale must be a finite number > 0, got 0\.0",
        ),
    ],
)
def test_schedule_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_explicit_steps_hit_each_sparsity(digits: pb.data.Dataset) -> None:
    model = _lenet()
    sched = Schedule(steps=(0.5, 0.8, 0.95), retrain_epochs=0)
    assert sched.rounds == 3 and sched.target_sparsity == 0.95
    rounds = run_schedule(model, digits, TrainConfig(epochs=0), sched, seed=torch.Generator())
    assert [round(r.sparsity, 3) for r in rounds] == [0.0, 0.5, 0.8, 0.95]
    assert Schedule(**sched.to_dict() | {"steps": tuple(sched.steps)}) == sched  # round-trips


def test_random_control_hurts_more_than_magnitude(digits: pb.data.Dataset) -> None:
    """One-shot 90% without retraining: magnitude keeps far more accuracy than random."""
    base = _lenet()
    train(base, digits, TrainConfig(epochs=10, batch_size=32, lr=2e-3))
    accs = {}
    for method in ("magnitude", "random"):
        model = _lenet()
        model.load_state_dict(base.state_dict())
        prune_round(
            model,
            Schedule(kind="oneshot", method=method, target_sparsity=0.9),
            torch.Generator().manual_seed(0),
        )
        accs[method] = evaluate(model, digits).accuracy
    assert accs["magnitude"] > accs["random"] + 0.2, accs


def test_train_dense_false_prunes_a_trained_model_as_is(digits: pb.data.Dataset) -> None:
    model = _lenet()
    train(model, digits, TrainConfig(epochs=2))
    before = evaluate(model, digits)
    sched = Schedule(target_sparsity=0.5, rounds=1, retrain_epochs=0)
    rounds = run_schedule(
        model, digits, TrainConfig(epochs=50), sched, seed=torch.Generator(), train_dense=False
    )
    assert rounds[0].accuracy == before.accuracy  # no dense training happened
    with pytest.raises(ValueError, match="lottery"):
        run_schedule(
            model,
            digits,
            TrainConfig(epochs=2),
            Schedule(kind="lottery"),
            seed=torch.Generator(),
            train_dense=False,
        )
