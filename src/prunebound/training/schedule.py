"""Pruning schedules: one-shot, iterative (Han et al. 2015), lottery ticket (Frankle & Carbin
2019) and gradual (Zhu & Gupta 2017), each with any registered method (random pruning is the
usual control).

`Schedule` says what to prune and how fast; `prune_round` prunes a model to one round's
sparsity. Round targets are cumulative and count-exact: after round r a layer of n weights
(rows, for structured methods) has exactly `round(s_r * n)` pruned, with no drift from rounding
a fraction of the survivors each round. `training.runner.run_schedule` runs the rounds.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn

from prunebound._check import (
    Seed,
    as_generator,
    check_choice,
    check_float,
    check_int,
    in_interval,
    is_float,
)
from prunebound._masks import count_units, mask_module, original_weight, prunable_layers, set_mask
from prunebound.layer_types import Unit
from prunebound.methods import METHODS
from prunebound.outputs import leave_outputs
from prunebound.pruning import prune
from prunebound.refitting import refit
from prunebound.report import ALL_WEIGHTS
from prunebound.training.loop import TrainConfig

ScheduleKind = Literal["oneshot", "iterative", "lottery", "gradual"]
RetrainLR = Literal["rewind", "restart", "constant"]


@dataclass(frozen=True)
class Schedule:
    """What to prune, how fast, and what happens between rounds.

    Attributes:
        kind: "oneshot" (one round to the target), "iterative" (`rounds` rounds of magnitude /
            random / ... pruning with retraining), "lottery" (iterative, rewinding the survivors
            to their values after `rewind_epoch` epochs of the dense run before retraining).
        method: a key of `prunebound.METHODS`.
        target_sparsity: fraction removed at the end, in [0, 1), of the units the schedule
            prunes (weights; rows/filters for structured methods) in the layers it prunes (its
            method's layers; structured methods leave the output layers alone, as `prune`
            does): see `schedule_layers` and `target_fraction`. Each `Round` reports this
            quantity as `achieved` beside `sparsity` (zeros among all prunable weights); the
            two agree for unstructured methods, which prune every layer.
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
        layers: names or glob patterns of the layers to prune (as `prune(layers=...)`); empty:
            every layer of the method, where structured methods leave the output layers alone
            unless named here exactly.
        every: gradual only: optimizer steps between two pruning steps (Zhu & Gupta's Delta t).
        begin_step: gradual only: round r prunes after step `begin_step + r * every` of the
            retraining (steps count from 1, as `train(on_step=...)` does).
        calibration: training examples (with their labels) given as `data=` to data-aware
            methods at each pruning round.
        shrink: structured methods only: after the last round, `prunebound.shrink` the model
            (example inputs: the first 64 test inputs) and report the shrunk model's parameters,
            MACs and measured latency (`results.json` "shrink"; `model.shrunk.safetensors`).
        coupled: structured methods only: each round prunes whole coupled units
            (`prune(..., coupled=True)`: channels tied by residual adds pruned together, each
            unit's weight row, bias and BatchNorm entries masked), `rate(r)` of the units still
            alive in each group (or globally), traced on one batch of training inputs. Rounds
            compose but are not count-exact (rounding per group and round). Not for gradual
            schedules, nor with `last_layer_scale` other than 1.
        refit: after each round's prune, `prunebound.refit` the surviving weights towards the
            model as it was before that prune, on the `calibration` examples (layer-wise least
            squares), then retrain. Not for gradual or lottery (rewinding) schedules.
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
    layers: tuple[str, ...] = ()
    every: int = 100
    begin_step: int = 0
    calibration: int = 1024
    shrink: bool = False
    coupled: bool = False
    refit: bool = False

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, get_args(ScheduleKind))
        check_choice("schedule.method", self.method, sorted(METHODS))
        check_int("schedule.calibration", self.calibration, 1)
        check_int("schedule.every", self.every, 1)
        check_int("schedule.begin_step", self.begin_step, 0)
        if self.kind == "gradual" and self.amount is not None:
            raise ValueError("schedule.amount does not apply to gradual (cubic) schedules")
        t = check_float("schedule.target_sparsity", self.target_sparsity, 0, 1, closed="left")
        check_int("schedule.rounds", self.rounds, 1)
        a = self.amount
        if a is not None:  # else rounds set the pace
            check_float("schedule.amount", a, 0, 1, closed="neither")
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
        if not all(isinstance(n, str) for n in self.layers):
            raise ValueError(f"schedule.layers must be layer names, got {self.layers!r}")
        if not isinstance(self.shrink, bool):
            raise ValueError(f"schedule.shrink must be true or false, got {self.shrink!r}")
        if self.shrink and METHODS[self.method].unit != "row":
            raise ValueError(
                f"schedule.shrink needs a structured method ('neuron', 'filter'), got "
                f"{self.method!r}: unstructured masks leave no whole unit to remove"
            )
        self._check_coupled()
        if not isinstance(self.refit, bool):
            raise ValueError(f"schedule.refit must be true or false, got {self.refit!r}")
        if self.refit and self.kind in ("gradual", "lottery"):
            raise ValueError(f"schedule.refit does not apply to {self.kind} schedules")
        if self.kind == "oneshot" and len(steps) > 1:
            raise ValueError(f"schedule.steps must have one entry for oneshot, got {steps!r}")
        # all checked: normalise (frozen, hence object.__setattr__)
        if not steps:
            if self.kind == "oneshot":
                steps = (t,)
            elif self.kind == "gradual":
                steps = tuple(
                    gradual_sparsity(t, r, self.rounds) for r in range(1, self.rounds + 1)
                )
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

    def _check_coupled(self) -> None:
        if not isinstance(self.coupled, bool):
            raise ValueError(f"schedule.coupled must be true or false, got {self.coupled!r}")
        if METHODS[self.method].coupled and not self.coupled:
            raise ValueError(f"schedule.method {self.method!r} needs coupled = true")
        if not self.coupled:
            return
        meth = METHODS[self.method]
        if meth.unit != "row" or meth.scores is None:
            raise ValueError(
                f"schedule.coupled needs a structured method ('neuron', 'filter'), got "
                f"{self.method!r}: only whole units are coupled"
            )
        if self.kind == "gradual":
            raise ValueError("schedule.coupled does not apply to gradual schedules (yet)")
        if self.last_layer_scale != 1.0:
            raise ValueError(
                "schedule.coupled prunes coupled groups, not layers: last_layer_scale must be 1"
            )

    def prune_step(self, r: int) -> int:
        """Gradual schedules: the retraining step after which round r (1-based) prunes."""
        return self.begin_step + r * self.every

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
        if self.layers:  # absent when empty: configs of before `layers` keep their hash
            d["layers"] = list(self.layers)
        else:
            del d["layers"]
        # flags absent when false: older configs keep their hash
        for flag in ("shrink", "coupled", "refit"):
            if not d[flag]:
                del d[flag]
        return d


def schedule_layers(model: nn.Module, schedule: Schedule) -> dict[str, nn.Module]:
    """The layers `prune_round` prunes: `schedule.layers` (default: those of its method), without
    the output layers not named there for structured methods (`outputs.leave_outputs`)."""
    meth = METHODS[schedule.method]
    chosen = list(schedule.layers) or None
    layers = prunable_layers(model, chosen, types=meth.layer_types)
    return leave_outputs(model, layers, chosen)[0] if meth.unit == "row" else layers


def target_fraction(model: nn.Module, schedule: Schedule) -> tuple[float, str]:
    """(fraction, what it counts) of the quantity `schedule.target_sparsity` speaks of: the
    pruned share of the schedule's units (weights, or rows) in `schedule_layers`, now."""
    unit = METHODS[schedule.method].unit
    layers = schedule_layers(model, schedule)
    total = pruned = 0
    for m in layers.values():
        t, p = _pruned_units(m, unit)
        total, pruned = total + t, pruned + p
    kind = "weights" if unit == "weight" else "rows"
    if unit == "weight" and len(layers) == len(prunable_layers(model)):
        what = ALL_WEIGHTS
    elif len(layers) <= 4:
        what = f"{kind} of layers {', '.join(layers)}"
    else:
        what = f"{kind} of {len(layers)} layers"
    return (pruned / total if total else 0.0), what


def gradual_sparsity(target: float, r: int, rounds: int) -> float:
    """Zhu & Gupta's cubic schedule from 0 to `target` in `rounds` steps: sparsity after step r."""
    if r >= rounds:
        return target
    return target * (1.0 - (1.0 - r / rounds) ** 3)


def _pruned_units(module: nn.Module, unit: Unit) -> tuple[int, int]:
    total, alive = count_units(module, unit)
    return total, total - alive


def prune_round(
    model: nn.Module,
    schedule: Schedule,
    seed: Seed = 0,
    r: int = 1,
    *,
    data: object = None,
    example_inputs: object = None,
) -> None:
    """Prune `model` in place to the sparsity of round r (1-based) of `schedule`.

    With `s = schedule.cumulative(r)` and N prunable units (weights, or rows for structured
    methods) in all: the output layer, if kept denser, gets exactly
    `round(s_last * n_last)` pruned (`Schedule.layer_sparsity`), and the other layers make up
    the rest so that `round(s * N)` are pruned in all: exactly, in one ranking, for global
    scope; for layer scope each of them reaches `round(s' * n)` with the common `s'` that
    compensates, so the total is within one unit per layer. Sampling methods (Bernoulli) prune
    each survivor with the round's rate instead, so they are not count-exact. `data` is the
    calibration data of data-aware methods (`prune(data=...)`). A `coupled` schedule prunes
    `schedule.rate(r)` of the alive coupled units instead (`prune(..., coupled=True,
    example_inputs=example_inputs)`), which a schedule run takes from one training batch.
    A `refit` schedule then refits the survivors (`Schedule.refit`) on the inputs of `data`."""
    if schedule.refit and data is None:
        raise ValueError("schedule.refit needs calibration data (data=)")
    before = copy.deepcopy(model) if schedule.refit else None
    _prune_round(model, schedule, seed, r, data=data, example_inputs=example_inputs)
    if before is not None:
        refit(model, before, data)


def _prune_round(
    model: nn.Module,
    schedule: Schedule,
    seed: Seed,
    r: int,
    *,
    data: object,
    example_inputs: object,
) -> None:
    g = as_generator(seed)  # one generator for every prune call of the round
    meth = METHODS[schedule.method]
    layers = schedule_layers(model, schedule)  # as `prune`: not the output layer, if structured
    names = list(layers)
    if not names:
        raise ValueError(f"model has no layer that method {schedule.method!r} can prune")
    if schedule.coupled:
        if example_inputs is None:
            raise ValueError("a coupled schedule needs example_inputs (a batch the model runs on)")
        prune(model, meth, schedule.rate(r), scope=schedule.scope, layers=names, seed=g,
              coupled=True, example_inputs=example_inputs, data=data)  # fmt: skip
        return
    separate = schedule.last_layer_scale != 1.0 and len(names) > 1
    body = names[:-1] if separate else names
    if meth.mask is not None:  # sampling method: no exact counts
        prune(model, meth, schedule.rate(r), layers=body, seed=g)
        if separate:
            rate = 1 - (1 - schedule.layer_sparsity(r, last=True)) / (
                1 - schedule.layer_sparsity(r - 1, last=True)
            )
            prune(model, meth, rate, layers=names[-1:], seed=g)
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
            prune(model, meth, k / alive, scope="global", layers=body, seed=g, data=data)
    else:
        # without a denser output layer every layer reaches round(s * n) exactly
        s_body = zeros_body / n_body if separate else schedule.cumulative(r)
        for n in body:
            counts[n] = max(0, round(s_body * units[n][0]) - units[n][1])
    if counts:
        prune(model, meth, counts=counts, seed=g, data=data)


def prepare_gradual(model: nn.Module, schedule: Schedule) -> None:
    """Give every layer a gradual schedule prunes a mask (all kept where it has none) before
    its retraining starts: masks added mid-training would reorder the model's parameters, and
    a resumed optimizer state (stored by parameter position) would no longer line up."""
    meth = METHODS[schedule.method]
    for m in prunable_layers(model, types=meth.layer_types).values():
        if mask_module(m) is None:
            set_mask(m, torch.ones_like(original_weight(m), dtype=torch.bool))


def retrain_config(dense: TrainConfig, schedule: Schedule) -> TrainConfig:
    """The TrainConfig of each retraining round (see `Schedule.retrain_lr`)."""
    k, total = schedule.retrain_epochs, dense.epochs
    lr = dense.lr * schedule.retrain_lr_scale
    if schedule.retrain_lr == "constant":
        return replace(dense, epochs=k, lr=lr, lr_schedule="constant", lr_offset=0, lr_horizon=None)
    if schedule.retrain_lr == "restart" or k >= total:
        return replace(dense, epochs=k, lr=lr, lr_offset=0, lr_horizon=None)
    return replace(dense, epochs=k, lr=lr, lr_offset=total - k, lr_horizon=total)
