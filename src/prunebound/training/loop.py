"""Training and evaluation: the loops every schedule (`prunebound.training.schedule`) is built from.

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
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from prunebound._check import Seed, as_generator, check_choice, check_float, check_int, finite
from prunebound.data import Dataset

if TYPE_CHECKING:
    from prunebound.training.distributed import DistContext

logger = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adam", "adamw"]
LRSchedule = Literal["constant", "cosine", "step"]
Objective = Literal["ce", "distill"]


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
        objective: "ce" (cross-entropy on the labels) or "distill" (knowledge distillation,
            Hinton et al. 2015, towards a teacher: the original dense model when a schedule
            retrains): `distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
            + (1 - distill_weight) * CE`, averaged over the batch. A schedule's dense run always
            uses "ce" (there is no teacher yet).
        temperature: T of "distill" (softened logits), > 0.
        distill_weight: share of the KL term in [0, 1] (1: pure distillation, no labels).
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
    objective: Objective = "ce"
    temperature: float = 4.0
    distill_weight: float = 0.9

    def __post_init__(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("step_epochs", 1), ("lr_offset", 0)):
            check_int(f"train.{name}", getattr(self, name), low)
        check_int("train.lr_horizon", self.lr_horizon, 1, optional=True)
        check_choice("train.optimizer", self.optimizer, get_args(Optimizer))
        check_choice("train.lr_schedule", self.lr_schedule, get_args(LRSchedule))
        for name in ("lr", "momentum", "weight_decay"):
            check_float(f"train.{name}", getattr(self, name), 0, closed="left", ints=True)
        check_choice("train.objective", self.objective, get_args(Objective))
        check_float("train.temperature", self.temperature, 0, closed="neither", ints=True)
        check_float("train.distill_weight", self.distill_weight, 0, 1, ints=True)

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


class NonFiniteError(RuntimeError):
    """Training diverged: the loss, or a weight at an epoch end, became NaN or infinite.

    `round` (set by `run_schedule`; 0 is dense training) and `checkpoint` (set by
    `experiment.run`: the last good checkpoint, which is kept) refine the message.
    """

    def __init__(self, what: str, *, epoch: int, step: int | None = None) -> None:
        super().__init__(what)
        self.what, self.epoch, self.step = what, epoch, step
        self.round: int | None = None
        self.checkpoint: str | None = None

    def __str__(self) -> str:
        where = f"epoch {self.epoch}" + (f" (step {self.step})" if self.step is not None else "")
        if self.round is not None:
            where = f"round {self.round}{' (dense training)' if self.round == 0 else ''}, {where}"
        msg = f"{self.what} in {where}: training stopped; lower the learning rate?"
        if self.checkpoint is not None:
            msg += f" The last good checkpoint is kept: {self.checkpoint}"
        return msg


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch mean training loss, training accuracy and learning rate."""

    losses: tuple[float, ...]
    accuracies: tuple[float, ...]
    lrs: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class TrainState:
    """A `train` call after `epoch` epochs: with the model, enough to continue it bit for bit.

    `optimizer` and `scheduler` are the `state_dict()`s of the optimizer and of its LambdaLR (the
    LR-schedule position). Those from `train(on_epoch=...)` share tensors with the live
    optimizer: write or copy them before training goes on.
    """

    epoch: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: TrainResult


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


def distill_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    weight: float,
) -> torch.Tensor:
    """Distillation objective summed over the batch: `weight * T^2 * KL(p_teacher || p_student)`
    on logits softened by T, plus `(1 - weight) * cross-entropy` on the labels."""
    t = temperature
    student = nn.functional.log_softmax(logits / t, dim=1)
    teacher = nn.functional.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")
    loss = weight * t * t * kl
    if weight < 1:
        loss = loss + (1 - weight) * nn.functional.cross_entropy(logits, labels, reduction="sum")
    return loss


