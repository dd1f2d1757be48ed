"""Training and evaluation: the loops every schedule in `prunebound.schedule` is built from.

Data sets are small and held in memory, so batching is tensor slicing with a shuffling generator
passed in by the caller (no global RNG). Masks are parametrizations, so pruned weights stay exactly
zero whatever the optimizer does.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from prunebound.data import Dataset

logger = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adam", "adamw"]
LRSchedule = Literal["constant", "cosine", "step"]


@dataclass(frozen=True)
class TrainConfig:
    """How to (re)train: optimizer, learning rate schedule, batches, epochs.

    Attributes:
        epochs: passes over the training set (0 trains nothing).
        batch_size: examples per step; batches are drawn by a shuffling `torch.Generator`.
        optimizer: "sgd" (with `momentum`), "adam" or "adamw" (decoupled `weight_decay`).
        lr: the initial learning rate.
        momentum: SGD momentum (ignored by Adam/AdamW).
        weight_decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW).
        lr_schedule: "constant"; "cosine" (annealed to 0 over the schedule's horizon); "step"
            (multiplied by 0.1 every `step_epochs` epochs).
        step_epochs: period of the "step" schedule.
        lr_offset: epochs of the schedule already elapsed when this training starts: epoch e
            uses the LR of schedule epoch `lr_offset + e`. Learning-rate rewinding uses it to
            replay the tail of the dense schedule.
        lr_horizon: length in epochs of the schedule (the cosine period); default
            `lr_offset + epochs`.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    step_epochs: int = 10
    lr_offset: int = 0
    lr_horizon: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("step_epochs", 1), ("lr_offset", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"train.{name} must be an int >= {low}, got {v!r}")
        h = self.lr_horizon
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"train.lr_horizon must be an int >= 1 or None, got {h!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"train.optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine", "step"):
            raise ValueError(
                f"train.lr_schedule must be constant, cosine or step, got {self.lr_schedule!r}"
            )
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    def lr_at(self, epoch: int) -> float:
        """Learning rate used during `epoch` (0-based) of this training."""
        return self.lr * _lr_factor(self, epoch)


@dataclass(frozen=True)
class Evaluation:
    """Test-set accuracy (fraction) and mean cross-entropy loss."""

    accuracy: float
    loss: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch mean training loss, training accuracy and learning rate."""

    losses: tuple[float, ...]
    accuracies: tuple[float, ...]
    lrs: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config` names, over all parameters of `model`."""
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(config: TrainConfig, epoch: int) -> float:
    t = config.lr_offset + epoch
    horizon = config.lr_horizon or max(config.lr_offset + config.epochs, 1)
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, horizon) / horizon))
    if config.lr_schedule == "step":
        return float(0.1 ** (t // config.step_epochs))
    return 1.0


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `data.x_train` for `config.epochs` epochs.

    A fresh optimizer is built per call, so each retraining round starts with clean momentum /
    Adam state (stale moments of pruned weights would otherwise leak into the first steps).
    Pruned weights stay exactly zero whatever the optimizer or weight decay does: the masks are
    parametrizations, so the effective weight is `mask * w` at every forward.

    Args:
        model: trained in place (train mode during, left in train mode).
        data: in-memory tensors; `data.x_train` is sliced into shuffled batches.
        config: optimizer, LR schedule, epochs, batch size.
        generator: shuffles the batches (default: a fixed-seed generator, never the global RNG).
        progress: a tqdm bar over epochs, shown only if stderr is a terminal.
        callback: `callback(epoch, model)` after each epoch (1-based), e.g. to snapshot weights
            for lottery-ticket rewinding.

    Returns:
        Per-epoch training loss, accuracy and learning rate.

    Raises:
        RuntimeError: the loss became NaN or infinite (learning rate too high).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    opt = make_optimizer(model, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lr_factor(config, e))
    n = data.x_train.shape[0]
    losses: list[float] = []
    accs: list[float] = []
    lrs: list[float] = []
    bar = tqdm(
        range(config.epochs),
        desc="train",
        leave=False,
        disable=not (progress and sys.stderr.isatty()),
    )
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=g)
        total_loss, correct = 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = order[i : i + config.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training loss became {loss.item()} at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total_loss += loss.item() * idx.numel()
            correct += int((out.argmax(1) == y).sum())
        lrs.append(float(opt.param_groups[0]["lr"]))
        sched.step()
        losses.append(total_loss / n)
        accs.append(correct / n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None:
            callback(epoch + 1, model)
        logger.debug("epoch %d: loss %.4f, train accuracy %.4f", epoch + 1, losses[-1], accs[-1])
    return TrainResult(tuple(losses), tuple(accs), tuple(lrs))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 2048) -> Evaluation:
    """Accuracy and mean cross-entropy on `data.x_test` (eval mode; restores the mode after)."""
    was_training = model.training
    model.eval()
    n = data.x_test.shape[0]
    loss, correct = 0.0, 0
    for i in range(0, n, batch_size):
        x, y = data.x_test[i : i + batch_size], data.y_test[i : i + batch_size]
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    return Evaluation(accuracy=correct / n, loss=loss / n)
