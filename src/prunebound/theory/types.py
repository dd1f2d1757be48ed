"""Shared value types of the theory: layer specs, laws, plans.

Pure data (no nn.Module, no I/O), shared by `prunebound.theory` (which makes plans) and
`prunebound.verify` (which checks them by Monte Carlo). Fields here are a contract between
the two: extend, do not rename.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Method = Literal["magnitude", "random"]
LawName = Literal["uniform", "gaussian", "trained", "data"]
Kind = Literal["linear", "conv1d", "conv2d"]


@dataclass(frozen=True)
class LayerSpec:
    """One prunable layer of a feed-forward target network, as the theory sees it.

    `shape` is the weight shape: (out, in) for linear, (c_out, c_in, k) or (c_out, c_in, kh, kw)
    for conv. `in_shape` is the shape of one input sample to this layer (without batch),
    needed for conv operator norms; for linear it is (in,).
    """

    name: str
    kind: Kind
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

    name: Literal["uniform", "gaussian"]
    scale: float


@dataclass(frozen=True)
class LayerPlan:
    """What a plan prunes in one layer, and the share of (eps, delta) it spends there.

    For magnitude plans, `threshold` is t_l: the theorem covers pruning every |w| < t_l
    (threshold form); `count` is the number of weights that form prunes with probability
    >= 1 - delta_share (a lower bound on the random count). For random plans, `fraction` is
    the pruning probability (Bernoulli form) or exact fraction (count form), see `Plan.sampling`.
    """

    name: str
    count: int
    fraction: float
    threshold: float | None
    eps_share: float
    delta_share: float
    law: Law | None = None
    norm_bound: float | None = None  # the bound used for ||Delta_l|| (operator norm)


@dataclass(frozen=True)
class Plan:
    """A per-layer pruning plan with the guarantee it carries.

    The guarantee: with probability >= 1 - delta over the law's weights (and the random mask),
    sup_{||x|| <= radius} ||f(x) - F(x)|| <= eps, where F is the target and f the pruned network.
    `output_scale` is the bound r_L on sup ||F(x)|| over the ball, so eps / output_scale is the
    relative budget. `counts` is what `prunebound.prune(model, plan=plan)` applies.
    """

    method: Method
    law: LawName
    eps: float
    delta: float
    radius: float
    layers: tuple[LayerPlan, ...]
    specs: tuple[LayerSpec, ...]
    output_scale: float
    sampling: Literal["threshold", "count", "bernoulli"] = "count"
    split: str = "optimized"
    notes: tuple[str, ...] = field(default_factory=tuple)
    # the network between the layers: "relu" (ReLU alone between layers, nothing after the
    # last: widths targets, LayerSpec lists, such modules) or "other" (verify cannot rebuild it)
    activation: Literal["relu", "other"] = "relu"
    # the seed whose random mask the guarantee is about (law="data", method="random"): the plan
    # certifies that one mask, and `prunebound.prune(model, plan=plan)` uses it when given no seed
    seed: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {lp.name: lp.count for lp in self.layers}

    @property
    def total_pruned(self) -> int:
        return sum(lp.count for lp in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = self.counts
        d["relative_eps"] = self.eps / self.output_scale if self.output_scale > 0 else None
        return d
