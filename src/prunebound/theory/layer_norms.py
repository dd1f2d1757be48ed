"""Operator-norm bounds of one network step, for certificates: small layers exactly (or by
`norms.norm_bound`), convolutions by `norms.conv_norm`, large Linear layers by Lanczos on
W, W~ and Delta = W - W~ without forming Delta (docs/theory.md §7.6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sps
import torch

from prunebound._check import Seed
from prunebound.theory.network import Step
from prunebound.theory.norms import (
    NormBound,
    NormMethod,
    conv_norm,
    frobenius,
    lanczos_operator,
    norm_bound,
)

EXACT_MAX = 1024  # norm_bound's default: exact Gram eigenvalue up to this min dimension
SPARSE_MAX_DENSITY = 0.25  # scipy CSR matvecs beat dense ones below this density


def step_norm(
    step: Step,
    weight: torch.Tensor,
    method: NormMethod,
    fail_prob: float,
    seed: Seed,
    steps: int,
) -> NormBound:
    """An upper bound on the operator norm of `weight` as the step's layer applies it: matrix
    norms (`norms.norm_bound`) for Linear, the conv bound (`norms.conv_norm`) for Conv."""
    spec = step.spec
    assert spec is not None
    if spec.kind == "linear":
        return norm_bound(weight, method=method, fail_prob=fail_prob, seed=seed, steps=steps)
    v = conv_norm(
        weight, spec.in_shape[1:], stride=spec.stride, padding=spec.padding, dilation=spec.dilation
    )
    return NormBound(v, "conv: min(circular DFT, Lemma C)")


class LargeLinear:
    """Lanczos operators for W, W~ and Delta = W - W~ of one large Linear layer (docs §7.6).

    W is converted to float64 once; W~ is a scipy CSR matrix when sparse (<= 25% kept), and
    Delta is never formed: Delta q = W q - W~ q. Matrices are oriented so the Gram side is the
    smaller dimension.
    """

    def __init__(self, w: torch.Tensor, wt: torch.Tensor):
        wd = w.detach().to(torch.float64)
        flip = wd.shape[0] < wd.shape[1]
        self.wd = wd.T if flip else wd
        self.n = self.wd.shape[1]
        self.fro_w = frobenius(wd)
        self.sparse_t: Any = None
        self.sparse_tt: Any = None
        self.wtd: torch.Tensor | None = None
        keep = wt.detach() != 0
        if float(keep.float().mean()) <= SPARSE_MAX_DENSITY and wd.device.type == "cpu":
            rows, cols = torch.nonzero(keep, as_tuple=True)
            vals = wt.detach()[rows, cols].to(torch.float64)
            self.fro_t = frobenius(vals)
            r, c = (cols, rows) if flip else (rows, cols)
            shape = tuple(self.wd.shape)
            self.sparse_t = sps.csr_matrix((vals.numpy(), (r.numpy(), c.numpy())), shape=shape)
            self.sparse_tt = self.sparse_t.T.tocsr()
        else:
            wtd = wt.detach().to(torch.float64)
            self.fro_t = frobenius(wtd)
            self.wtd = wtd.T if flip else wtd

    def _t(self, q: torch.Tensor) -> torch.Tensor:
        if self.wtd is not None:
            return torch.mv(self.wtd, q)
        return torch.from_numpy(np.asarray(self.sparse_t @ q.numpy()))

    def _tt(self, y: torch.Tensor) -> torch.Tensor:
        if self.wtd is not None:
            return torch.mv(self.wtd.T, y)
        return torch.from_numpy(np.asarray(self.sparse_tt @ y.numpy()))

    def _run(
        self,
        av: Callable[[torch.Tensor], torch.Tensor],
        atv: Callable[[torch.Tensor], torch.Tensor],
        fro: float,
        steps: int,
        p: float,
        gen: torch.Generator,
    ) -> NormBound:
        lz = lanczos_operator(
            lambda q: atv(av(q)), av, self.n, fro**2, steps=steps, fail_prob=p, seed=gen
        )
        return lz if lz.value <= fro else NormBound(fro, "frobenius", 0.0, lz.lower)

    def norm_w(self, steps: int, p: float, gen: torch.Generator) -> NormBound:
        w = self.wd
        return self._run(
            lambda q: torch.mv(w, q), lambda y: torch.mv(w.T, y), self.fro_w, steps, p, gen
        )

    def norm_t(self, steps: int, p: float, gen: torch.Generator) -> NormBound:
        return self._run(self._t, self._tt, self.fro_t, steps, p, gen)

    def norm_d(self, steps: int, p: float, gen: torch.Generator) -> NormBound:
        w = self.wd
        if self.wtd is not None:  # W~ dense: one product with Delta beats W q - W~ q
            d = w - self.wtd
            fro = frobenius(d)
            return self._run(
                lambda q: torch.mv(d, q), lambda y: torch.mv(d.T, y), fro, steps, p, gen
            )
        fro = self.fro_w + self.fro_t  # >= ||Delta||_F and covers |W| + |W~| in the margin
        return self._run(
            lambda q: torch.mv(w, q) - self._t(q),
            lambda y: torch.mv(w.T, y) - self._tt(y),
            fro,
            steps,
            p,
            gen,
        )
