"""Pruning schedules: one-shot, iterative (Han et al. 2015) and lottery ticket (Frankle & Carbin
2019), each with any registered method (random pruning is the usual control).

Every schedule is the same loop: train dense, then per round prune to the round's sparsity,
optionally rewind the surviving weights, retrain, and evaluate. Round targets are cumulative and
count-exact: after round r a layer of n weights (rows, for structured methods) has exactly
`round(s_r * n)` pruned, with no drift from rounding a fraction of the survivors each round.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from prunebound._check import check_choice, check_float, check_int, in_interval, is_float
from prunebound._masks import count_units, prunable_layers, sparsity
from prunebound.checkpoint import rewind, snapshot
from prunebound.data import Dataset
from prunebound.layer_types import Unit
from prunebound.methods import METHODS
from prunebound.pruning import prune
from prunebound.training.loop import (
    NonFiniteError,
    TrainConfig,
    TrainState,
    evaluate,
    steps_per_epoch,
    train,
)

if TYPE_CHECKING:
    from prunebound.training.distributed import DistContext

logger = logging.getLogger(__name__)

ScheduleKind = Literal["oneshot", "iterative", "lottery"]
RetrainLR = Literal["rewind", "restart", "constant"]


@dataclass(frozen=True)
class Schedule:
    """What to prune, how fast, and what happens between rounds.

    Attributes:
        kind: "oneshot" (one round to the target), "iterative" (`rounds` rounds of magnitude /
            random / ... pruning with retraining), "lottery" (iterative, rewinding the survivors
            to their values after `rewind_epoch` epochs of the dense run before retraining).
        method: a key of `prunebound.METHODS`.
        target_sparsity: fraction of the prunable weights removed at the end, in [0, 1).
        rounds: pruning rounds (oneshot: 1). Each removes the same fraction of the survivors,
            `1 - (1 - target) ** (1 / rounds)`, unless `amount` or `steps` is given.
        amount: optional fraction of the survivors pruned per round; `rounds` is then the
            fewest that reach the target (the last round stops exactly at the target).
        steps: optional explicit increasing sparsities after each round, e.g. (0.5, 0.8, 0.9);
            overrides `rounds`, `amount` and `target_sparsity`.
        retrain_epochs: epochs of retraining after each round (lottery: training from the
            rewound weights).
        scope: "layer" (every layer reaches the round's sparsity) or "global" (one ranking).
        last_layer_scale: the output layer is pruned at this multiple of the per-round rate (it
            is small and sensitive; 0.5 keeps it denser). 1.0 treats it like the others. The
            other layers are pruned a little more to compensate, so the overall sparsity still
            meets each round's target.
        rewind_epoch: lottery only: 0 rewinds to the initial weights, k to those after epoch k.
        rewind_step: lottery only, instead of `rewind_epoch`: rewind to the weights after k
            optimizer steps (iterations) of the dense run (0: the initial weights), as in
            Frankle et al. 2020 ("Linear mode connectivity and the lottery ticket hypothesis").
        retrain_lr: learning rate while retraining k epochs after a dense run of T epochs:
            "rewind" replays the dense schedule's last k epochs (learning-rate rewinding, Renda
            et al. 2020; if k > T the whole schedule is stretched over k); "restart" runs the
            whole dense schedule compressed into k epochs (learning-rate restarting, Le & Hua
            2021); "constant" keeps the dense initial LR.
        retrain_lr_scale: multiplies the dense `lr` while retraining (sparse networks often
            recover faster with a larger step).
    """

    kind: ScheduleKind = "iterative"
    method: str = "magnitude"
    target_sparsity: float = 0.9
    rounds: int = 5
    amount: float | None = None
    steps: tuple[float, ...] = ()
    retrain_epochs: int = 2
    scope: Literal["layer", "global"] = "layer"
    last_layer_scale: float = 1.0
    rewind_epoch: int = 0
    rewind_step: int | None = None
    retrain_lr: RetrainLR = "rewind"
    retrain_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, get_args(ScheduleKind))
        check_choice("schedule.method", self.method, sorted(METHODS))
        t = check_float("schedule.target_sparsity", self.target_sparsity, 0, 1, closed="left")
        check_int("schedule.rounds", self.rounds, 1)
        a = check_float("schedule.amount", self.amount, 0, 1, closed="neither", optional=True)
        steps = tuple(self.steps)
        if steps and (
            not all(is_float(x) and in_interval(x, 0, 1, "left") for x in steps)
            or any(b <= a for a, b in itertools.pairwise(steps))
        ):
            raise ValueError(
                f"schedule.steps must be floats increasing within [0, 1), got {self.steps!r}"
            )
        check_int("schedule.retrain_epochs", self.retrain_epochs, 0)
        check_choice("schedule.scope", self.scope, ("layer", "global"))
        c = check_float("schedule.last_layer_scale", self.last_layer_scale, 0, 1, ints=True)
        check_int("schedule.rewind_epoch", self.rewind_epoch, 0)
        k = check_int("schedule.rewind_step", self.rewind_step, 0, optional=True)
        if k is not None and self.rewind_epoch != 0:
            raise ValueError("schedule: give rewind_epoch or rewind_step, not both")
        check_choice("schedule.retrain_lr", self.retrain_lr, get_args(RetrainLR))
        f = check_float(
            "schedule.retrain_lr_scale", self.retrain_lr_scale, 0, closed="neither", ints=True
        )
        if self.kind == "oneshot" and len(steps) > 1:
            raise ValueError(f"schedule.steps must have one entry for oneshot, got {steps!r}")
        # all checked: normalise (frozen, hence object.__setattr__)
        if not steps:
            if self.kind == "oneshot":
                steps = (t,)
            elif a is not None:
                n = max(1, math.ceil(math.log(1 - t) / math.log(1 - a) - 1e-9)) if t > 0 else 1
                steps = tuple(min(t, 1 - (1 - a) ** r) for r in range(1, n))
                steps = (*steps, t)
            else:
                steps = tuple(1 - (1 - t) ** (r / self.rounds) for r in range(1, self.rounds + 1))
                steps = (*steps[:-1], t)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "rounds", len(steps))
        object.__setattr__(self, "target_sparsity", steps[-1])
        object.__setattr__(self, "last_layer_scale", float(c))
        object.__setattr__(self, "retrain_lr_scale", float(f))

    def cumulative(self, r: int) -> float:
        """Overall sparsity after round r (1-based); 0 before round 1."""
        return 0.0 if r <= 0 else self.steps[r - 1]

    def rate(self, r: int) -> float:
        """Fraction of the survivors pruned in round r (1-based)."""
        return 1.0 - (1.0 - self.cumulative(r)) / (1.0 - self.cumulative(r - 1))

    def layer_sparsity(self, r: int, *, last: bool) -> float:
        """Target sparsity after round r of a layer (the output layer if `last`)."""
        if not last or self.last_layer_scale == 1.0:
            return self.cumulative(r)
        density = 1.0
        for i in range(1, r + 1):
            density *= 1.0 - min(1.0, self.last_layer_scale * self.rate(i))
        return 1.0 - density

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (steps as a list)."""
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d


