"""Experiments: `run` trains, prunes and writes a results directory (configs: `training.config`).

Results directory: `results.json` (config, versions, config hash, every round's metrics, timings),
`rounds.csv`, `model.safetensors` (final weights and masks) and PNG plots (via `report`), plus
`checkpoint.safetensors`, rewritten atomically at every epoch end and round end, from which
`run(..., resume=True)` continues an interrupted run.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prunebound import report
from prunebound.checkpoint import load, save
from prunebound.deploy.shrink_report import shrink_summary
from prunebound.deploy.summary import export_summary
from prunebound.sparsity_stats import sparsity
from prunebound.training.config import Experiment, materialise
from prunebound.training.loop import NonFiniteError
from prunebound.training.resume import CHECKPOINT as CHECKPOINT  # re-exported: the run's file name
from prunebound.training.resume import read_checkpoint, write_checkpoint
from prunebound.training.runner import Round, RunProgress, run_schedule

if TYPE_CHECKING:
    from prunebound.training.distributed import DistContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What `run` measured; also written to `out_dir/results.json`."""

    experiment: Experiment
    rounds: tuple[Round, ...]
    out_dir: Path
    seconds: float
    final_sparsity: Mapping[str, Any] = field(default_factory=dict)
    distributed: Mapping[str, Any] = field(default_factory=dict)
    export: Mapping[str, Any] = field(default_factory=dict)
    shrink: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The content of results.json (`distributed` only for a multi-process run)."""
        d = {
            "config": self.experiment.to_dict(),
            "config_hash": self.experiment.hash(),
            "versions": versions(),
            "rounds": [r.to_dict() for r in self.rounds],
            "final_sparsity": dict(self.final_sparsity),
            "seconds": self.seconds,
        }
        if self.distributed:
            d["distributed"] = dict(self.distributed)
        if self.export:
            d["export"] = dict(self.export)
        if self.shrink:
            d["shrink"] = dict(self.shrink)
        return d


def versions() -> dict[str, str]:
    """Versions of what produced a result."""
    try:
        prunebound_version = importlib.metadata.version("prunebound")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        prunebound_version = "0+unknown"
    return {
        "prunebound": prunebound_version,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def run(
    experiment: Experiment,
    *,
    on_round: Callable[[Round], None] | None = None,
    write_plots: bool = True,
    resume: bool = False,
    dist: DistContext | None = None,
) -> RunResult:
    """Train, prune per the schedule, evaluate every round, and write the results directory.

    At every epoch end and round end, `out_dir/checkpoint.safetensors` is replaced atomically
    (weights, masks, optimizer state, LR-schedule position, counters, lottery snapshot, RNG
    state and the rounds so far; safetensors + JSON, no pickle). With `resume=True` the run
    continues from it (or starts afresh, with a warning, if there is none): a run killed
    mid-epoch restarts that epoch from its start and ends with the same masks and metrics as an
    uninterrupted run, bit for bit on CPU with the same number of torch threads. (Models whose
    forward draws random numbers, e.g. dropout, use torch's global RNG, which is not saved.)

    With `dist` (this rank of a process group, `prunebound.training.distributed`) the schedule runs
    data-parallel; only rank 0 writes the directory and calls `on_round`, and `results.json`
    records the world size and the largest difference between the ranks' final models
    (0.0: identical). Resuming needs `out_dir` readable by every rank (a shared file system).

    Raises:
        ValueError: the checkpoint is corrupt, or was written for another config (hash).
        NonFiniteError: training diverged; names the round and epoch and the last good
            checkpoint, which is kept.
    """
    t0 = time.perf_counter()
    exp = experiment
    model, data = materialise(exp)
    if dist is not None:  # before anything is trained or written
        dist.check_batch(exp.train.batch_size)
        model, data = dist.to_device(model, data)
    main = dist is None or dist.is_main
    out = Path(exp.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)  # before training: a bad out_dir fails at once
    ckpt = out / CHECKPOINT
    for stale in out.glob(f".{CHECKPOINT}.*.tmp") if main else ():  # a write cut short
        stale.unlink()
    state, before = None, 0.0
    if resume and ckpt.is_file():
        state, before = read_checkpoint(ckpt, model, exp)
        logger.info("resuming %s from round %d, epoch %d", ckpt, state.round, state.epoch)
    elif resume:
        logger.warning("no checkpoint %s to resume from: starting afresh", ckpt)
    logger.info("run %s (config %s) -> %s", exp.model.name, exp.hash(), out)
    g = torch.Generator().manual_seed(exp.seed)
    written = state is not None

    def checkpoint(progress: RunProgress) -> None:
        nonlocal written
        write_checkpoint(ckpt, model, progress, exp, run_seconds=before + time.perf_counter() - t0)
        written = True

    try:
        rounds = run_schedule(
            model,
            data,
            exp.train,
            exp.schedule,
            seed=g,
            progress=not exp.quiet and main,
            on_round=on_round if main else None,
            resume=state,
            on_checkpoint=checkpoint if main else None,
            dist=dist,
        )
    except NonFiniteError as e:
        e.checkpoint = str(ckpt) if written else None
        raise
    final = sparsity(model, data.input_shape).to_dict()
    info: dict[str, Any] = {}
    if dist is not None:
        info = {"world_size": dist.world_size, "backend": dist.backend}
        info["max_rank_divergence"] = dist.divergence(model)
    result = RunResult(exp, tuple(rounds), out, before + time.perf_counter() - t0, final, info)
    if not main:
        return result
    # what the pruned model is worth where it runs (not under torch.distributed: the other ranks
    # would wait at the group's teardown while rank 0 times kernels)
    if dist is None and any(r.sparsity > 0 for r in rounds):
        summary = export_summary(model, data.input_shape, path=out / "model.export.safetensors")
        result = replace(result, export=summary)
    if dist is None and exp.schedule.shrink:
        shrunk = shrink_summary(model, data.x_test[:64], path=out / "model.shrunk.safetensors")
        result = replace(result, shrink=shrunk)
    write_results(result, model)
    if write_plots:
        report.plot_run(result.to_dict(), out)
    return result


def add_export_summary(exp: Experiment) -> dict[str, Any]:
    """After a distributed run, once its process group is closed: the export summary (file
    size, measured speed-up) that rank 0 left out, added to `results.json`; returns the results.

    Rank 0 cannot measure inside the run (the other ranks would wait at the group's teardown
    while it times kernels), so the launcher (or rank 0 after the group is gone) does it here
    from the run's own `model.safetensors`.
    """
    out = Path(exp.out_dir)
    d: dict[str, Any] = json.loads((out / "results.json").read_text())
    if not any(r["sparsity"] > 0 for r in d["rounds"]):
        return d
    model, data = materialise(exp)
    load(model, out / "model.safetensors")
    d["export"] = export_summary(model, data.input_shape, path=out / "model.export.safetensors")
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(d, indent=2))
    tmp.replace(out / "results.json")
    return d


def write_results(result: RunResult, model: torch.nn.Module) -> None:
    """results.json, rounds.csv and model.safetensors into `result.out_dir`."""
    out = result.out_dir
    d = result.to_dict()
    (out / "results.json").write_text(json.dumps(d, indent=2))
    with (out / "rounds.csv").open("w", newline="") as f:
        w = csv.writer(f)
        cols = [
            "round",
            "sparsity",
            "compression",
            "accuracy",
            "loss",
            "dense_flops",
            "sparse_flops",
            "seconds",
        ]
        w.writerow(cols)
        for r in d["rounds"]:
            w.writerow([r[c] for c in cols])
    save(model, out / "model.safetensors", metadata={"config_hash": d["config_hash"]})
