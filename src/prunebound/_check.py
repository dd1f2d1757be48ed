"""Argument checks with one message format, in the spirit of scikit-learn's `Interval` and
`StrOptions`: each checker returns the value or raises ValueError naming the parameter, what it
must be and what it got ("schedule.rounds must be an int >= 1, got 0").

`bool` is never an int here (`True` is not a count), NaN is never in an interval, and a checker
is called before anything is mutated. `finite` is the one test for NaN/Inf in a tensor, and
`as_generator` the one reading of a `seed` argument.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Literal, TypeGuard, TypeVar, overload

import numpy as np
import torch

T = TypeVar("T")
Closed = Literal["both", "left", "right", "neither"]
#: What every random function outside `theory` takes as `seed`: an int seeds a fresh generator,
#: a `torch.Generator` is used (and advanced) as is, None draws fresh entropy from the OS (not
#: reproducible). The default is 0 (reproducible) everywhere except `prune`, whose default None
#: means the seed a plan recorded, if any, else fresh entropy. Data splits and model
#: initialisation (`data`, `models.build_model`) take an int: the one an `Experiment` records.
Seed = int | torch.Generator | None


def is_int(value: object) -> TypeGuard[int]:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_float(value: object, *, ints: bool = False) -> TypeGuard[float | np.floating[Any] | int]:
    """A Python or numpy float (any width); with `ints`, also an int that is not a bool."""
    return isinstance(value, float | np.floating) or (ints and is_int(value))


@overload
def check_int(
    name: str, value: object, low: int = 0, *, optional: Literal[False] = False
) -> int: ...
@overload
def check_int(name: str, value: object, low: int = 0, *, optional: bool) -> int | None: ...
def check_int(name: str, value: object, low: int = 0, *, optional: bool = False) -> int | None:
    """`value` if it is an int >= `low` (or None, if `optional`)."""
    if optional and value is None:
        return None
    if is_int(value) and value >= low:
        return value
    none = " or None" if optional else ""
    raise ValueError(f"{name} must be an int >= {low}{none}, got {value!r}")


def interval(low: float, high: float, closed: Closed = "both") -> str:
    """`[0, 1)`, `> 0`, `<= 5`: how messages write an interval."""
    left, right = closed in ("both", "left"), closed in ("both", "right")
    if high == math.inf:
        return f"{'>=' if left else '>'} {low:g}"
    if low == -math.inf:
        return f"{'<=' if right else '<'} {high:g}"
    return f"in {'[' if left else '('}{low:g}, {high:g}{']' if right else ')'}"


def in_interval(value: float, low: float, high: float, closed: Closed = "both") -> bool:
    """Whether `value` lies in the interval (NaN never does)."""
    left, right = closed in ("both", "left"), closed in ("both", "right")
    above = value >= low if left else value > low
    below = value <= high if right else value < high
    return bool(above and below)


def check_float(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    closed: Closed = "both",
    ints: bool = False,
) -> float:
    """`value` as a float if it lies in the interval.

    `ints` also accepts ints (a TOML `1` for a rate); an infinite bound excluded by `closed`
    makes the check one for finite values ("a finite number > 0").
    """
    if not is_float(value, ints=ints) or not in_interval(float(value), low, high, closed):
        kind = "a number" if ints else "a float"
        if (high == math.inf and closed in ("left", "neither")) or (
            low == -math.inf and closed in ("right", "neither")
        ):
            kind = kind.replace("a ", "a finite ")
        raise ValueError(f"{name} must be {kind} {interval(low, high, closed)}, got {value!r}")
    return float(value)


def check_choice(name: str, value: T, allowed: Collection[T]) -> T:
    """`value` if it is one of `allowed` (a tuple of strings, a dict's keys, a Literal's args)."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def finite(t: torch.Tensor) -> bool:
    """All entries of `t` finite; the sum is a cheap first test (it overflows only rarely)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def as_generator(seed: Seed, *, name: str = "seed") -> torch.Generator:
    """The generator a `seed` argument stands for (see `Seed`).

    None draws the seed from torch's global generator (one draw), so `torch.manual_seed(0)`
    makes a run reproducible as PyTorch users expect; an int or a Generator always wins.
    """
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int(torch.randint(0, 2**62, (1,))))
    elif is_int(seed):
        g.manual_seed(seed)
    else:
        raise TypeError(f"{name} must be an int or a torch.Generator, got {seed!r}")
    return g


def as_seed(seed: Seed, *, name: str = "seed") -> int:
    """An int standing for a `seed` argument, for code that derives its streams from an int
    (one per chunk): an int as is, else one drawn from the generator (or fresh entropy)."""
    if is_int(seed):
        return seed
    return int(torch.randint(0, 2**62, (1,), generator=as_generator(seed, name=name)))