@dataclass(frozen=True)
class Round:
    """Metrics after one round (round 0 is the trained dense model).

    `sparsity`/`compression` are over all prunable weights; `layers` maps each prunable layer
    to its sparsity; FLOPs are multiply-adds x 2 of one batch-1 forward (`pb.sparsity`).
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Progress:
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
    """

    round: int
    epoch: int
    rounds: tuple[Round, ...]
    train: TrainState | None
    rewind_to: Mapping[str, torch.Tensor] | None
    generator: torch.Tensor
    seconds: float

    @property
    def round_done(self) -> bool:
        """Whether this is a round end (the round is measured)."""
        return bool(self.rounds) and self.rounds[-1].round == self.round


def _pruned_units(module: nn.Module, unit: Unit) -> tuple[int, int]:
    total, alive = count_units(module, unit)
    return total, total - alive


def prune_round(
    model: nn.Module, schedule: Schedule, generator: torch.Generator, r: int = 1
) -> None:
    """Prune `model` in place to the sparsity of round r (1-based) of `schedule`.

    With `s = schedule.cumulative(r)` and N prunable units (weights, or rows for structured
    methods) in all: the output layer, if kept denser, gets exactly
    `round(s_last * n_last)` pruned (`Schedule.layer_sparsity`), and the other layers make up
    the rest so that `round(s * N)` are pruned in all: exactly, in one ranking, for global
    scope; for layer scope each of them reaches `round(s' * n)` with the common `s'` that
    compensates, so the total is within one unit per layer. Sampling methods (Bernoulli) prune
    each survivor with the round's rate instead, so they are not count-exact.
    """
    meth = METHODS[schedule.method]
    layers = prunable_layers(model, types=meth.layer_types)
    names = list(layers)
    if not names:
        raise ValueError(f"model has no layer that method {schedule.method!r} can prune")
    separate = schedule.last_layer_scale != 1.0 and len(names) > 1
    body = names[:-1] if separate else names
    if meth.mask is not None:  # sampling method: no exact counts
        prune(model, meth, schedule.rate(r), layers=body, seed=generator)
        if separate:
            rate = 1 - (1 - schedule.layer_sparsity(r, last=True)) / (
                1 - schedule.layer_sparsity(r - 1, last=True)
            )
            prune(model, meth, rate, layers=names[-1:], seed=generator)
        return
    units = {n: _pruned_units(layers[n], meth.unit) for n in names}  # (total, pruned)
    n_all = sum(u[0] for u in units.values())
    zeros_all = round(schedule.cumulative(r) * n_all)
    counts: dict[str, int] = {}
    if separate:
        total, pruned = units[names[-1]]
        z_last = round(schedule.layer_sparsity(r, last=True) * total)
        counts[names[-1]] = max(0, z_last - pruned)
        zeros_all -= z_last
    n_body = sum(units[n][0] for n in body)
    pruned_body = sum(units[n][1] for n in body)
    zeros_body = min(n_body, max(zeros_all, pruned_body))
    if schedule.scope == "global" and len(body) > 1:
        k = zeros_body - pruned_body
        if k > 0:
            alive = n_body - pruned_body
            prune(model, meth, k / alive, scope="global", layers=body, seed=generator)
    else:
        # without a denser output layer every layer reaches round(s * n) exactly
        s_body = zeros_body / n_body if separate else schedule.cumulative(r)
        for n in body:
            counts[n] = max(0, round(s_body * units[n][0]) - units[n][1])
    if counts:
        prune(model, meth, counts=counts, seed=generator)


