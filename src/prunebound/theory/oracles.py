"""Per-layer norm oracles used by the planner: a priori (law) and trained (weights in hand).

Each oracle answers, for a pruned count m, upper bounds on ||W||, ||b|| (as seen by the next
layer), ||Delta(m)|| and ||W~(m)|| (operator norms of the layer's linear map), each valid on an
event whose failure probability is accounted in `delta` (docs/theory.md §4-§5).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from prunebound.theory.norms import conv_norm
from prunebound.theory.prior_bounds import (
    conv_factor,
    magnitude_delta_bound,
    neuron_delta_bound,
    random_delta_bound,
    random_kept_bound,
    weight_norm_bound,
)
from prunebound.theory.randmat import bernstein_bound, bias_norm_bound
from prunebound.theory.values import Law, LayerSpec


def out_positions(spec: LayerSpec) -> int:
    """Number of output positions: a conv layer's output pixels, a Linear layer's tokens (the
    leading dims of its input sample; 1 for a flat input). A bias repeats at every position."""
    if spec.kind == "linear":
        return math.prod(spec.in_shape[:-1])
    kernel = spec.shape[2:]
    spatial = spec.in_shape[1:]
    n = 1
    for i, (size, k) in enumerate(zip(spatial, kernel, strict=True)):
        s = _get(spec.stride, i)
        p = _get(spec.padding, i)
        d = _get(spec.dilation, i)
        n *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return n


def _get(t: tuple[int, ...], i: int) -> int:
    return t[i] if i < len(t) else t[-1]


def matrix_dims(spec: LayerSpec) -> tuple[int, int, float]:
    """(d1, d2, Lemma C factor): the unfolded weight is d1 x d2; linear layers have factor 1."""
    d1 = spec.shape[0]
    d2 = spec.numel // d1
    if spec.kind == "linear":
        return d1, d2, 1.0
    return d1, d2, conv_factor(spec.shape[2:], spec.stride, spec.dilation)


class Oracle:
    """Per-layer norm bounds as functions of the pruned count m: what `theory.budget` solves
    with and `theory.planner` feeds to Lemma A. `PriorLayer` (weights from a law) and
    `TrainedLayer` (the weights in hand) fill in `_norm_delta`, `_norm_kept` and `threshold`;
    `norm_delta` and `norm_kept` are their cached forms (the solvers call them many times)."""

    def __init__(self, spec: LayerSpec, method: str, delta: float, *, bernoulli: bool):
        self.spec, self.method, self.delta, self.bernoulli = spec, method, delta, bernoulli
        self.d1, self.d2, self.factor = matrix_dims(spec)
        self.numel = spec.numel
        #: what a count counts: weights, or rows for method "neuron"
        self.units = self.d1 if method == "neuron" else self.numel
        #: the largest count the planner may give (0: the layer is left alone)
        self.limit = self.units
        self._nw = 0.0  # the bound on ||W|| used in r_l
        self._nb = 0.0  # ||b|| as seen in the layer's output
        self.norm_delta = lru_cache(maxsize=None)(self._norm_delta)
        self.norm_kept = lru_cache(maxsize=None)(self._norm_kept)

    @property
    def name(self) -> str:
        return self.spec.name

    def norm_w(self) -> float:
        """Bound on ||W|| (PriorLayer: restricted to h >= 0 when the input is nonnegative)."""
        return self._nw

    def norm_b(self) -> float:
        return self._nb

    def _norm_delta(self, m: int) -> float:
        raise NotImplementedError

    def _norm_kept(self, m: int) -> float:
        raise NotImplementedError

    def threshold(self, m: int) -> float | None:
        """For magnitude: the pruning threshold of m weights (an upper bound a priori)."""
        raise NotImplementedError


class PriorLayer(Oracle):
    """A priori oracle: weights i.i.d. from `law` (docs §4). `delta` is this layer's failure budget.

    Split: ||W|| delta/4, ||b|| delta/4, ||Delta|| delta/4 (magnitude: delta/2, t' event
    included), and for random pruning the direct bound on ||W~|| delta/4 (magnitude uses
    ||W|| + ||Delta||, no extra event). With `nonneg_input` (the layer reads ReLU outputs, h >= 0)
    the norms that multiply h in Lemma A (||W|| in r_l, ||Delta|| in e_l) are bounded on the
    nonnegative orthant (docs §3.5), each event sharing its budget half-and-half with the full
    norm, which ||W~|| = ||W - Delta|| still needs (it multiplies h~ - h, of any sign).
    Biases (if `spec.bias`) are drawn from the same law as the weights and never pruned.
    """

    def __init__(
        self,
        spec: LayerSpec,
        law: Law,
        method: str,
        delta: float,
        *,
        bernoulli: bool,
        nonneg_input: bool = False,
    ):
        # each norm event gets its budget; halves when a restricted twin is needed
        super().__init__(spec, method, delta / 2.0 if nonneg_input else delta, bernoulli=bernoulli)
        self.law, self.nonneg = law, nonneg_input
        d_w = self.delta / 4.0
        self._nw_full = self.factor * weight_norm_bound(self.d1, self.d2, law, d_w)
        self._nw = self._nw_full
        if nonneg_input:
            self._nw = min(
                self._nw_full,
                self.factor * weight_norm_bound(self.d1, self.d2, law, d_w, orthant=True),
            )
        if spec.bias:
            self._nb = math.sqrt(out_positions(spec)) * bias_norm_bound(
                spec.shape[0], law.name, law.scale, delta / 4.0
            )
        self._full_delta = lru_cache(maxsize=None)(self._delta_bound)

    def _delta_bound(self, m: int, orthant: bool = False) -> tuple[float, float | None]:
        if self.method == "neuron":  # a row submatrix of W: also ||Delta|| <= ||W||
            b, t = neuron_delta_bound(
                self.d1, self.d2, m, self.law, self.delta / 2.0, orthant=orthant
            )
            return min(self.factor * b, self._nw if orthant else self._nw_full), t
        if self.method == "magnitude":
            b, t = magnitude_delta_bound(
                self.d1, self.d2, m, self.law, self.delta / 2.0, orthant=orthant
            )
            return self.factor * b, t
        b = random_delta_bound(
            self.d1,
            self.d2,
            m,
            self.law,
            self.delta / 4.0,
            bernoulli=self.bernoulli,
            orthant=orthant,
        )
        return self.factor * b, None

    def _norm_delta(self, m: int) -> float:
        """Bound on ||Delta(m)|| (restricted to h >= 0 when the input is nonnegative)."""
        full = self._full_delta(m)[0]
        if not self.nonneg:
            return full
        return min(full, self._delta_bound(m, orthant=True)[0])

    def threshold(self, m: int) -> float | None:
        """For magnitude: t_max, an upper bound (w.p. >= 1 - delta/4) on the pruning threshold
        (for "neuron": on the row-norm threshold)."""
        return self._full_delta(m)[1]

    def _norm_kept(self, m: int) -> float:
        if m == 0 or self.method == "neuron":  # rows removed: W~ is a row submatrix of W
            return self._nw_full
        tri = self._nw_full + self._full_delta(m)[0]
        if self.method == "random":
            direct = self.factor * random_kept_bound(
                self.d1, self.d2, m, self.law, self.delta / 4.0, bernoulli=self.bernoulli
            )
            return min(tri, direct)
        return tri


def _opnorm(w: torch.Tensor, spec: LayerSpec) -> float:
    """Operator norm of the layer map with weight `w` (any shape with spec.numel entries).

    Linear: exact spectral norm. Conv: T1's `norms.conv_norm` (min of the circular/DFT bound and
    Lemma C), an upper bound.
    """
    if spec.kind == "linear":
        return float(torch.linalg.matrix_norm(w.detach().reshape(spec.shape).double(), ord=2))
    return conv_norm(
        w.detach().reshape(spec.shape),
        spec.in_shape[1:],
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
    )


class TrainedLayer(Oracle):
    """Trained oracle: the weights are in hand (docs §5).

    Magnitude pruning is deterministic: ||Delta(m)|| and ||W~(m)|| are computed exactly (linear:
    spectral norm; conv: `norms.conv_norm`, an upper bound), no probability spent.
    Random pruning of a uniformly random m-subset: ||Delta - (m/n) W|| is bounded by matrix
    Bernstein through the sampling-without-replacement comparison (Gross & Nesme 2010), w.p.
    >= 1 - delta over the mask; then ||Delta|| <= (m/n)||W|| + that and
    ||W~|| <= (1 - m/n)||W|| + that.
    """

    def __init__(
        self,
        spec: LayerSpec,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        method: str,
        delta: float,
        *,
        bernoulli: bool,
    ):
        super().__init__(spec, method, delta, bernoulli=bernoulli)
        self.w = weight.detach().reshape(self.d1, -1).double()
        self._nw = _opnorm(self.w, spec)
        self._nw_mat = float(torch.linalg.matrix_norm(self.w, ord=2))
        if bias is not None:
            self._nb = math.sqrt(out_positions(spec)) * float(bias.detach().double().norm())
        self._order = torch.argsort(self.w.abs().flatten(), stable=True)

    def pruned_matrix(self, m: int) -> torch.Tensor:
        """Delta for magnitude pruning of the m smallest |w| (ties by index, as a stable sort)."""
        flat = torch.zeros(self.numel, dtype=torch.float64)
        idx = self._order[:m]
        flat[idx] = self.w.flatten()[idx]
        return flat.reshape(self.d1, self.d2)

    def _random_dev(self, m: int) -> float:
        """Bound on ||Delta_mat - (m/n) W_mat|| (unfolded matrix), w.p. >= 1 - delta (§5)."""
        q = m / self.numel
        sq = self.w * self.w
        v = q * max(float(sq.sum(1).max()), float(sq.sum(0).max()))
        r = float(self.w.abs().max()) + self._nw_mat / self.numel
        return bernstein_bound(self.d1, self.d2, entry_bound=r, variance_sum=v, delta=self.delta)

    def _norm_delta(self, m: int) -> float:
        if m <= 0:
            return 0.0
        if self.method == "magnitude":
            return _opnorm(self.pruned_matrix(m), self.spec)
        return self.factor * ((m / self.numel) * self._nw_mat + self._random_dev(m))

    def _norm_kept(self, m: int) -> float:
        if m <= 0:
            return self._nw
        if self.method == "magnitude":
            return _opnorm(self.w - self.pruned_matrix(m), self.spec)
        direct = self.factor * ((1 - m / self.numel) * self._nw_mat + self._random_dev(m))
        return min(self._nw + self.norm_delta(m), direct)

    def threshold(self, m: int) -> float | None:
        if self.method != "magnitude" or m <= 0 or m >= self.numel:
            return None
        return float(self.w.abs().flatten()[self._order[m]])
