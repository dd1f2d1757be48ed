"""Argparse value types and the arguments several commands share (data sets, checkpoints)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from prunebound.checkpoint import load
from prunebound.data import Dataset, load_dataset
from prunebound.layer_types import CONV
from prunebound.methods import get_method
from prunebound.models import MODELS, build_model
from prunebound.training.config import ModelSpec, check_model_spec


class UsageError(Exception):
    """A bad combination of arguments found by a handler: exit 2 with the command's usage."""


def float_where(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a float with `ok(value)` (NaN never passes), else "expected ..."."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not ok(v):  # comparisons with NaN are False: refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    parse.__name__ = expected
    return parse


fraction = float_where(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
sparsity = float_where(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")  # 1 prunes everything
open_unit = float_where(lambda v: 0.0 < v < 1.0, "a number in (0, 1)")  # a probability
positive_float = float_where(lambda v: v > 0.0, "a number > 0")


def key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value parsed as JSON where it is JSON (else kept as a string)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def name_count(text: str) -> tuple[str, int]:
    """NAME=N with N an int >= 0 (an exact count of units for one layer)."""
    name, sep, value = text.partition("=")
    try:
        count = int(value)
    except ValueError:
        count = -1
    if not sep or not name or count < 0:
        raise argparse.ArgumentTypeError(f"expected LAYER=N with N an int >= 0, got {text!r}")
    return name, count


def names(text: str) -> list[str]:
    """Comma-separated layer names or glob patterns, e.g. 1,3 or 'features.*'."""
    out = [t.strip() for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names, got {text!r}")
    return out


def ints(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints, e.g. 784,300,100,10."""
    try:
        v = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return v


def widths(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints with at least two entries (an MLP's n0,...,nL)."""
    v = ints(text)
    if len(v) < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least two widths (inputs, ..., outputs), got {text!r}"
        )
    return v


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an int >= lo."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}")
        return v

    parse.__name__ = f"int >= {lo}"
    return parse


nonneg_int = int_at_least(0)
pos_int = int_at_least(1)


def method(text: str) -> str:
    """A key of prunebound.METHODS (checked when parsing, so registered methods count)."""
    try:
        get_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_name(text: str) -> str:
    """A key of prunebound.models.MODELS."""
    if text not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; valid names: {', '.join(sorted(MODELS))}"
        )
    return text


def add_data_args(p: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    """--dataset and --data-dir."""
    p.add_argument(
        "--dataset",
        default=default,
        choices=["digits", "fashion-mnist", "mnist", "idx"],
        help="data set" + (f" (default {default})" if default else " (overrides data.name)"),
    )
    p.add_argument(
        "--data-dir",
        help="MNIST-format IDX directory (needed for mnist/idx; fashion-mnist defaults to "
        "/usr/share/datasets/fashion-mnist)",
    )


def dataset_for(model: nn.Module, args: argparse.Namespace) -> Dataset:
    """--dataset (and --data-dir) loaded in the model's input layout: images for a model with
    convolutions, flat vectors otherwise."""
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    return data.image() if any(isinstance(m, CONV) for m in model.modules()) else data.flat()


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT, --model (inferred from the results.json beside it) and --model-arg."""
    p.add_argument("checkpoint", help="safetensors checkpoint written by prunebound")
    p.add_argument(
        "--model",
        type=model_name,
        help="model name (prunebound.models.MODELS); default: the model of the results.json "
        "next to the checkpoint",
    )
    p.add_argument("--model-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE")


class ModelNotInferredError(ValueError):
    """No --model, and no usable results.json next to the checkpoint to take it from."""


def model_spec(
    ckpt: Path, name: str | None, model_args: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The model (name, args) of a checkpoint: `name` if given, else the results.json's beside it.

    `model_args` (from --model-arg) override the inferred args. Raises ModelNotInferredError.
    """
    if name is not None:
        return name, model_args
    results = ckpt.parent / "results.json"
    if not results.is_file():
        raise ModelNotInferredError(f"--model is required: no results.json next to {ckpt}")
    try:
        spec = json.loads(results.read_text())["config"]["model"]
        name, inferred = spec["name"], spec.get("args", {})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelNotInferredError(
            f"--model is required: {results} has no config.model.name (not a prunebound "
            "results file?)"
        ) from None
    if not isinstance(name, str) or not isinstance(inferred, dict):
        raise ModelNotInferredError(f"--model is required: {results} has a malformed config.model")
    return name, {**inferred, **model_args}


def load_checkpoint(args: argparse.Namespace) -> nn.Module:
    """The model named by --model (or inferred) with the checkpoint's weights and masks."""
    ckpt = Path(args.checkpoint)
    try:
        name, model_args = model_spec(ckpt, args.model, dict(args.model_arg))
    except ModelNotInferredError as e:
        raise UsageError(f"{e}; pass --model NAME (and --model-arg KEY=VALUE as needed)") from None
    try:
        check_model_spec(ModelSpec(name, model_args))
    except ValueError as e:  # a bad --model-arg (or one inferred from results.json)
        raise UsageError(
            str(e).replace("config: model.args.", "--model-arg ").replace("config: ", "")
        ) from None
    model = build_model(name, **model_args)
    load(model, ckpt)
    return model
