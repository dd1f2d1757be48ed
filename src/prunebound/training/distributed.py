"""Distributed retraining on torch.distributed: DistributedDataParallel over ranks that each take
a slice of the same global batch.

Every rank holds the whole (small, in-memory) data set and the same shuffling generator, so all
ranks draw the same global batch; rank r trains on its slice. The loss is scaled so that DDP's
gradient average equals the gradient of the global batch's mean loss, so a run on N ranks
matches a one-process run with the same `batch_size` up to floating-point reduction order.
Pruning is computed on every rank (keeping the generators in step) and rank 0's masks are then
broadcast, so masks are identical by construction; results and checkpoints are written by rank 0.

Masks are `torch.nn.utils.parametrize` parametrizations: DDP sees the underlying
`parametrizations.weight.original` parameters, whose gradient is zero at pruned entries, and the
effective weight `original * mask` stays exactly zero there whatever the all-reduce does.

This module is what runs inside a rank (`DistContext`, `process_group`, `env_ranks`);
`training.launch` starts the ranks: `launch(fn, nproc)` spawns local processes with a file
rendezvous, and `run_distributed` runs an experiment as `prunebound run CONFIG --nproc N` or
under `torchrun` (see docs/distributed.md).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Literal, get_args

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunebound._check import check_choice, check_int, in_interval, is_float, is_int
from prunebound._masks import Mask, mask_module, prunable_layers, set_mask
from prunebound.data import Dataset

logger = logging.getLogger(__name__)

Backend = Literal["auto", "gloo", "nccl"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


def check_timeout(timeout: object) -> None:
    """Raise ValueError unless `timeout` is a number of seconds > 0."""
    if not (is_float(timeout, ints=True) and in_interval(float(timeout), 0, math.inf, "neither")):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")


def check_world_size(batch_size: int, world_size: int) -> None:
    """Raise ValueError unless `world_size` (>= 1) divides `batch_size` (each rank's share)."""
    check_int("world_size", world_size, 1)
    if batch_size % world_size != 0:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the world size {world_size}: "
            f"every rank must take an equal share of the global batch (use a batch size that "
            f"is a multiple of {world_size})"
        )


@dataclass(frozen=True)
class DistContext:
    """This process's place in an initialised default process group.

    Attributes:
        rank: global rank in [0, world_size).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU with nccl).
        device: where the model and batches live (cpu for gloo, cuda:local_rank for nccl).
        backend: "gloo" or "nccl".
    """

    rank: int
    world_size: int
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"

    def __post_init__(self) -> None:
        check_int("world_size", self.world_size, 1)
        if not is_int(self.rank) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {self.rank!r}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes results and checkpoints."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """Raise ValueError unless the world size divides `batch_size`."""
        check_world_size(batch_size, self.world_size)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch of indices (equal slices; the last, shorter
        batch of an epoch is split as evenly as possible)."""
        return idx.tensor_split(self.world_size)[self.rank]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, global_count: int) -> torch.Tensor:
        """Cross-entropy of this rank's slice, scaled so that DDP's average over ranks is the
        mean over the `global_count` examples of the global batch (also for uneven slices)."""
        total = nn.functional.cross_entropy(logits, y, reduction="sum")
        return total * (self.world_size / global_count)

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """`model` in DDP; rank 0's parameters and buffers (masks included) are copied to all.

        Buffers are not re-broadcast at every forward: masks change only between rounds (where
        `broadcast_masks` syncs them) and BatchNorm statistics are averaged at epoch ends
        (`average_buffers`).
        """
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    @torch.no_grad()
    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers other than masks over the ranks, in place.

        These are BatchNorm running statistics, each rank's running average over its own
        slices. Averaging them gives the running mean of the global batches exactly, for equal
        slices. The running variance misses the spread between slices, so it comes out
        slightly low. Masks and integer buffers are identical on every rank already.
        """
        for m in model.modules():
            if isinstance(m, Mask):
                continue
            for b in m.buffers(recurse=False):
                if b.is_floating_point():
                    tdist.all_reduce(b)
                    b.div_(self.world_size)

    def all_sum(self, *values: float) -> list[float]:
        """Sum each value over all ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def broadcast_masks(self, model: nn.Module) -> int:
        """Install rank 0's masks on every rank; returns how many mask entries this rank had
        different (0 when pruning was deterministic, as it should be).

        Raises:
            RuntimeError: ranks disagree on which layers are masked (they ran different code).
        """
        layers = list(prunable_layers(model).values())
        has = torch.tensor(
            [mask_module(m) is not None for m in layers], dtype=torch.int64, device=self.device
        )
        ref = has.clone()
        tdist.broadcast(ref, src=0)
        if not torch.equal(has, ref):
            raise RuntimeError(f"rank {self.rank} has masks on other layers than rank 0")
        changed = 0
        for m in layers:
            mm = mask_module(m)
            if mm is None:
                continue
            keep = mm.mask.clone()
            tdist.broadcast(keep, src=0)
            changed += int((keep != mm.mask).sum())
            set_mask(m, keep)
        if changed:
            logger.warning("rank %d: %d mask entries differed from rank 0's", self.rank, changed)
        return changed

    def divergence(self, model: nn.Module) -> float:
        """Largest difference between ranks over every parameter and buffer (masks included);
        0.0 means the ranks hold bit-identical models."""
        worst = 0.0
        for t in model.state_dict().values():  # one tensor at a time: bounded extra memory
            hi = t.detach().to(self.device, torch.float64).flatten()
            lo = hi.clone()
            tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
            tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
            if hi.numel():
                worst = max(worst, float((hi - lo).max()))
        return worst

    def to_device(self, model: nn.Module, data: Dataset) -> tuple[nn.Module, Dataset]:
        """Move the model and data set to `self.device` (a no-op on CPU)."""
        if self.device.type == "cpu":
            return model, data
        d = self.device
        moved = replace(
            data,
            x_train=data.x_train.to(d),
            y_train=data.y_train.to(d),
            x_test=data.x_test.to(d),
            y_test=data.y_test.to(d),
        )
        return model.to(d), moved


