"""Shared value types of the theory: layer specs, laws, plans, and the choices they take.

Pure data (no nn.Module, no I/O), shared by `prunebound.theory` (which makes plans) and
`prunebound.check` (which checks them by Monte Carlo). Each choice is a `Literal`; its
`typing.get_args` is also the runtime check (`_check.check_choice`), so the type and the check
cannot drift apart.

Vocabulary (one meaning each, everywhere in prunebound):
- `delta`: a probability over the random weights (and random mask) that a theorem's bound fails;
- `confidence`: the confidence level of a statistical statement (an exact Clopper-Pearson limit
  on held-out data or on sampled networks): it holds with probability >= `confidence` over the
  sample;
- `alpha`: only the significance level of a hypothesis test (`check_law`'s KS test).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PlanMethod = Literal[
    "magnitude", "random", "neuron"
]  # how a plan's weights are chosen in each layer
PlanLaw = Literal["uniform", "gaussian", "trained"]  # what the weights are, for `plan`
LawName = Literal["uniform", "gaussian"]  # an i.i.d. law (`Law.name`)
BudgetSplit = Literal["optimized", "equal", "params"]  # how eps is shared across layers
Sampling = Literal["count", "bernoulli"]  # exact counts, or independent coin flips
# what a plan's counts mean to `verify`: also "threshold" (magnitude: prune every |w| < t_l, the
# form the theorem covers), which a user may set with `dataclasses.replace(plan, sampling=...)`
PlanSampling = Literal["count", "bernoulli", "threshold"]
Guarantee = Literal["prior", "trained", "sampled", "data"]  # what a `Plan` promises
LayerKind = Literal["linear", "conv1d", "conv2d"]


@dataclass(frozen=True)
class LayerSpec:
    """One prunable layer of a feed-forward target network, as the theory sees it.

    `shape` is the weight shape: (out, in) for linear, (c_out, c_in, k) or (c_out, c_in, kh, kw)
    for conv. `in_shape` is the shape of one input sample to this layer (without batch),
    needed for conv operator norms; for linear it is (in,).
    """

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    bias: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def fan_in(self) -> int:
        return self.numel // self.shape[0]


@dataclass(frozen=True)
class Law:
    """I.i.d. law of a layer's weights: U[-scale, scale] or N(0, scale^2)."""

    name: LawName
    scale: float


@dataclass(frozen=True)
class LayerPlan:
    """What a plan prunes in one layer, and the share of (eps, delta) it spends there.

    For magnitude plans, `threshold` is t_l: the theorem covers pruning every |w| < t_l
    (threshold form); `count` is the number of weights that form prunes with probability
    >= 1 - delta_share (a lower bound on the random count). For random plans, `fraction` is
    the pruning probability (Bernoulli form) or exact fraction (count form), see `Plan.sampling`.
    For neuron plans `count` is a number of rows (neurons) and `threshold` bounds their norm.
    """

    name: str
    count: int
    fraction: float
    threshold: float | None
    eps_share: float
    delta_share: float
    law: Law | None = None
    norm_delta: float | None = None  # the bound used for ||Delta_l|| (operator norm)


@dataclass(frozen=True)
class Plan:
    """A per-layer pruning plan with the guarantee it carries (`guarantee`):

    - "prior" (`theory.plan`, law uniform/gaussian): with probability >= 1 - delta over the law's
      weights (and the random mask), sup_{||x|| <= radius} ||f(x) - F(x)|| <= eps, where F is the
      target and f the pruned network;
    - "trained" (`theory.plan(law="trained")`): the same sup, for the model's actual weights
      (deterministic for magnitude; probability >= 1 - delta over a random mask);
    - "sampled" (`check.sampled_plan`): with `confidence` over the certification samples,
      P_weights(sup gap > eps) <= delta;
    - "data" (`theory.data_plan`): with `confidence` over the held-out sample,
      P_x(||f(x) - F(x)|| > eps) <= `max_gap_rate`; not a sup over the ball (`law` is None).

    `output_scale` is the bound r_L on sup ||F(x)|| over the ball (data plans: no ball, so
    `radius`, `output_scale` and `delta` are 0 and `law` and `split` None), so
    eps / output_scale is the relative budget. `counts` is what `prune(model, plan=plan)` applies.
    """

    method: PlanMethod
    law: PlanLaw | None
    eps: float
    delta: float
    radius: float
    layers: tuple[LayerPlan, ...]
    specs: tuple[LayerSpec, ...]
    output_scale: float
    sampling: PlanSampling = "count"
    split: BudgetSplit | None = "optimized"  # None: the guarantee is not split across layers
    notes: tuple[str, ...] = field(default_factory=tuple)
    # the network between the layers: "relu" (ReLU alone between layers, nothing after the
    # last: widths targets, LayerSpec lists, such modules) or "other" (verify cannot rebuild it)
    activation: Literal["relu", "other"] = "relu"
    # the seed whose random mask the guarantee is about (data plans, method="random"): the plan
    # certifies that one mask, and `prunebound.prune(model, plan=plan)` uses it when given no seed
    seed: int | None = None
    guarantee: Guarantee = "prior"
    confidence: float | None = None  # "sampled" and "data" plans: the statistical confidence
    max_gap_rate: float | None = None  # "data" plans: the bound on P_x(gap > eps)

    @property
    def counts(self) -> dict[str, int]:
        return {lp.name: lp.count for lp in self.layers}

    @property
    def total_pruned(self) -> int:
        return sum(lp.count for lp in self.layers)

    def __str__(self) -> str:
        neurons = self.method == "neuron"  # counts are rows
        total = sum(s.shape[0] if neurons else s.numel for s in self.specs)
        head = {
            "prior": f"w.p. >= {1 - self.delta:.4g} over {self.law} weights",
            "trained": "for these trained weights"
            + (f" (w.p. >= {1 - self.delta:.4g} over the mask)" if self.method == "random" else ""),
            "sampled": f"with confidence {self.confidence}: P_weights(gap > eps) <= {self.delta:g}",
            "data": f"with confidence {self.confidence}: P_x(gap > eps) <= {self.max_gap_rate}",
        }[self.guarantee]
        gap = "||f(x) - F(x)||" if self.guarantee == "data" else f"sup_(||x|| <= {self.radius:g})"
        rows = [
            f"Plan ({self.guarantee}, {self.method}): {gap} gap <= eps = {self.eps:.4g}, {head}",
            f"  prunes {self.total_pruned}/{total} {'neurons' if neurons else 'weights'} "
            f"({self.total_pruned / max(total, 1):.1%})",
            f"  {'layer':<16} {'count':>10} {'fraction':>9} {'eps share':>10}",
        ]
        rows += [
            f"  {lp.name:<16} {lp.count:>10} {lp.fraction:>9.2%} {lp.eps_share:>10.4g}"
            for lp in self.layers[:20]
        ]
        if len(self.layers) > 20:
            rows.append(f"  ... {len(self.layers) - 20} more layers")
        return "\n".join(rows + [f"  note: {n[:200]}" for n in self.notes[:3]])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = self.counts
        d["relative_eps"] = self.eps / self.output_scale if self.output_scale > 0 else None
        return d
