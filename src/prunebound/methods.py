"""Pruning methods: one score (or mask) function each, plus one registry entry.

A method ranks weights by a score: the lowest scores are pruned first, by one shared exact-count
selection routine (`prunebound.prune`), per layer or across layers. Methods that are not a ranking
(Bernoulli sampling) give a keep-mask directly instead, and reconstruction methods ("obs") choose
the mask and update the surviving weights.

A score function takes `(weight, generator, layer)`: the weight (effective, pruned weights zero),
a generator, and a `ScoreContext` naming the layer, its module, the scored rows and the
calibration statistics (`prune(..., data=...)`) the method declared in `needs`. Adding a method is
one function and one line::

    def taylor(weight, generator, layer):   # scores: same shape as weight (or one per row)
        return (weight * layer.stats.grad[layer.rows]).abs()

    register_method(Method("my_taylor", scores=taylor, needs=("grad",)))

Old-style `(weight)` and `(weight, generator)` functions keep working.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebound._check import is_int
from prunebound._masks import mask_module, unit_view
from prunebound.calibration import NEEDS, LayerStats
from prunebound.layer_types import CONV, LINEAR, OPT_IN, PRUNABLE, Unit, output_axis
from prunebound.obs import ReconstructFn, obs_reconstruct


@dataclass(frozen=True)
class ScoreContext:
    """What a score function knows about the layer it scores.

    Attributes:
        name: the layer's name in the model (`""` for a bare layer).
        module: the layer.
        rows: the rows of the weight being scored (`slice(None)` unless a `blockwise` method
            scores a large layer in blocks of rows; for an `elementwise` method the weight may be
            a flat sample instead).
        stats: the layer's calibration statistics (`prunebound.calibration.LayerStats`) when
            `prune` was given `data=` and the method declares `needs`; else None.
    """

    name: str
    module: nn.Module
    rows: slice = field(default_factory=lambda: slice(None))
    stats: LayerStats | None = None


#: (weight, generator, layer) -> scores; lower = pruned first. Shape: weight's, or (out,) if
#: unit="row". `Method` also accepts (weight) and (weight, generator), and stores every score
#: function as (weight, generator, layer=None).
ScoreFn = Callable[..., torch.Tensor]
#: (weight, amount, generator) -> bool keep-mask with the weight's shape (True = kept).
MaskFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A pruning method.

    Attributes:
        name: registry key.
        scores: ranking function (exact-count methods). Exactly one of `scores`, `mask` and
            `reconstruct`.
        mask: sampling function returning a keep-mask (non-ranking methods, e.g. Bernoulli).
        reconstruct: chooses masks and new surviving weights from calibration data ("obs").
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
        needs: calibration statistics the scores read from `layer.stats` (a subset of
            `prunebound.calibration.NEEDS`: "inputs", "hessian", "grad", "fisher"); a method
            that needs any refuses to run without `prune(..., data=...)`.
        coupled: the scores need the coupled trace (the layers that consume each unit, not only
            the layer that produces it; `prunebound.coupled_prune`): `prune` refuses the method
            without `coupled=True`. Row methods only.
    """

    name: str
    scores: ScoreFn | None = None
    mask: MaskFn | None = None
    unit: Unit = "weight"
    layer_types: tuple[type[nn.Module], ...] = PRUNABLE + OPT_IN
    blockwise: bool = False
    elementwise: bool = False
    needs: tuple[str, ...] = ()
    reconstruct: ReconstructFn | None = None
    coupled: bool = False

    def __post_init__(self) -> None:
        if sum(f is not None for f in (self.scores, self.mask, self.reconstruct)) != 1:
            raise ValueError(
                f"method {self.name!r}: give exactly one of `scores`, `mask` or `reconstruct`"
            )
        bad = sorted(set(self.needs) - set(NEEDS))
        if bad or isinstance(self.needs, str):
            raise ValueError(
                f"method {self.name!r}: needs must be a tuple of {NEEDS}, got {self.needs!r}"
            )
        if self.unit not in ("weight", "row"):
            raise ValueError(
                f"method {self.name!r}: unit must be 'weight' or 'row', got {self.unit!r}"
            )
        if self.mask is not None and self.unit != "weight":
            raise ValueError(f"method {self.name!r}: mask functions work on single weights only")
        if self.elementwise and (self.unit != "weight" or self.scores is None):
            raise ValueError(f"method {self.name!r}: elementwise needs per-weight scores")
        if self.coupled and self.unit != "row":
            raise ValueError(f"method {self.name!r}: coupled scores are for whole units (rows)")
        if self.reconstruct is not None and self.unit != "weight":
            raise ValueError(f"method {self.name!r}: reconstruction works on single weights")
        if self.scores is not None:
            object.__setattr__(self, "scores", _with_context(self.name, self.scores))
        if self.mask is not None:
            arity = _positional(self.mask)
            kind = "mask(weight, amount, generator)"
            if arity is not None and not arity[0] <= 3 <= arity[1]:
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


