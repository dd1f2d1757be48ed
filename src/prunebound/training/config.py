"""Experiment configs: frozen dataclasses loadable from TOML, checked key by key.

`Experiment` (with `ModelSpec`, `DataSpec`, `TrainConfig`, `Schedule`) is everything a run needs;
`Experiment.from_toml` refuses unknown keys and wrong types naming the key, and checks
`model.args` against the model builder. `materialise` builds the model and data it names.
"""

from __future__ import annotations

import collections.abc
import hashlib
import inspect
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebound._check import check_int, is_int
from prunebound.data import DATASETS, Dataset, load_dataset
from prunebound.layer_types import CONV
from prunebound.models import MODELS, build_model
from prunebound.training.loop import TrainConfig
from prunebound.training.schedule import Schedule


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
        for section, defaults in _LATER_DEFAULTS.items():  # older configs keep their hash
            for key, default in defaults.items():
                if d[section].get(key) == default:
                    del d[section][key]
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


#: fields added after configs were first hashed: left out of the hash while at their default
_LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"objective": "ce", "temperature": 4.0, "distill_weight": 0.9},
    "schedule": {"every": 100, "begin_step": 0, "calibration": 1024},
}

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


def load_data(spec: DataSpec, seed: int) -> Dataset:
    """Load the data set a spec names."""
    data = load_dataset(spec.name, data_dir=spec.data_dir, seed=seed)
    if spec.max_train is not None or spec.max_test is not None:
        data = data.subsample(spec.max_train, spec.max_test, seed=seed)
    return data


def materialise(exp: Experiment) -> tuple[nn.Module, Dataset]:
    """The model (initialised from `exp.seed`) and the data set an experiment names, the data
    shaped for the model: images for a convolutional model, flat vectors otherwise."""
    model = build_model(exp.model.name, seed=exp.seed, **dict(exp.model.args))
    data = load_data(exp.data, exp.seed)
    convolutional = any(isinstance(m, CONV) for m in model.modules())
    data = data.image() if convolutional else data.flat()
    check_input(model, data, exp)
    return model, data


class InputShapeError(ValueError):
    """The model does not take the data set's samples (found before any training)."""


def check_input(model: nn.Module, data: Dataset, exp: Experiment) -> None:
    """Run one training sample through the model (eval mode, no grad); if it does not fit,
    raise InputShapeError saying what the model expects and what to change."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(data.x_train[:1])
    except RuntimeError as e:
        first = next((m for m in model.modules() if isinstance(m, (nn.Linear, *CONV))), None)
        shape = tuple(data.input_shape)
        if isinstance(first, nn.Linear):
            wants = f"{first.in_features} input features"
            has = f"{int(torch.tensor(shape).prod())} features per sample"
        elif first is not None:
            wants = f"{first.in_channels} input channels"
            has = f"samples of shape {shape}"
        else:
            wants, has = "other inputs", f"samples of shape {shape}"
        raise InputShapeError(
            f"model {exp.model.name!r} (model.args {dict(exp.model.args)}) takes {wants}, but "
            f"data set {exp.data.name!r} has {has}: change the model's input size "
            "(model.args, e.g. in_features) or the data set (data.name / --dataset); "
            f"torch said: {str(e).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)
