"""Pruning schedules: one-shot, iterative (Han et al. 2015) and lottery ticket (Frankle & Carbin
2019), each with any registered method (random pruning is the usual control).

Every schedule is the same loop: train dense, then per round prune a fraction of the survivors,
optionally rewind the surviving weights, retrain, and evaluate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from prunebound.checkpoint import rewind, snapshot
from prunebound.data import Dataset
from prunebound.masks import prunable_layers, sparsity
from prunebound.methods import METHODS
from prunebound.pipeline import TrainConfig, evaluate, train
from prunebound.pruning import prune

Kind = Literal["oneshot", "iterative", "lottery"]


@dataclass(frozen=True)
class Schedule:
    """What to prune, how fast, and what happens between rounds.

    Attributes:
        kind: "oneshot" (one round to the target), "iterative" (`rounds` rounds, each pruning the
            same fraction of the survivors), "lottery" (iterative, rewinding survivors to their
            values after `rewind_epoch` epochs of the dense run before each retraining).
        method: a key of `prunebound.METHODS`.
        target_sparsity: fraction of the prunable weights removed at the end.
        rounds: pruning rounds (oneshot: 1).
        retrain_epochs: epochs of retraining after each round (lottery: of training from the
            rewound weights).
        scope: "layer" or "global" ranking.
        last_layer_scale: the output layer is pruned at this multiple of the per-round rate (it is
            small and sensitive; 0.5 keeps it denser). 1.0 treats it like the others.
        rewind_epoch: lottery only: 0 rewinds to the initial weights, k to those after epoch k.
        steps: explicit increasing sparsity after each round (e.g. (0.5, 0.8, 0.9)); overrides
            `rounds` and `target_sparsity` when given.
        lr_rewind: retrain each round with the dense run's LR schedule restarted (learning-rate
            rewinding, Renda et al. 2020); False retrains at a constant LR.
    """

    kind: Kind = "iterative"
    method: str = "magnitude"
    target_sparsity: float = 0.9
    rounds: int = 5
    retrain_epochs: int = 2
    scope: Literal["layer", "global"] = "layer"
    last_layer_scale: float = 1.0
    rewind_epoch: int = 0
    lr_rewind: bool = True
    steps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.steps:
            steps = tuple(self.steps)
            ok = all(isinstance(x, float) and 0 <= x < 1 for x in steps)
            if not ok or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
                raise ValueError(f"schedule.steps must increase within [0, 1), got {self.steps!r}")
            object.__setattr__(self, "steps", steps)
            object.__setattr__(self, "rounds", len(steps))
            object.__setattr__(self, "target_sparsity", steps[-1])
        if self.kind not in ("oneshot", "iterative", "lottery"):
            raise ValueError(
                f"schedule.kind must be oneshot, iterative or lottery, got {self.kind!r}"
            )
        if self.method not in METHODS:
            raise ValueError(
                f"schedule.method must be one of {sorted(METHODS)}, got {self.method!r}"
            )
        if not isinstance(self.target_sparsity, float) or not 0 <= self.target_sparsity < 1:
            raise ValueError(
                f"schedule.target_sparsity must be a float in [0, 1), got {self.target_sparsity!r}"
            )
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"schedule.rounds must be a positive int, got {self.rounds!r}")
        if self.kind == "oneshot" and self.rounds != 1:
            object.__setattr__(self, "rounds", 1)
        if not isinstance(self.retrain_epochs, int) or self.retrain_epochs < 0:
            raise ValueError(
                f"schedule.retrain_epochs must be an int >= 0, got {self.retrain_epochs!r}"
            )
        if self.scope not in ("layer", "global"):
            raise ValueError(f"schedule.scope must be layer or global, got {self.scope!r}")
        if not isinstance(self.last_layer_scale, float) or not self.last_layer_scale >= 0:
            raise ValueError(
                f"schedule.last_layer_scale must be a float >= 0, got {self.last_layer_scale!r}"
            )
        if not isinstance(self.rewind_epoch, int) or self.rewind_epoch < 0:
            raise ValueError(
                f"schedule.rewind_epoch must be an int >= 0, got {self.rewind_epoch!r}"
            )

    @property
    def per_round(self) -> float:
        """Fraction of the survivors pruned each round: 1 - (1 - target)^(1 / rounds)."""
        return float(1.0 - (1.0 - self.target_sparsity) ** (1.0 / self.rounds))

    def rate(self, r: int) -> float:
        """Fraction of the survivors pruned in round r (1-based)."""
        if not self.steps:
            return self.per_round
        before = self.steps[r - 2] if r > 1 else 0.0
        return 1.0 - (1.0 - self.steps[r - 1]) / (1.0 - before)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Round:
    """Metrics after one round (round 0 is the dense model)."""

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
        return asdict(self)


def prune_round(
    model: nn.Module, schedule: Schedule, generator: torch.Generator, r: int = 1
) -> None:
    """Round r: prune `schedule.rate(r)` of the survivors (the output layer at its own scale)."""
    names = list(prunable_layers(model, types=METHODS[schedule.method].layer_types))
    rate = schedule.rate(r)
    if schedule.last_layer_scale != 1.0 and len(names) > 1:
        prune(model, schedule.method, rate, scope=schedule.scope, layers=names[:-1], seed=generator)
        last = min(1.0, rate * schedule.last_layer_scale)
        prune(model, schedule.method, last, layers=names[-1:], seed=generator)
    else:
        prune(model, schedule.method, rate, scope=schedule.scope, layers=names, seed=generator)


def _measure(model: nn.Module, data: Dataset, r: int, seconds: float) -> Round:
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


def run_schedule(
    model: nn.Module,
    data: Dataset,
    dense: TrainConfig,
    schedule: Schedule,
    *,
    generator: torch.Generator,
    progress: bool = False,
    on_round: Callable[[Round], None] | None = None,
) -> list[Round]:
    """Train `model` dense, then run `schedule`; returns the metrics of every round."""
    t0 = time.perf_counter()
    rewind_to: dict[str, torch.Tensor] | None = None
    if schedule.kind == "lottery":
        if schedule.rewind_epoch == 0:
            rewind_to = snapshot(model)

        def keep(epoch: int, m: nn.Module) -> None:
            nonlocal rewind_to
            if epoch == schedule.rewind_epoch:
                rewind_to = snapshot(m)

        train(model, data, dense, generator=generator, progress=progress, callback=keep)
        if rewind_to is None:
            raise ValueError(
                f"schedule.rewind_epoch={schedule.rewind_epoch} exceeds train.epochs={dense.epochs}"
            )
    else:
        train(model, data, dense, generator=generator, progress=progress)
    rounds = [_measure(model, data, 0, time.perf_counter() - t0)]
    if on_round is not None:
        on_round(rounds[-1])
    retrain = replace(
        dense,
        epochs=schedule.retrain_epochs,
        lr_schedule=dense.lr_schedule if schedule.lr_rewind else "constant",
    )
    for r in range(1, schedule.rounds + 1):
        t0 = time.perf_counter()
        prune_round(model, schedule, generator, r)
        if rewind_to is not None:
            rewind(model, rewind_to)
        train(model, data, retrain, generator=generator, progress=progress)
        rounds.append(_measure(model, data, r, time.perf_counter() - t0))
        if on_round is not None:
            on_round(rounds[-1])
    return rounds
