"""Prior-law plans for whole neurons (`plan(..., method="neuron")`, docs/theory.md §4.5): the
norm bound of the pruned rows against Monte Carlo, and the plan against `verify`."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import batch_mlp
from torch import nn

import prunebound as pb
from prunebound.check.batch import prune_batch, sample_batch
from prunebound.theory import bound, plan
from prunebound.theory.prior_bounds import (
    neuron_delta_bound,
    row_norm_quantile,
    weight_norm_bound,
)
from prunebound.theory.values import Law

N_MC = 400
DELTA = 0.1
FAST = pb.SearchConfig(samples=64, restarts=4, steps=20)


def _sample(law: Law, n: int, d1: int, d2: int, gen: torch.Generator) -> torch.Tensor:
    if law.name == "uniform":
        return (torch.rand(n, d1, d2, generator=gen, dtype=torch.float64) * 2 - 1) * law.scale
    return torch.randn(n, d1, d2, generator=gen, dtype=torch.float64) * law.scale


@pytest.mark.parametrize("law_name", ["uniform", "gaussian"])
@pytest.mark.parametrize("m", [3, 20, 36])
def test_pruned_rows_bound_covers_the_empirical_quantile(law_name: str, m: int) -> None:
    d1, d2 = 40, 30
    law = Law(law_name, 1 / math.sqrt(d2))
    w = _sample(law, N_MC, d1, d2, torch.Generator().manual_seed(m))
    norms = w.norm(dim=2)
    order = norms.argsort(dim=1)
    pruned = torch.gather(w, 1, order[:, :m, None].expand(-1, -1, d2))  # the m smallest rows
    emp = float(torch.quantile(torch.linalg.matrix_norm(pruned, 2), 1 - DELTA))
    b, t_max = neuron_delta_bound(d1, d2, m, law, DELTA)
    full = weight_norm_bound(d1, d2, law, DELTA)
    assert emp <= b, f"{law_name} m={m}: bound {b:.4f} < empirical {emp:.4f}"
    t_emp = float(torch.quantile(norms.sort(dim=1).values[:, m], 1 - DELTA / 2))
    assert t_emp <= t_max  # the (m+1)-th smallest row norm
    if law_name == "gaussian" and m < d1 // 2:  # Lemma D with the conditioned rows: a real gain
        assert b < 0.85 * full


@pytest.mark.parametrize("law_name", ["uniform", "gaussian"])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_row_norm_quantile_is_an_upper_quantile(law_name: str, p: float) -> None:
    law = Law(law_name, 0.3)
    rows = _sample(law, 1, 20000, 17, torch.Generator().manual_seed(1))[0].norm(dim=1)
    t = row_norm_quantile(p, 17, law)
    assert float((rows <= t).double().mean()) >= p - 0.01
    if law_name == "gaussian":  # exact: chi quantile
        assert float((rows <= t).double().mean()) == pytest.approx(p, abs=0.01)


@pytest.mark.parametrize("law_name", ["uniform", "gaussian"])
def test_neuron_plan_counts_rows_and_passes_verify(law_name: str) -> None:
    widths = [32, 64, 64, 4]
    eps = 2.0 if law_name == "uniform" else 4.0
    p = plan(widths, eps, DELTA, method="neuron", law=law_name)
    assert p.method == "neuron" and "neurons" in str(p)
    counts = [lp.count for lp in p.layers]
    assert counts[0] > 0 and counts[-1] == 0  # the output layer keeps its logits
    assert all(c < s.shape[0] for c, s in zip(counts, p.specs, strict=True))
    assert [lp.fraction for lp in p.layers] == [
        c / s.shape[0] for c, s in zip(counts, p.specs, strict=True)
    ]
    # bound() is the inverse of plan()
    assert bound(widths, dict(p.counts), DELTA, method="neuron", law=law_name).eps <= eps
    rep = pb.verify(p, trials=100, seed=0, search=FAST)
    assert rep.violations == 0 and rep.passed and rep.gap_max <= eps
    # a plan pruning far more neurons than certified is caught by the same check
    greedy = replace(
        p,
        layers=tuple(
            replace(lp, count=s.shape[0] - 1) for lp, s in zip(p.layers, p.specs, strict=True)
        ),
        eps=rep.gap_max / 4,
    )
    assert pb.verify(greedy, trials=40, seed=0, search=FAST).violations >= 30


def test_prune_with_a_neuron_plan_removes_the_smallest_rows_as_verify_does() -> None:
    widths = [12, 24, 16, 3]
    p = plan(widths, 2.0, DELTA, method="neuron", law="uniform")
    batch = sample_batch(p, 2, torch.Generator().manual_seed(0))
    pruned = prune_batch(batch, [lp.count for lp in p.layers])
    for i in range(2):
        model, lins = batch_mlp(widths, batch, i)
        pb.prune(model, plan=p)
        for lin, wp, lp in zip(lins, pruned, p.layers, strict=True):
            gone = lin.weight.detach().eq(0).all(1)
            assert int(gone.sum()) == lp.count
            assert torch.equal(gone, wp[i].eq(0).all(1))


def test_neuron_plans_refuse_what_they_do_not_model() -> None:
    with pytest.raises(ValueError, match="prior law"):
        plan(pb.models.mlp([8, 8, 2]), 1.0, DELTA, method="neuron", law="trained")
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(ValueError, match=r"layer '0' is a conv2d"):
        plan(conv, 1.0, DELTA, method="neuron", input_shape=(1, 8, 8))
    partial = {"1": torch.ones(8, 8, dtype=torch.bool)}
    partial["1"][0, 0] = False  # one weight, not a whole row
    with pytest.raises(ValueError, match="whole rows"):
        bound([8, 8, 2], partial, DELTA, method="neuron")
    with pytest.raises(ValueError, match=r"count in \[0, 8\]"):
        bound([8, 8, 2], {"1": 9}, DELTA, method="neuron")