def _with_context(name: str, fn: Callable[..., torch.Tensor]) -> ScoreFn:
    """`fn` as a `(weight, generator, layer=None)` function, whatever of those it takes."""
    arity = _positional(fn)
    if arity is None:  # a builtin or *args: the (weight, generator) convention
        given = 2
    elif arity[0] <= 3 <= arity[1]:
        return fn
    elif arity[0] <= 2 <= arity[1]:
        given = 2
    elif arity[0] <= 1 <= arity[1]:
        given = 1
    else:
        raise TypeError(
            f"method {name!r}: expected scores(weight[, generator[, layer]]), got a function "
            f"taking {arity[0]} to {arity[1]} positional arguments"
        )

    def scores(
        weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
    ) -> torch.Tensor:
        return fn(*(weight, generator, layer)[:given])

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


def _stat(layer: ScoreContext | None, key: str, method: str) -> torch.Tensor:
    value = getattr(layer.stats, key) if layer is not None and layer.stats is not None else None
    if value is None:
        where = f" (layer {layer.name!r})" if layer is not None else ""
        raise ValueError(f"method {method!r} needs calibration data{where}: pass prune(data=...)")
    assert layer is not None
    t: torch.Tensor = value[layer.rows]
    return t


def _row_ranks(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Scores replaced by their rank within each output row among the row's surviving weights,
    divided by the survivors of the row: every row then loses the same share (ties: lower index
    first)."""
    rows = unit_view(module, scores, "row").flatten(1)
    mm = mask_module(module)
    alive = (
        unit_view(module, mm.mask, "row").flatten(1).to(rows.device)
        if mm is not None
        else torch.ones_like(rows, dtype=torch.bool)
    )
    order = rows.masked_fill(~alive, -math.inf).argsort(dim=1, stable=True)
    pos = torch.arange(rows.shape[1], device=rows.device, dtype=torch.float64)
    rank = torch.empty_like(rows, dtype=torch.float64).scatter_(1, order, pos.expand_as(order))
    dead = (~alive).sum(1, keepdim=True)
    frac = (rank - dead + 1) / alive.sum(1, keepdim=True).clamp(min=1)
    shape = unit_view(module, scores, "row").shape
    return frac.reshape(shape).movedim(0, output_axis(module))


def wanda_scores(
    weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, compared within each output row (Sun et al. 2023, "Wanda")."""
    norms = _stat(layer, "input_sq", "wanda").sqrt()
    assert layer is not None
    return _row_ranks(layer.module, weight.abs().double() * norms)


def obd_scores(
    weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
) -> torch.Tensor:
    """1/2 H_ii w_i^2 with H_ii the empirical Fisher diagonal, the mean over calibration examples
    of the squared per-example gradient (Optimal Brain Damage, LeCun et al. 1990)."""
    fisher = _stat(layer, "fisher", "obd")
    assert layer is not None and layer.stats is not None
    return 0.5 * fisher / layer.stats.examples * weight.double() ** 2


def taylor_scores(
    weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
) -> torch.Tensor:
    """|g * w| with g the loss gradient summed over the calibration data: the first-order Taylor
    estimate of the loss change when w is removed (Molchanov et al. 2017/2019)."""
    return (_stat(layer, "grad", "taylor") * weight.double()).abs()


def snip_scores(
    weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
) -> torch.Tensor:
    """SNIP's connection sensitivity |g * w| (Lee et al. 2019): the Taylor score, meant for an
    untrained network pruned once at initialisation (one or a few calibration batches)."""
    return (_stat(layer, "grad", "snip") * weight.double()).abs()


def unit_taylor_scores(
    weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
) -> torch.Tensor:
    """Group first-order Taylor importance of each output unit (Molchanov et al. 2019):
    |sum over the unit's weights of w * g|, g the loss gradient summed over the calibration data,
    the first-order estimate of the loss change when the whole unit is zeroed. With
    coupled=True the sum also runs over the biases and BatchNorm entries of every layer in the
    unit's coupled group (`prunebound.coupled_prune.unit_taylor`)."""
    if layer is None or layer.stats is None or layer.stats.grad is None:
        _stat(layer, "grad", "unit Taylor")  # raises, naming the layer
    assert layer is not None and layer.stats is not None and layer.stats.grad is not None
    grad = unit_view(layer.module, layer.stats.grad, "row")[layer.rows]
    return (grad * weight.double()).flatten(1).sum(1).abs()


def group_norm_scores(
    weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext | None = None
) -> torch.Tensor:
    """Stand-in of the group-norm methods ("filter_group", "neuron_group", `coupled=True`): their
    score needs the weights that consume each unit, which only the coupled trace knows
    (`prunebound.coupled_prune.group_norms`); called on one layer alone it refuses."""
    raise ValueError(COUPLED_ONLY.format(name="filter_group' / 'neuron_group"))


#: refusal of a `Method(coupled=True)` used without the coupled trace
COUPLED_ONLY = (
    "method {name!r} scores each unit with the weights that consume it: pass coupled=True and "
    "example_inputs="
)


def require_data(method: Method, data: object) -> None:
    """Refuse a data-aware `method` called without calibration `data`."""
    if method.needs and data is None:
        raise ValueError(
            f"method {method.name!r} needs calibration data: pass data= (a tensor of inputs, an "
            "(inputs, labels) pair, or a DataLoader)"
        )


def row_norm(p: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
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


def _group_norm(name: str, types: tuple[type[nn.Module], ...]) -> Method:
    return Method(
        name, scores=group_norm_scores, unit="row", layer_types=types, blockwise=True,
        coupled=True,
    )  # fmt: skip


def _unit_taylor(name: str, types: tuple[type[nn.Module], ...]) -> Method:
    return Method(
        name, scores=unit_taylor_scores, unit="row", layer_types=types, blockwise=True,
        needs=("grad",),
    )  # fmt: skip


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", scores=magnitude_scores, blockwise=True, elementwise=True),
    "random": Method("random", scores=random_scores, blockwise=True, elementwise=True),
    "bernoulli": Method("bernoulli", mask=bernoulli_mask),
    "neuron": neuron(2),
    "neuron_l1": neuron(1),
    "filter": filter_(2),
    "filter_l1": filter_(1),
    # whole attention heads of HF GPT-2 / BERT: `prune` hands it to `prunebound.heads`
    "head": Method("head", scores=row_norm(2), unit="row", layer_types=(), blockwise=True),
    "wanda": Method("wanda", scores=wanda_scores, layer_types=PRUNABLE, needs=("inputs",)),
    "obd": Method("obd", scores=obd_scores, layer_types=PRUNABLE, needs=("fisher",)),
    "taylor": Method("taylor", scores=taylor_scores, layer_types=PRUNABLE, needs=("grad",)),
    "snip": Method("snip", scores=snip_scores, layer_types=PRUNABLE, needs=("grad",)),
    "obs": Method("obs", reconstruct=obs_reconstruct, layer_types=PRUNABLE, needs=("hessian",)),
    # whole units by group Taylor importance; calibration data (and with coupled=True the
    # group's biases and BatchNorm entries too): Molchanov et al. 2019
    "neuron_taylor": _unit_taylor("neuron_taylor", LINEAR),
    "filter_taylor": _unit_taylor("filter_taylor", (nn.Conv1d, nn.Conv2d)),
    # whole units by the L2 norm of all they own: producer rows, consumer columns and BatchNorm
    # scales (coupled=True only; Torch-Pruning's group magnitude importance)
    "neuron_group": _group_norm("neuron_group", LINEAR),
    "filter_group": _group_norm("filter_group", (nn.Conv1d, nn.Conv2d)),
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
