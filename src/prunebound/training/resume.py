"""Run checkpoints: everything `experiment.run` needs to continue an interrupted run exactly.

One safetensors file (`prunebound.checkpoint.save`, so it is written atomically, carries a
SHA-256 of its tensors, and `pb.load` reads it as a model): the weights and masks, plus
`__state__.*` tensors (the generator's state as uint8, optimizer moments, the lottery snapshot)
and JSON metadata (counters, the LR-schedule position, the optimizer's non-tensor state, the
rounds measured so far, the config and its hash). No pickle anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from prunebound._files import flatten_state, unflatten_state
from prunebound.checkpoint import load, read_state, save
from prunebound.training.loop import TrainResult, TrainState
from prunebound.training.runner import Round, RunProgress

CHECKPOINT = "checkpoint.safetensors"
_CHECKPOINT_VERSION = 1


class Config(Protocol):
    """What a checkpoint records of an experiment (`prunebound.training.experiment.Experiment`)."""

    def hash(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def write_checkpoint(
    path: Path, model: torch.nn.Module, progress: RunProgress, exp: Config, *, run_seconds: float
) -> None:
    """Write a run checkpoint atomically: model file + `__state__.*` tensors + JSON metadata."""
    extra = {"generator": progress.generator}
    train = None
    if progress.train is not None:
        opt, opt_tensors = flatten_state(progress.train.optimizer, "optimizer.")
        sched, sched_tensors = flatten_state(progress.train.scheduler, "scheduler.")
        extra |= opt_tensors | sched_tensors
        train = {
            "epoch": progress.train.epoch,
            "optimizer": opt,
            "scheduler": sched,
            "history": progress.train.history.to_dict(),
        }
    if progress.rewind_to is not None:
        extra |= {f"rewind.{k}": t for k, t in progress.rewind_to.items()}
    if progress.teacher is not None:
        extra |= {f"teacher.{k}": t for k, t in progress.teacher.items()}
    info = {
        "version": _CHECKPOINT_VERSION,
        "round": progress.round,
        "epoch": progress.epoch,
        "rounds": [r.to_dict() for r in progress.rounds],
        "train": train,
        "rewind": progress.rewind_to is not None,
        "teacher": progress.teacher is not None,
        "seconds": progress.seconds,
        "run_seconds": run_seconds,
        "config": exp.to_dict(),
    }
    meta = {"config_hash": exp.hash(), "progress": json.dumps(info)}
    save(model, path, metadata=meta, extra=extra)


def read_checkpoint(path: Path, model: torch.nn.Module, exp: Config) -> tuple[RunProgress, float]:
    """Check a run checkpoint against `exp`, load its weights and masks into `model`, and return
    its `RunProgress` and the run's seconds so far. ValueError (model untouched) if it is corrupt,
    not a run checkpoint, or written for another config."""
    extra, meta = read_state(path)
    if "progress" not in meta or "generator" not in extra:
        raise ValueError(f"{path} is not a prunebound run checkpoint")
    info = json.loads(meta["progress"])
    if info.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format {info.get('version')!r} is not supported")
    if meta.get("config_hash") != exp.hash():
        changed = _diff(info.get("config", {}), json.loads(json.dumps(exp.to_dict())))
        raise ValueError(
            f"{path} was written by config {meta.get('config_hash')}, not by this config "
            f"{exp.hash()} (changed: {', '.join(changed[:5]) or '?'}); refusing to resume: "
            "use another out_dir, or run without resume to start afresh"
        )
    load(model, path)
    train = None
    if info["train"] is not None:
        t = info["train"]
        h = t["history"]
        train = TrainState(
            t["epoch"],
            unflatten_state(t["optimizer"], extra),
            unflatten_state(t["scheduler"], extra),
            TrainResult(tuple(h["losses"]), tuple(h["accuracies"]), tuple(h["lrs"])),
        )
    rewind_to = None
    if info["rewind"]:
        rewind_to = {k[7:]: v for k, v in extra.items() if k.startswith("rewind.")}
    teacher = None
    if info.get("teacher"):
        teacher = {k[8:]: v for k, v in extra.items() if k.startswith("teacher.")}
    progress = RunProgress(
        round=info["round"],
        epoch=info["epoch"],
        rounds=tuple(Round(**r) for r in info["rounds"]),
        train=train,
        rewind_to=rewind_to,
        generator=extra["generator"],
        seconds=info["seconds"],
        teacher=teacher,
    )
    return progress, float(info["run_seconds"])


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (`a: old -> new`)."""
    out: list[str] = []
    for k in sorted((set(old) | set(new)) - {"out_dir", "quiet"}):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
