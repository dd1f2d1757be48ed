"""Experiments: a frozen config (loadable from TOML) and `run`, which writes a results directory.

Results directory: `results.json` (config, versions, config hash, every round's metrics, timings),
`rounds.csv`, `model.safetensors` (final weights and masks) and PNG plots (via `report`), plus
`checkpoint.safetensors`, rewritten atomically at every epoch end and round end, from which
`run(..., resume=True)` continues an interrupted run.
"""

from __future__ import annotations

import collections.abc
import csv
import hashlib
import importlib.metadata
import inspect
import json
import logging
import platform
import time
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prunebound import report
from prunebound._check import check_int, is_int
from prunebound._masks import sparsity
from prunebound.checkpoint import load, save
from prunebound.data import DATASETS, Dataset, load_dataset
from prunebound.deploy.summary import export_summary
from prunebound.layer_types import CONV
from prunebound.models import MODELS, build_model
from prunebound.training.loop import NonFiniteError, TrainConfig
from prunebound.training.resume import CHECKPOINT as CHECKPOINT  # re-exported: the run's file name
from prunebound.training.resume import read_checkpoint, write_checkpoint
from prunebound.training.schedule import Progress, Round, Schedule, run_schedule

if TYPE_CHECKING:
    from prunebound.training.distributed import DistContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model from `prunebound.models.MODELS` and its keyword arguments."""

    name: str = "lenet_300_100"
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {"name": self.name, "args": dict(self.args)}


@dataclass(frozen=True)
class DataSpec:
    """A data set by name ("digits", "fashion-mnist", "mnist", "idx"), optionally subsampled."""

    name: str = "digits"
    data_dir: str | None = None
    max_train: int | None = None
    max_test: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name.lower().replace("_", "-") not in DATASETS:
            raise ValueError(f"data.name must be one of {', '.join(DATASETS)}, got {self.name!r}")
        for key in ("max_train", "max_test"):
            check_int(f"data.{key}", getattr(self, key), 1, optional=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Experiment:
    """Everything a run needs; `run(experiment)` is reproducible from this alone."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: Schedule = field(default_factory=Schedule)
    seed: int = 0
    out_dir: str = "runs/experiment"
    quiet: bool = False

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts for JSON (the same shape `from_dict` and the TOML files take)."""
        d = asdict(self)
        d["model"]["args"] = dict(self.model.args)
        return d

    def hash(self) -> str:
        """Short hash of the config (without out_dir/quiet), to tell runs apart."""
        d = self.to_dict()
        d.pop("out_dir"), d.pop("quiet")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Experiment:
        """Build from nested dicts; unknown keys and wrong types are refused, naming the key.

        `model.args` are checked against the model builder's signature and by building the
        model once on the meta device (no memory, no RNG use), so a bad value fails here rather
        than when the run starts.
        """
        exp: Experiment = _build(cls, d, "")
        check_model_spec(exp.model)
        return exp

    @classmethod
    def from_toml(cls, path: str | Path) -> Experiment:
        """Load a TOML config (see configs/*.toml)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
        return cls.from_dict(d)


_NESTED = {"model": ModelSpec, "data": DataSpec, "train": TrainConfig, "schedule": Schedule}


def _type_ok(value: Any, hint: Any, *, ints: bool = True) -> bool:
    """Whether a TOML value fits a type hint (`ints`: an int is accepted where float is)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h, ints=ints) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, float) or (ints and is_int(value))
    if hint is int:
        return is_int(value)
    if origin in (tuple, collections.abc.Sequence, list):  # TOML arrays arrive as lists
        args = typing.get_args(hint)
        return isinstance(value, list | tuple) and all(_type_ok(v, args[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _build(cls: Any, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"config: {prefix.rstrip('.') or 'root'} must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in d:
        if key not in names:
            raise ValueError(f"config: unknown key {prefix + key!r}; allowed: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        if cls is Experiment and f.name in _NESTED:
            kwargs[f.name] = _build(_NESTED[f.name], value, f"{prefix}{f.name}.")
            continue
        if not _type_ok(value, hints[f.name]):
            raise ValueError(
                f"config: {prefix}{f.name} has the wrong type or value: {value!r} "
                f"(expected {hints[f.name]})"
            )
        if is_int(value) and not _type_ok(value, hints[f.name], ints=False):
            value = float(value)  # TOML `1` where a float is expected
        if isinstance(value, list):
            value = tuple(float(v) if isinstance(v, int) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


def check_model_spec(spec: ModelSpec) -> None:
    """Refuse, naming the key, a model name or `model.args` its builder would not accept.

    Unknown and missing keys are found from the builder's signature, wrong types from its
    annotations; then the model is built once on the meta device (parameters without storage,
    so even a large model costs nothing), which catches values the builder itself refuses.
    """
    if spec.name not in MODELS:
        raise ValueError(
            f"config: model.name: unknown model {spec.name!r}; valid names: "
            f"{', '.join(sorted(MODELS))}"
        )
    builder = MODELS[spec.name]
    params = inspect.signature(builder).parameters
    named = {
        n: p
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    any_key = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # unresolvable annotations of a user's builder: skip the type check
        hints = {}
    args = dict(spec.args)
    for key, value in args.items():
        if key not in named and not any_key:
            raise ValueError(
                f"config: unknown key 'model.args.{key}' for model {spec.name!r}; "
                f"allowed: {sorted(named)}"
            )
        hint = hints.get(key)
        if hint is not None and not _type_ok(value, hint):
            raise ValueError(
                f"config: model.args.{key} has the wrong type or value: {value!r} (expected {hint})"
            )
    for key, p in named.items():
        if p.default is inspect.Parameter.empty and key not in args:
            raise ValueError(f"config: model.args.{key} is required for model {spec.name!r}")
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            builder(**args)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        culprit = next((k for k in args if k in msg), None) or (
            next(iter(args)) if len(args) == 1 else None
        )
        where = f"model.args.{culprit}" if culprit else "model.args"
        raise ValueError(f"config: {where}: {msg} (model {spec.name!r})") from None


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


def load_data(spec: DataSpec, seed: int) -> Dataset:
    """Load the data set a spec names."""
    data = load_dataset(spec.name, data_dir=spec.data_dir, seed=seed)
    if spec.max_train is not None or spec.max_test is not None:
        data = data.subsample(spec.max_train, spec.max_test, seed=seed)
    return data


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
    model = build_model(exp.model.name, seed=exp.seed, **dict(exp.model.args))
    data = load_data(exp.data, exp.seed)
    convolutional = any(isinstance(m, CONV) for m in model.modules())
    data = data.image() if convolutional else data.flat()
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

    def checkpoint(progress: Progress) -> None:
        nonlocal written
        write_checkpoint(ckpt, model, progress, exp, run_seconds=before + time.perf_counter() - t0)
        written = True

    try:
        rounds = run_schedule(
            model,
            data,
            exp.train,
            exp.schedule,
            generator=g,
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
    model = build_model(exp.model.name, seed=exp.seed, **dict(exp.model.args))
    load(model, out / "model.safetensors")
    convolutional = any(isinstance(m, CONV) for m in model.modules())
    data = load_data(exp.data, exp.seed)
    data = data.image() if convolutional else data.flat()
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