def _resolve_backend(backend: Backend, local_rank: int) -> tuple[str, torch.device]:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"backend 'nccl' needs a CUDA device for local rank {local_rank}; "
                f"{torch.cuda.device_count()} visible"
            )
        return backend, torch.device("cuda", local_rank)
    return backend, torch.device("cpu")


@contextmanager
def process_group(
    *,
    rank: int,
    world_size: int,
    init_method: str = "env://",
    local_rank: int = 0,
    backend: Backend = "auto",
    timeout: float = 300.0,
) -> Iterator[DistContext]:
    """Open the default process group for the block; yields this process's `DistContext`.

    Args:
        rank, world_size, local_rank: this process's place (torchrun sets RANK, WORLD_SIZE and
            LOCAL_RANK; the CLI passes them in).
        init_method: "env://" (torchrun's MASTER_ADDR/MASTER_PORT), "tcp://host:port" or
            "file:///path".
        backend: "gloo" (CPU), "nccl" (one GPU per local rank) or "auto" (nccl if CUDA).
        timeout: seconds a collective may wait for the other ranks before failing, so a rank
            that vanishes (a lost machine) stops the others instead of hanging them.
    """
    check_timeout(timeout)
    name, device = _resolve_backend(backend, local_rank)
    ctx = DistContext(rank, world_size, local_rank, device, name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(
        name,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        yield ctx
        tdist.barrier()  # leave together: no rank tears down while a peer still communicates
    finally:
        gc.collect()  # DDP reducers in reference cycles release the group while Python runs
        tdist.destroy_process_group()


@dataclass(frozen=True)
class EnvRanks:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them."""

    rank: int
    world_size: int
    local_rank: int


def env_ranks(env: Mapping[str, str]) -> EnvRanks | None:
    """The ranks torchrun put in `env` (pass `os.environ`), or None outside torchrun."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        r = EnvRanks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ValueError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be ints, got {env['RANK']!r}/"
            f"{env['WORLD_SIZE']!r}/{env.get('LOCAL_RANK')!r}"
        ) from None
    if r.world_size < 1 or not 0 <= r.rank < r.world_size:
        raise ValueError(f"RANK={r.rank} must be in [0, WORLD_SIZE={r.world_size})")
    return r
