"""Gradual (cubic) pruning schedules and distillation retraining."""

from __future__ import annotations

import copy
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import run_keeping_checkpoints, tiny_experiment

import prunebound as pb
import prunebound.training.runner as runner
from prunebound.training.config import Experiment
from prunebound.training.experiment import run
from prunebound.training.loop import TrainConfig, distill_loss, train
from prunebound.training.resume import CHECKPOINT
from prunebound.training.schedule import Schedule


def test_gradual_schedule_sparsities_are_cubic_and_exact() -> None:
    s = Schedule(kind="gradual", target_sparsity=0.8, rounds=4, every=3, begin_step=5)
    assert s.steps == (
        0.8 * (1 - (1 - 1 / 4) ** 3),
        0.8 * (1 - (1 - 2 / 4) ** 3),
        0.8 * (1 - (1 - 3 / 4) ** 3),
        0.8,
    )
    assert s.steps[0] == pytest.approx(0.4625) and s.steps[1] == pytest.approx(0.7)
    assert [s.prune_step(r) for r in (1, 2, 3, 4)] == [8, 11, 14, 17]
    with pytest.raises(ValueError, match=r"schedule\.every must be an int >= 1"):
        Schedule(kind="gradual", every=0)
    with pytest.raises(ValueError, match="amount does not apply to gradual"):
        Schedule(kind="gradual", amount=0.5)
    with pytest.raises(ValueError, match=r"schedule\.calibration must be an int >= 1"):
        Schedule(method="wanda", calibration=0)


def _digits_experiment(tmp_path: Path, **kw: Any) -> Experiment:
    exp = tiny_experiment(tmp_path, seed=3, **kw)
    return replace(exp, train=replace(exp.train, optimizer="adam", lr=0.01))


def test_gradual_run_prunes_every_k_steps_during_one_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 160 examples in batches of 32: 5 steps per epoch, 10 in the 2 retraining epochs
    exp = _digits_experiment(
        tmp_path, kind="gradual", method="magnitude", rounds=4, every=2, target_sparsity=0.8
    )
    seen: list[tuple[int, int, list[int]]] = []
    prune_round, train_fn = runner.prune_round, runner.train
    step_now = [0]

    def count_steps(*args: Any, on_step: Any = None, **kw: Any) -> Any:
        def wrapped(step: int, m: torch.nn.Module) -> None:
            step_now[0] = step
            if on_step is not None:
                on_step(step, m)

        return train_fn(*args, on_step=wrapped, **kw)

    def record(model: torch.nn.Module, schedule: Schedule, seed: Any, r: int, **kw: Any) -> None:
        prune_round(model, schedule, seed, r, **kw)
        zeros = [int((~k).sum()) for k in pb.masks(model).values()]
        seen.append((r, step_now[0], zeros))

    monkeypatch.setattr(runner, "prune_round", record)
    monkeypatch.setattr(runner, "train", count_steps)
    res = run(exp, write_plots=False)
    sizes = [64 * 16, 16 * 10]
    steps = exp.schedule.steps
    assert [(r, step) for r, step, _ in seen] == [(1, 2), (2, 4), (3, 6), (4, 8)]
    for r, _, zeros in seen:
        assert zeros == [round(steps[r - 1] * n) for n in sizes]
    assert [r.round for r in res.rounds] == [0, 1]
    assert res.rounds[-1].sparsity == pytest.approx(sum(round(0.8 * n) for n in sizes) / 1184)


def test_gradual_past_the_retraining_is_refused_before_training(tmp_path: Path) -> None:
    exp = _digits_experiment(tmp_path, kind="gradual", rounds=4, every=3)
    with pytest.raises(ValueError, match=r"last pruning step 12 .* past the 10 steps"):
        run(exp, write_plots=False)


