"""Running a schedule round by round: train dense, then per round prune to the round's sparsity,
optionally rewind the surviving weights, retrain, and evaluate (`run_schedule`). A gradual
schedule is one retraining that prunes every `every` steps; with `objective="distill"` every
retraining trains towards the dense model (the teacher).

`Round` holds one round's metrics; `RunProgress` is where a run stands at a checkpoint, enough
(with the model) to continue it exactly (`training.resume` writes and reads it).
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunebound._check import Seed, as_generator
from prunebound._masks import reset
from prunebound.checkpoint import rewind, snapshot
from prunebound.data import Dataset
from prunebound.methods import METHODS
from prunebound.sparsity_stats import sparsity
from prunebound.training.loop import (
    NonFiniteError,
    TrainConfig,
    TrainState,
    evaluate,
    steps_per_epoch,
    train,
)
from prunebound.training.schedule import (
    Schedule,
    prepare_gradual,
    prune_round,
    retrain_config,
    target_fraction,
)

if TYPE_CHECKING:
    from prunebound.training.distributed import DistContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Round:
    """Metrics after one round (round 0 is the trained dense model).

    `sparsity`/`compression` are over all prunable weights; `layers` maps each prunable layer
    to its sparsity; FLOPs are multiply-adds x 2 of one batch-1 forward (`pb.sparsity`).
    `target` is the schedule's sparsity for this round and `achieved` the same quantity
    measured, which `target_of` names: the pruned share of the schedule's units (weights, or
    rows for structured methods) in the layers it prunes (`schedule.target_fraction`). For
    structured methods it differs from `sparsity`: they prune some layers only.
    """

    round: int
    sparsity: float
    compression: float
    accuracy: float
    loss: float
    dense_flops: int | None
    sparse_flops: int | None
    layers: dict[str, float]
    seconds: float
    target: float | None = None
    achieved: float | None = None
    target_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class RunProgress:
    """Where a schedule run stands at a checkpoint; with the model, enough to continue exactly.

    Two kinds of boundary: an epoch end (`train` holds the training's state) and a round end
    (`train` is None; `rounds[-1].round == round`). Round 0 is the dense training.

    Attributes:
        round: the round in progress or just finished.
        epoch: epochs of that round's training done.
        rounds: metrics of every round measured so far.
        train: state of the interrupted training, None at a round end.
        rewind_to: lottery only: the weights to rewind to, once taken.
        generator: `get_state()` of the run's generator (shuffling, random pruning).
        seconds: time spent in this round so far.
        teacher: distillation only: the dense model's weights (`checkpoint.snapshot`).
    """

    round: int
    epoch: int
    rounds: tuple[Round, ...]
    train: TrainState | None
    rewind_to: Mapping[str, torch.Tensor] | None
    generator: torch.Tensor
    seconds: float
    teacher: Mapping[str, torch.Tensor] | None = None

    @property
    def round_done(self) -> bool:
        """Whether this is a round end (the round is measured)."""
        return bool(self.rounds) and self.rounds[-1].round == self.round


def _report_round(bar: Any, r: Round, rounds: int) -> None:
    """Progress after a round: the bar's postfix and one log line (INFO) per round."""
    bar.update(1)
    bar.set_postfix_str(f"sparsity {r.sparsity:.1%}, accuracy {r.accuracy:.1%}")
    logger.info(
        "round %d/%d: sparsity %.2f%%, accuracy %.2f%%, loss %.4f, %.1f s",
        r.round, rounds, 100 * r.sparsity, 100 * r.accuracy, r.loss, r.seconds,
    )  # fmt: skip


def measure(
    model: nn.Module, data: Dataset, r: int, seconds: float, schedule: Schedule | None = None
) -> Round:
    """Evaluate `model` on the test set and count its sparsity and FLOPs as round r (and, given
    the `schedule`, the round's target and the same quantity achieved)."""
    ev = evaluate(model, data)
    sp = sparsity(model, data.input_shape)
    achieved, what = target_fraction(model, schedule) if schedule else (None, None)
    return Round(
        round=r,
        sparsity=sp.sparsity,
        compression=sp.compression,
        accuracy=ev.accuracy,
        loss=ev.loss,
        dense_flops=sp.dense_flops,
        sparse_flops=sp.sparse_flops,
        layers={ls.name: ls.sparsity for ls in sp.layers},
        seconds=seconds,
        target=schedule.cumulative(r) if schedule else None,
        achieved=achieved,
        target_of=what,
    )


def run_schedule(
    model: nn.Module,
    data: Dataset,
    dense: TrainConfig,
    schedule: Schedule,
    *,
    seed: Seed = 0,
    progress: bool = False,
    on_round: Callable[[Round], None] | None = None,
    train_dense: bool = True,
    resume: RunProgress | None = None,
    on_checkpoint: Callable[[RunProgress], None] | None = None,
    dist: DistContext | None = None,
) -> list[Round]:
    """Train `model` dense with `dense`, then run `schedule`; returns every round's metrics.

    The model is modified in place (trained, pruned, possibly rewound). One generator (from `seed`:
    an int, a `torch.Generator`, advanced in place, or None for fresh OS entropy) drives
    batch shuffling and random pruning, so a seed reproduces masks and metrics exactly. Each
    retraining builds a fresh optimizer (clean state per round). With `train_dense=False` the
    model is taken as already trained by `dense` (which then only sets the retraining LR
    schedule); lottery schedules need the dense run and refuse this. Raises ValueError before
    any training if a lottery `rewind_epoch` exceeds `dense.epochs`.

    `on_checkpoint(progress)` is called at every epoch end and round end. Passing such a
    `RunProgress` back as `resume` (with the model holding that moment's weights and masks)
    continues the run and gives the same masks and metrics, bit for bit on CPU, as if it had
    never stopped (`on_round` is then called only for the rounds still to come).
    NonFiniteError (a NaN/Inf loss or weight) is raised with its round set.

    With `dist` every training is data-parallel (`prunebound.training.distributed`); every rank
    prunes (keeping the generators in step) and rank 0's masks are then broadcast to all.
    """
    generator = as_generator(seed)
    if schedule.kind == "lottery" and schedule.rewind_epoch > dense.epochs:
        raise ValueError(
            f"schedule.rewind_epoch={schedule.rewind_epoch} exceeds train.epochs={dense.epochs}"
        )
    if schedule.kind == "lottery" and schedule.rewind_step is not None:
        n_steps = dense.epochs * steps_per_epoch(data.x_train.shape[0], dense.batch_size)
        if schedule.rewind_step > n_steps:
            raise ValueError(
                f"schedule.rewind_step={schedule.rewind_step} exceeds the dense run's {n_steps} "
                f"steps ({dense.epochs} epochs of {data.x_train.shape[0]} examples in batches "
                f"of {dense.batch_size})"
            )
    if schedule.kind == "lottery" and not train_dense:
        raise ValueError("train_dense=False: lottery schedules rewind into the dense run")
    gradual = schedule.kind == "gradual"
    retrain = retrain_config(dense, schedule)
    if gradual:
        n_steps = retrain.epochs * steps_per_epoch(data.x_train.shape[0], retrain.batch_size)
        if schedule.prune_step(schedule.rounds) > n_steps:
            raise ValueError(
                f"gradual schedule: its last pruning step {schedule.prune_step(schedule.rounds)} "
                f"(begin_step + rounds * every) is past the {n_steps} steps of retraining "
                f"({retrain.epochs} epochs); lower every or rounds, or raise retrain_epochs"
            )
    rounds: list[Round] = []
    rewind_to: dict[str, torch.Tensor] | None = None
    first, start, elapsed = 0, None, 0.0
    teacher: nn.Module | None = None
    if resume is not None and resume.teacher is not None:  # the dense model, masks dropped
        teacher = rewind(reset(copy.deepcopy(model)), dict(resume.teacher))
    teacher_state = None if resume is None else resume.teacher
    if resume is not None:
        rounds = list(resume.rounds)
        rewind_to = dict(resume.rewind_to) if resume.rewind_to is not None else None
        generator.set_state(resume.generator)
        first = resume.round + int(resume.round_done)
        if not resume.round_done:  # an epoch end: the interrupted round goes on from there
            start, elapsed = resume.train, resume.seconds
    lottery = schedule.kind == "lottery"
    dense_run = replace(dense, objective="ce")  # no teacher before the dense model exists
    n_cal = schedule.calibration
    calibration = (
        (data.x_train[:n_cal], data.y_train[:n_cal])
        if METHODS[schedule.method].needs or schedule.refit
        else None
    )
    distill = retrain.objective == "distill"
    # coupled schedules trace the model's channel dependencies on one training batch
    example = data.x_train[: dense.batch_size] if schedule.coupled else None

    rewind_at = 0 if schedule.rewind_step is None else schedule.rewind_step

    def keep(epoch: int, m: nn.Module) -> None:
        nonlocal rewind_to
        if epoch == schedule.rewind_epoch:  # never with rewind_step (rewind_epoch is 0)
            rewind_to = snapshot(m)

    def keep_step(step: int, m: nn.Module) -> None:
        nonlocal rewind_to
        if step == rewind_at:
            rewind_to = snapshot(m)

    def save(r: int, t0: float, epochs: int, state: TrainState | None) -> None:
        if on_checkpoint is not None:
            epoch = epochs if state is None else state.epoch
            seconds = time.perf_counter() - t0
            g_state = generator.get_state()
            on_checkpoint(
                RunProgress(
                    r, epoch, tuple(rounds), state, rewind_to, g_state, seconds, teacher_state
                )
            )

    def prune_at(step: int, m: nn.Module) -> None:
        for i in range(1, schedule.rounds + 1):
            if schedule.prune_step(i) == step:
                prune_round(m, schedule, generator, i, data=calibration)
                if dist is not None:
                    dist.broadcast_masks(m)

    last = 1 if gradual else schedule.rounds
    bar = tqdm(  # on a terminal a bar over rounds (`train` adds one over epochs)
        total=last + 1,
        initial=first,
        desc="rounds",
        unit="round",
        disable=not (progress and sys.stderr.isatty()),
    )
    try:
        for r in range(first, last + 1):
            t0 = time.perf_counter() - elapsed
            epochs = retrain.epochs if r > 0 else dense.epochs if train_dense else 0
            on_epoch = functools.partial(save, r, t0, epochs)
            try:
                cb: Callable[[int, nn.Module], None] | None = None
                step_cb: Callable[[int, nn.Module], None] | None = None
                if r == 0 and train_dense:
                    from_init = schedule.rewind_epoch == 0 and rewind_at == 0
                    if lottery and from_init and start is None:
                        rewind_to = snapshot(model)
                    cb = keep if lottery else None
                    step_cb = keep_step if lottery and rewind_at > 0 else None
                if r > 0 and distill and teacher is None:
                    teacher = copy.deepcopy(model)
                    teacher_state = snapshot(teacher)
                if gradual and r > 0:
                    if start is None:
                        prepare_gradual(model, schedule)
                    step_cb = prune_at
                elif r > 0 and start is None:
                    prune_round(model, schedule, generator, r, data=calibration,
                                example_inputs=example)  # fmt: skip
                    if dist is not None:
                        dist.broadcast_masks(model)
                    if rewind_to is not None:
                        rewind(model, rewind_to)
                if r > 0 or train_dense:  # round 0 trains dense, every later round retrains
                    train(model, data, dense_run if r == 0 else retrain, seed=generator,
                          progress=progress, callback=cb, on_step=step_cb, start=start,
                          on_epoch=on_epoch, dist=dist, teacher=teacher)  # fmt: skip
            except NonFiniteError as e:
                e.round = r
                raise
            start, elapsed = None, 0.0
            rounds.append(measure(model, data, r, time.perf_counter() - t0, schedule))
            _report_round(bar, rounds[-1], last)
            if on_round is not None:
                on_round(rounds[-1])
            save(r, t0, epochs, None)
    finally:
        bar.close()
    return rounds