def measure(model: nn.Module, data: Dataset, r: int, seconds: float) -> Round:
    """Evaluate `model` on the test set and count its sparsity and FLOPs as round r."""
    ev = evaluate(model, data)
    sp = sparsity(model, data.input_shape)
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
    )


def retrain_config(dense: TrainConfig, schedule: Schedule) -> TrainConfig:
    """The TrainConfig of each retraining round (see `Schedule.retrain_lr`)."""
    k, total = schedule.retrain_epochs, dense.epochs
    lr = dense.lr * schedule.retrain_lr_scale
    if schedule.retrain_lr == "constant":
        return replace(dense, epochs=k, lr=lr, lr_schedule="constant", lr_offset=0, lr_horizon=None)
    if schedule.retrain_lr == "restart" or k >= total:
        return replace(dense, epochs=k, lr=lr, lr_offset=0, lr_horizon=None)
    return replace(dense, epochs=k, lr=lr, lr_offset=total - k, lr_horizon=total)


def run_schedule(
    model: nn.Module,
    data: Dataset,
    dense: TrainConfig,
    schedule: Schedule,
    *,
    generator: torch.Generator,
    progress: bool = False,
    on_round: Callable[[Round], None] | None = None,
    train_dense: bool = True,
    resume: Progress | None = None,
    on_checkpoint: Callable[[Progress], None] | None = None,
    dist: DistContext | None = None,
) -> list[Round]:
    """Train `model` dense with `dense`, then run `schedule`; returns every round's metrics.

    The model is modified in place (trained, pruned, possibly rewound). One `generator` drives
    batch shuffling and random pruning, so a seed reproduces masks and metrics exactly. Each
    retraining builds a fresh optimizer (clean state per round). With `train_dense=False` the
    model is taken as already trained by `dense` (which then only sets the retraining LR
    schedule); lottery schedules need the dense run and refuse this. Raises ValueError before
    any training if a lottery `rewind_epoch` exceeds `dense.epochs`.

    `on_checkpoint(progress)` is called at every epoch end and round end. Passing such a
    `Progress` back as `resume` (with the model holding that moment's weights and masks)
    continues the run and gives the same masks and metrics, bit for bit on CPU, as if it had
    never stopped (`on_round` is then called only for the rounds still to come).
    NonFiniteError (a NaN/Inf loss or weight) is raised with its round set.

    With `dist` every training is data-parallel (`prunebound.training.distributed`); every rank
    prunes (keeping the generators in step) and rank 0's masks are then broadcast to all.
    """
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
    rounds: list[Round] = []
    rewind_to: dict[str, torch.Tensor] | None = None
    first, start, elapsed = 0, None, 0.0
    if resume is not None:
        rounds = list(resume.rounds)
        rewind_to = dict(resume.rewind_to) if resume.rewind_to is not None else None
        generator.set_state(resume.generator)
        first = resume.round + int(resume.round_done)
        if not resume.round_done:  # an epoch end: the interrupted round goes on from there
            start, elapsed = resume.train, resume.seconds
    retrain = retrain_config(dense, schedule)
    lottery = schedule.kind == "lottery"

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
            on_checkpoint(Progress(r, epoch, tuple(rounds), state, rewind_to, g_state, seconds))

    for r in range(first, schedule.rounds + 1):
        t0 = time.perf_counter() - elapsed
        epochs = retrain.epochs if r > 0 else dense.epochs if train_dense else 0
        on_epoch = functools.partial(save, r, t0, epochs)
        try:
            if r == 0 and train_dense:
                from_init = schedule.rewind_epoch == 0 and rewind_at == 0
                if lottery and from_init and start is None:
                    rewind_to = snapshot(model)
                cb = keep if lottery else None
                step_cb = keep_step if lottery and rewind_at > 0 else None
                train(
                    model,
                    data,
                    dense,
                    generator=generator,
                    progress=progress,
                    callback=cb,
                    on_step=step_cb,
                    start=start,
                    on_epoch=on_epoch,
                    dist=dist,
                )
            elif r > 0:
                if start is None:
                    prune_round(model, schedule, generator, r)
                    if dist is not None:
                        dist.broadcast_masks(model)
                    if rewind_to is not None:
                        rewind(model, rewind_to)
                train(
                    model,
                    data,
                    retrain,
                    generator=generator,
                    progress=progress,
                    start=start,
                    on_epoch=on_epoch,
                    dist=dist,
                )
        except NonFiniteError as e:
            e.round = r
            raise
        start, elapsed = None, 0.0
        rounds.append(measure(model, data, r, time.perf_counter() - t0))
        logger.info(
            "round %d: sparsity %.4f, accuracy %.4f", r, rounds[-1].sparsity, rounds[-1].accuracy
        )
        if on_round is not None:
            on_round(rounds[-1])
        save(r, t0, epochs, None)
    return rounds