def _distill_summed(
    config: TrainConfig,
    out: torch.Tensor,
    y: torch.Tensor,
    teacher: nn.Module | None,
    x: torch.Tensor,
) -> torch.Tensor:
    assert teacher is not None
    with torch.no_grad():
        target = teacher(x)
    return distill_loss(
        out, target, y, temperature=config.temperature, weight=config.distill_weight
    )


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of `n` examples (the last batch may be shorter)."""
    return -(-n // batch_size)


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    seed: Seed = 0,
    progress: bool = False,
    callback: Callable[[int, nn.Module], None] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    start: TrainState | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
    dist: DistContext | None = None,
    teacher: nn.Module | None = None,
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
        seed: shuffles the batches: an int, a `torch.Generator` (advanced in place) or None for
            fresh OS entropy; default 0 (reproducible), never the global RNG.
        progress: a tqdm bar over epochs, shown only if stderr is a terminal.
        callback: `callback(epoch, model)` after each epoch (1-based), e.g. to snapshot weights
            for lottery-ticket rewinding.
        on_step: `on_step(step, model)` after each optimizer step; `step` counts from 1 over
            the whole run (epoch e's steps follow the e - 1 full epochs before it), e.g. to
            snapshot the weights at iteration k.
        start: continue an interrupted call from its `TrainState` (the model must hold the
            weights and masks of that moment, the generator of `seed` its state then): the optimizer
            and LR schedule resume where they were, and the result covers all epochs.
        on_epoch: `on_epoch(state)` after each epoch (after `callback`), e.g. to checkpoint.
        dist: train data-parallel (DDP) as this rank of a process group: every rank draws the
            same global batch and trains on its slice (see `prunebound.training.distributed`).
            Raises ValueError before training if the world size does not divide the batch size.
        teacher: the model `objective="distill"` trains towards (run in eval mode, no grad);
            required by that objective, ignored by "ce".

    Returns:
        Per-epoch training loss, accuracy and learning rate.

    Raises:
        NonFiniteError: the loss, or a weight at an epoch end, became NaN or infinite (learning
            rate too high); nothing of the failed epoch reaches `callback` or `on_epoch`.
    """
    if dist is not None:
        dist.check_batch(config.batch_size)
    if config.objective == "distill" and teacher is None:
        raise ValueError("train.objective='distill' needs a teacher model (train(teacher=...))")
    if teacher is not None:
        teacher.eval()
    world = 1 if dist is None else dist.world_size
    g = as_generator(seed)
    opt = make_optimizer(model, config)
    net = model if dist is None else dist.wrap(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: _lr_factor(config, e))
    n = data.x_train.shape[0]
    per_epoch = steps_per_epoch(n, config.batch_size)
    losses: list[float] = []
    accs: list[float] = []
    lrs: list[float] = []
    if start is not None:
        if not 0 <= start.epoch <= config.epochs:
            raise ValueError(f"start.epoch must be in [0, {config.epochs}], got {start.epoch}")
        opt.load_state_dict(start.optimizer)
        sched.load_state_dict(start.scheduler)
        losses, accs = list(start.history.losses), list(start.history.accuracies)
        lrs = list(start.history.lrs)
    bar = tqdm(
        range(start.epoch if start is not None else 0, config.epochs),
        desc="train",
        leave=False,
        disable=not (progress and sys.stderr.isatty()),
    )
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=g)
        total_loss, correct = 0.0, 0
        for step, i in enumerate(range(0, n, config.batch_size), 1):
            idx = order[i : i + config.batch_size]
            mine = idx if dist is None else dist.shard(idx)
            x, y = data.x_train[mine], data.y_train[mine]
            out = net(x)
            if config.objective == "distill":  # summed, scaled as dist.loss scales
                loss = _distill_summed(config, out, y, teacher, x) * (world / idx.numel())
            elif dist is None:
                loss = nn.functional.cross_entropy(out, y)
            else:  # scaled so that DDP's mean over ranks is the global batch's mean
                loss = dist.loss(out, y, idx.numel())
            if not torch.isfinite(loss):
                what = f"training loss became {loss.item()}"
                raise NonFiniteError(what, epoch=epoch + 1, step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if on_step is not None:
                on_step(epoch * per_epoch + step, model)
            total_loss += loss.item() * idx.numel()
            correct += int((out.argmax(1) == y).sum())
        for name, p in model.named_parameters():  # the last step may have broken a weight
            if not finite(p.detach()):
                raise NonFiniteError(f"parameter {name!r} became NaN or infinite", epoch=epoch + 1)
        if dist is not None:  # this rank's sums -> global (its loss terms carry world_size)
            total_loss, all_correct = dist.all_sum(total_loss / dist.world_size, correct)
            correct = round(all_correct)
            dist.average_buffers(model)  # BatchNorm statistics of each rank's slices
        lrs.append(float(opt.param_groups[0]["lr"]))
        sched.step()
        losses.append(total_loss / n)
        accs.append(correct / n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None:
            callback(epoch + 1, model)
        if on_epoch is not None:
            history = TrainResult(tuple(losses), tuple(accs), tuple(lrs))
            on_epoch(TrainState(epoch + 1, opt.state_dict(), sched.state_dict(), history))
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