def test_gradual_and_distill_in_toml(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text(
        '[schedule]\nkind = "gradual"\nrounds = 6\nevery = 50\nbegin_step = 10\n'
        '[train]\nobjective = "distill"\ntemperature = 2.0\ndistill_weight = 0.5\n'
    )
    exp = Experiment.from_toml(toml)
    assert exp.schedule.kind == "gradual" and exp.schedule.every == 50
    assert exp.schedule.prune_step(6) == 310
    assert exp.train.objective == "distill" and exp.train.temperature == 2.0
    assert exp.hash() != Experiment().hash()
    toml.write_text('[train]\nobjective = "kd"\n')
    with pytest.raises(ValueError, match=r"train\.objective has the wrong type or value: .kd."):
        Experiment.from_toml(toml)
    for bad, match in (
        ({"temperature": 0}, r"train\.temperature must be a finite number > 0"),
        ({"distill_weight": 1.5}, r"train\.distill_weight must be"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_distill_loss_on_a_tiny_case() -> None:
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    p_t = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]
    p_s = [math.exp(0.5) / (1 + math.exp(0.5)), 1 / (1 + math.exp(0.5))]
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    ce = math.log(1 + math.exp(-1))
    got = distill_loss(s, t, y, temperature=2.0, weight=0.25)
    assert float(got) == pytest.approx(0.25 * 4 * kl + 0.75 * ce, rel=1e-6)
    assert float(distill_loss(t, t, y, temperature=3.0, weight=1.0)) == pytest.approx(0, abs=1e-7)


def test_pure_distillation_ignores_labels_and_follows_the_teacher() -> None:
    data = pb.data.load_digits(seed=0)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = pb.models.mlp((64, 32, 10))
    train(teacher, data, TrainConfig(epochs=8, lr=3e-3), seed=0)
    wrong = replace(data, y_train=torch.randint(0, 10, data.y_train.shape, generator=g))
    cfg = TrainConfig(epochs=2, lr=3e-3, objective="distill", distill_weight=1.0)
    students = []
    for d in (data, wrong):
        student = pb.prune(copy.deepcopy(teacher), "magnitude", 0.5)
        train(student, d, cfg, seed=1, teacher=teacher)
        students.append(student)
    for a, b in zip(students[0].parameters(), students[1].parameters(), strict=True):
        assert torch.equal(a, b)  # labels unused
    ce = pb.prune(copy.deepcopy(teacher), "magnitude", 0.5)
    train(ce, wrong, replace(cfg, objective="ce"), seed=1)  # wrong labels: ruined
    with torch.no_grad():
        agree = [float((m(data.x_test).argmax(1) == teacher(data.x_test).argmax(1)).float().mean())
                 for m in (students[0], ce)]  # fmt: skip
    assert agree[0] > 0.97 and agree[1] < agree[0] - 0.05, agree
    with pytest.raises(ValueError, match="needs a teacher"):
        train(students[0], data, cfg)


@pytest.mark.parametrize("kind", ["iterative", "gradual"])
def test_distillation_trains_every_round_towards_the_dense_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    extra = {"every": 2} if kind == "gradual" else {}
    exp = _digits_experiment(tmp_path, kind=kind, method="magnitude", rounds=2, **extra)
    exp = replace(exp, train=replace(exp.train, objective="distill", distill_weight=0.7))
    calls: list[tuple[str, dict[str, torch.Tensor] | None]] = []
    dense_state: list[dict[str, torch.Tensor]] = []
    train_fn = runner.train

    def spy(model: torch.nn.Module, data: Any, config: TrainConfig, **kw: Any) -> Any:
        teacher = kw.get("teacher")
        calls.append((config.objective, None if teacher is None else pb.snapshot(teacher)))
        out = train_fn(model, data, config, **kw)
        if not dense_state:
            dense_state.append(pb.snapshot(model))
        return out

    monkeypatch.setattr(runner, "train", spy)
    run(exp, write_plots=False)
    assert calls[0] == ("ce", None)  # the dense run has no teacher
    assert len(calls) == (3 if kind == "iterative" else 2)
    for objective, teacher in calls[1:]:
        assert objective == "distill" and teacher is not None
        assert teacher.keys() == dense_state[0].keys()
        assert all(torch.equal(teacher[k], v) for k, v in dense_state[0].items())


def test_gradual_distill_run_resumes_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = _digits_experiment(tmp_path / "full", kind="gradual", method="random", rounds=3, every=3)
    exp = replace(exp, train=replace(exp.train, objective="distill"))
    full, copies = run_keeping_checkpoints(exp, tmp_path, monkeypatch)
    final = safetensors.torch.load_file(full.out_dir / "model.safetensors")
    assert len(copies) == 6  # dense: 2 epoch ends + round end; the gradual round: the same
    for i in (1, 3, 4):  # dense round end, then the gradual round's epoch ends
        out = tmp_path / f"resumed{i}"
        out.mkdir()
        shutil.copy(copies[i], out / CHECKPOINT)
        res = run(replace(exp, out_dir=str(out)), write_plots=False, resume=True)
        got = safetensors.torch.load_file(res.out_dir / "model.safetensors")
        assert got.keys() == final.keys()
        assert all(torch.equal(got[k], v) for k, v in final.items()), i
        assert [r.accuracy for r in res.rounds] == [r.accuracy for r in full.rounds]


@pytest.mark.parametrize("method", ["obs", "wanda"])
def test_schedules_give_data_methods_calibration_examples(tmp_path: Path, method: str) -> None:
    exp = _digits_experiment(tmp_path, method=method, calibration=64)
    res = run(exp, write_plots=False)
    sizes = [64 * 16, 16 * 10]
    assert [r.round for r in res.rounds] == [0, 1, 2]
    zeros = res.rounds[-1].sparsity * sum(sizes)
    assert round(zeros) == sum(round(0.75 * n) for n in sizes)
