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
    """How to (re)train: optimizer, learning rate schedule, batches, epochs."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    step_epochs: int = 10  # "step": multiply the LR by 0.1 every step_epochs

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"train.{name} must be a positive int, got {v!r}")
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
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """Test-set accuracy (fraction) and mean cross-entropy loss."""

    accuracy: float
    loss: float


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch mean training loss and training accuracy."""

    losses: tuple[float, ...]
    accuracies: tuple[float, ...]


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
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(config.epochs, 1)))
    if config.lr_schedule == "step":
        return float(0.1 ** (epoch // config.step_epochs))
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

    A fresh optimizer is built per call (so each retraining round starts with clean momentum /
    Adam state). `callback(epoch, model)` runs after each epoch (e.g. to snapshot weights for
    lottery-ticket rewinding). Progress bars show only if `progress` and stderr is a terminal.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    opt = make_optimizer(model, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lr_factor(config, e))
    n = data.x_train.shape[0]
    losses, accs = [], []
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
        sched.step()
        losses.append(total_loss / n)
        accs.append(correct / n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None:
            callback(epoch + 1, model)
    return TrainResult(tuple(losses), tuple(accs))


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
