"""Pruning methods: one score (or mask) function each, plus one registry entry.

A method ranks weights by a score: the lowest scores are pruned first, by one shared exact-count
selection routine (`prunebound.prune`), per layer or across layers. Methods that are not a ranking
(Bernoulli sampling) give a keep-mask directly instead.

Adding a method is one function and one line::

    def taylor(weight, generator):          # scores: same shape as weight (or one per row)
        return weight.abs() * my_grads[...]

    register_method(Method("taylor", scores=taylor))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunebound._check import is_int
from prunebound.layer_types import CONV, LINEAR, OPT_IN, PRUNABLE, Unit

#: (weight, generator) -> scores; lower = pruned first. Shape: weight's, or (out,) if unit="row".
ScoreFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
#: (weight, amount, generator) -> bool keep-mask with the weight's shape (True = kept).
MaskFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A pruning method.

    Attributes:
        name: registry key.
        scores: ranking function (exact-count methods). Exactly one of `scores`/`mask`.
        mask: sampling function returning a keep-mask (non-ranking methods, e.g. Bernoulli).
        unit: "weight" prunes single weights; "row" prunes whole output rows (neurons of a
            Linear, filters of a Conv): `scores` then returns one score per output row and
            `amount` counts rows. Row scores see the weight with output units on dim 0 (a
            transposed linear's weight is passed transposed, so a "row" is its column).
        layer_types: module types the method applies to (`OPT_IN` types only when selected
            explicitly; a type that accepts Linear also accepts `TRANSPOSED_LINEAR` layers).
        blockwise: scores of a block of output rows depend only on those rows, so the selection
            routine may score a large layer in blocks (keeps global pruning of 100M-parameter
            models lean). True for every built-in method; leave False for custom scores that need
            the whole tensor.
        elementwise: the score of each weight depends only on that weight (and the generator),
            so any subset of weights can be scored alone: global selection then brackets its
            threshold from a strided sample without scoring every weight an extra time. True
            for "magnitude" and "random".
    """

    name: str
    scores: ScoreFn | None = None
    mask: MaskFn | None = None
    unit: Unit = "weight"
    layer_types: tuple[type[nn.Module], ...] = PRUNABLE + OPT_IN
    blockwise: bool = False
    elementwise: bool = False

    def __post_init__(self) -> None:
        if (self.scores is None) == (self.mask is None):
            raise ValueError(f"method {self.name!r}: give exactly one of `scores` or `mask`")
        if self.unit not in ("weight", "row"):
            raise ValueError(
                f"method {self.name!r}: unit must be 'weight' or 'row', got {self.unit!r}"
            )
        if self.mask is not None and self.unit != "weight":
            raise ValueError(f"method {self.name!r}: mask functions work on single weights only")
        if self.elementwise and (self.unit != "weight" or self.scores is None):
            raise ValueError(f"method {self.name!r}: elementwise needs per-weight scores")
        if self.scores is not None and _positional(self.scores) == (1, 1):
            # `scores(weight)`: a deterministic score needs no generator
            object.__setattr__(self, "scores", _ignore_generator(self.scores))
        for fn, want, kind in (
            (self.scores, 2, "scores(weight[, generator])"),
            (self.mask, 3, "mask(weight, amount, generator)"),
        ):
            arity = _positional(fn) if fn is not None else None
            if arity is not None and not arity[0] <= want <= arity[1]:
                raise TypeError(
                    f"method {self.name!r}: expected {kind}, got a function taking "
                    f"{arity[0]} to {arity[1]} positional arguments"
                )


def _positional(fn: Callable[..., object]) -> tuple[int, int] | None:
    """(required, total) positional parameters of `fn`; None if unknown (builtins) or *args."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    pos = [p for p in params if p.kind in kinds]
    return sum(p.default is inspect.Parameter.empty for p in pos), len(pos)


def _ignore_generator(fn: Callable[..., torch.Tensor]) -> ScoreFn:
    def scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return fn(weight)

    scores.__name__ = getattr(fn, "__name__", "scores")
    return scores


def magnitude_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """|w|: the smallest magnitudes are pruned first (Han et al. 2015)."""
    return weight.abs()


def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """I.i.d. uniform keys: pruning the k smallest is a uniformly random subset of size k."""
    keys = torch.rand(weight.shape, generator=generator, device=generator.device)
    return keys.to(weight.device)


def bernoulli_mask(weight: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Each weight is pruned independently with probability `amount` (the count is random)."""
    u = torch.rand(weight.shape, generator=generator, device=generator.device)
    return (u >= amount).to(weight.device)


def row_norm(p: int) -> ScoreFn:
    """Score of each output row (neuron / filter): its L1 or L2 norm (Li et al. 2017)."""
    if p not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {p!r}")

    def scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        norms: torch.Tensor = torch.linalg.vector_norm(weight.flatten(1).float(), ord=p, dim=1)
        return norms

    return scores


def neuron(norm: int = 2) -> Method:
    """Structured pruning of whole output neurons of Linear layers by L1/L2 norm.

    A neuron is a row of an `nn.Linear` weight and a column of a transposed linear's (GPT-2 Conv1D).
    """
    name = "neuron" if norm == 2 else f"neuron_l{norm}"
    return Method(name, scores=row_norm(norm), unit="row", layer_types=LINEAR, blockwise=True)


def filter_(norm: int = 2) -> Method:
    """Structured pruning of whole output channels (filters) of Conv layers by L1/L2 norm."""
    name = "filter" if norm == 2 else f"filter_l{norm}"
    return Method(name, scores=row_norm(norm), unit="row", layer_types=CONV, blockwise=True)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", scores=magnitude_scores, blockwise=True, elementwise=True),
    "random": Method("random", scores=random_scores, blockwise=True, elementwise=True),
    "bernoulli": Method("bernoulli", mask=bernoulli_mask),
    "neuron": neuron(2),
    "neuron_l1": neuron(1),
    "filter": filter_(2),
    "filter_l1": filter_(1),
}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add a method to the registry so `prune(model, method.name, ...)` finds it."""
    if method.name in METHODS and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered (pass overwrite=True)")
    METHODS[method.name] = method
    return method


def get_method(method: str | Method, norm: int | None = None) -> Method:
    """Resolve a registry key or pass a `Method` through.

    `norm` (1 or 2) picks the row norm of the structured methods: ("neuron", 1) is "neuron_l1".
    """
    if norm is not None:
        if not is_int(norm) or norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {norm!r}")
        base = method.name if isinstance(method, Method) else method
        if base not in ("neuron", "filter", "neuron_l1", "filter_l1"):
            raise ValueError(
                f"norm applies to the structured methods 'neuron' and 'filter', not {base!r}"
            )
        return neuron(norm) if base.startswith("neuron") else filter_(norm)
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)} or a Method, got {method!r}")
    return METHODS[method]
