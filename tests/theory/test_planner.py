"""Probabilistic plans (prunebound.theory.planner): validation, arithmetic, Monte Carlo guarantee."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from soundness import worst_gap
from torch import nn

import prunebound as pb
from prunebound.theory import LayerSpec, bound, plan, propagate
from prunebound.theory.prior_bounds import magnitude_delta_bound, weight_norm_bound
from prunebound.theory.randmat import bias_norm_bound
from prunebound.theory.values import Law

WIDTHS = [32, 64, 64, 10]


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -1.0}, r"eps must be a finite number > 0, got -1.0"),
        ({"eps": math.nan}, "eps must be a finite number > 0"),
        ({"delta": 0.0}, r"delta must be a float in \(0, 1\), got 0.0"),
        ({"delta": 1.0}, "delta must be a float in"),
        ({"radius": 0.0}, "radius must be a finite number > 0"),
        (
            {"method": "taylor"},
            r"method must be one of 'magnitude', 'random', 'neuron', got 'taylor'",
        ),
        ({"law": "cauchy"}, "law must be one of"),
        ({"split": "even"}, r"split must be one of 'optimized', 'equal', 'params'"),
        ({"sampling": "bernoulli"}, "needs method='random'"),
        ({"law": Law("uniform", -2.0)}, "law.scale must be a finite number > 0"),
    ],
)
def test_plan_rejects_invalid_input(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"eps": 0.5, "delta": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan(WIDTHS, **args)  # type: ignore[arg-type]


def test_bad_targets_and_amounts() -> None:
    with pytest.raises(TypeError, match="target must be"):
        plan("32-64", 0.5, 0.1)
    with pytest.raises(ValueError, match="widths must be"):
        plan([32, 0, 10], 0.5, 0.1)
    with pytest.raises(ValueError, match="unknown layers"):
        bound(WIDTHS, {"fc9": 3}, 0.1)
    with pytest.raises(ValueError, match=r"fraction for layer '1' must be in \[0, 1\], got 1.5"):
        bound(WIDTHS, [1.5, 0.0, 0.0], 0.1)
    with pytest.raises(ValueError, match=r"needs an nn\.Module"):
        plan(WIDTHS, 0.5, 0.1, law="trained")


# --- arithmetic --------------------------------------------------------------------------------


def test_single_layer_bound_is_hand_computable() -> None:
    # One linear layer, no bias: gap = ||Delta|| * R, with ||Delta|| from docs §4.2 at delta.
    spec = LayerSpec("fc", "linear", (20, 30), (30,), bias=False)
    res = bound([spec], {"fc": 150}, 0.1, radius=2.0)
    law = Law("uniform", 1 / math.sqrt(30))
    assert res.eps == pytest.approx(2.0 * magnitude_delta_bound(20, 30, 150, law, 0.1 / 2)[0])
    assert res.norm_w[0] == pytest.approx(weight_norm_bound(20, 30, law, 0.1 / 4))
    assert res.output_scale == pytest.approx(2.0 * res.norm_w[0])


def test_bound_matches_lemma_a_with_bias() -> None:
    res = bound(WIDTHS, [0.3, 0.2, 0.1], 0.05)
    p = propagate(res.norm_w, res.norm_kept, res.norm_delta, res.bias_norms, 1.0)
    assert res.eps == pytest.approx(p.gap)
    assert res.bias_norms[0] == pytest.approx(
        bias_norm_bound(64, "uniform", 1 / math.sqrt(32), 0.05 / 3 / 4)
    )
    assert res.counts == (round(0.3 * 64 * 32), round(0.2 * 64 * 64), 1 * 64)


@pytest.mark.parametrize("split", ["optimized", "equal", "params"])
def test_plan_meets_eps_and_is_maximal_per_layer(split: str) -> None:
    p = plan(WIDTHS, 0.6, 0.1, split=split)
    counts = [lp.count for lp in p.layers]
    res = bound(WIDTHS, dict(p.counts), 0.1)
    assert res.eps <= 0.6 + 1e-12
    assert sum(lp.eps_share for lp in p.layers) == pytest.approx(res.eps)
    assert sum(lp.delta_share for lp in p.layers) == pytest.approx(0.1)
    assert p.total_pruned > 0
    if split == "optimized":  # no single layer can take one more weight
        for l, spec in enumerate(p.specs):
            if counts[l] < spec.numel:
                more = {
                    s.name: c + (i == l)
                    for i, (s, c) in enumerate(zip(p.specs, counts, strict=True))
                }
                assert bound(WIDTHS, more, 0.1).eps > 0.6


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_plan_monotone_in_eps(method: str) -> None:
    totals, fracs = [], []
    for eps in (0.3, 0.6, 1.2, 2.4) if method == "magnitude" else (4.0, 5.0, 6.0, 8.0):
        p = plan(WIDTHS, eps, 0.1, method=method, split="equal")
        totals.append(p.total_pruned)
        fracs.append([lp.fraction for lp in p.layers])
    assert totals == sorted(totals) and totals[-1] > totals[0], totals
    for l in range(3):
        col = [f[l] for f in fracs]
        assert col == sorted(col), col
    opt = [plan(WIDTHS, e, 0.1, method=method).total_pruned for e in (0.3, 0.6, 1.2, 2.4, 4.0)]
    assert opt == sorted(opt)


def test_optimized_split_prunes_at_least_as_much_as_fixed_splits() -> None:
    opt = plan(WIDTHS, 0.6, 0.1).total_pruned
    assert opt >= plan(WIDTHS, 0.6, 0.1, split="equal").total_pruned
    assert opt >= plan(WIDTHS, 0.6, 0.1, split="params").total_pruned


def test_plan_fields_and_to_dict() -> None:
    p = plan(WIDTHS, 0.6, 0.1, split="equal")
    assert p.sampling == "count" and p.method == "magnitude" and p.law == "uniform"
    for lp, spec in zip(p.layers, p.specs, strict=True):
        assert lp.fraction == lp.count / spec.numel
        assert lp.law == Law("uniform", 1 / math.sqrt(spec.fan_in))
        assert lp.threshold is not None and 0 < lp.threshold <= lp.law.scale
    d = p.to_dict()
    assert d["counts"] == p.counts and d["relative_eps"] == pytest.approx(0.6 / p.output_scale)
    rp = plan(WIDTHS, 2.0, 0.1, method="random", sampling="bernoulli", split="equal")
    assert rp.sampling == "bernoulli" and all(lp.threshold is None for lp in rp.layers)


def test_plan_applies_exact_counts_with_prune() -> None:
    p = plan(WIDTHS, 0.6, 0.1, split="equal")
    model = pb.models.mlp(WIDTHS)
    pb.prune(model, plan=p)
    zeros = {ls.name: ls.zeros for ls in pb.sparsity(model).layers}
    assert zeros == p.counts


def test_conv_target_random_plan() -> None:
    specs = [
        LayerSpec(
            "0", "conv2d", (8, 3, 3, 3), (3, 16, 16), stride=(1, 1), padding=(1, 1), bias=True
        ),
        LayerSpec(
            "2", "conv2d", (16, 8, 3, 3), (8, 16, 16), stride=(2, 2), padding=(1, 1), bias=True
        ),
    ]
    p = plan(specs, 200.0, 0.1, method="random", split="equal")
    assert p.total_pruned > 0
    assert bound(specs, dict(p.counts), 0.1, method="random").eps <= 200.0
    # Lemma C: stride 2 / kernel 3 gives multiplicity 2*2 = 4 (factor 2), stride 1 gives 9 (3).
    res = bound(specs, [0.0, 0.0], 0.1)
    flat = [
        weight_norm_bound(8, 27, Law("uniform", 1 / math.sqrt(27)), 0.1 / 2 / 4),
        weight_norm_bound(16, 72, Law("uniform", 1 / math.sqrt(72)), 0.1 / 2 / 4),
    ]
    assert res.norm_w == pytest.approx((3 * flat[0], 2 * flat[1]))


# --- trained mode --------------------------------------------------------------------------------


def test_trained_magnitude_is_exact_lemma_a() -> None:
    model = pb.models.mlp([16, 24, 5])
    p = plan(model, 0.5, 0.1, law="trained", split="equal")
    assert all(lp.delta_share == 0 for lp in p.layers)
    res = bound(model, dict(p.counts), 0.1, law="trained")
    layers = [m for m in model if isinstance(m, nn.Linear)]
    w1, w2 = (lin.weight.detach().double() for lin in layers)
    m1 = p.counts["1"]
    thr = w1.abs().flatten().sort().values[m1 - 1] if m1 else -1.0
    d1 = torch.where(w1.abs() <= thr, w1, 0.0)
    assert res.norm_delta[0] == pytest.approx(float(torch.linalg.matrix_norm(d1, 2)), rel=1e-6)
    assert res.norm_w[1] == pytest.approx(float(torch.linalg.matrix_norm(w2, 2)), rel=1e-6)
    assert res.eps <= 0.5
    # the certificate holds for this very model: worst gap found is below eps
    pruned = pb.prune(copy.deepcopy(model), plan=p)
    assert 0 < worst_gap(pruned, model, radius=1.0, input_shape=(16,)) <= 0.5


# --- Monte Carlo: the guarantee holds -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("method", "eps"), [("magnitude", 0.5), ("random", 2.0)])
def test_monte_carlo_plan_guarantee(method: str, eps: float) -> None:
    delta, n = 0.1, 100
    p = plan(WIDTHS, eps, delta, method=method)
    assert p.total_pruned > 0
    # networks drawn from the plan's law, pruned as the plan says, worst gap searched (the
    # batched engine is itself checked against tests/soundness.worst_gap in tests/check)
    rep = pb.verify(p, trials=n, seed=123)
    # a valid bound: violations ~ 0; allow the delta rate itself (binomial 99.9% upper limit ~ 20)
    assert rep.violations <= 20, f"{rep.violations}/{n} gaps above eps={eps}: {rep.gap_max:.4f}"
    assert rep.violations == 0, f"unexpected (but within delta) violations: {rep.violations}"
    assert rep.gap_max > 0.0


def test_trained_random_plan_meets_eps_over_masks() -> None:
    model = pb.models.mlp([16, 24, 5])
    p = plan(model, 3.0, 0.1, law="trained", method="random", split="equal")
    assert p.total_pruned > 0
    assert all(lp.delta_share > 0 for lp in p.layers)
    assert bound(model, dict(p.counts), 0.1, law="trained", method="random").eps <= 3.0


def test_law_rejected_by_ks_is_noted() -> None:
    model = pb.models.mlp([16, 64, 5])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(64, 16, generator=gen))  # N(0, 1), not U[+-1/4]
        model[3].weight.copy_((torch.rand(5, 64, generator=gen) * 2 - 1) / 8)  # the law
    with pytest.warns(UserWarning, match=r"layers \['1'\] of this model fail the law check"):
        p = plan(model, 0.5, 0.1, law="uniform", split="equal")
    assert any("does not apply to layer 1" in n and "KS p=" in n for n in p.notes), p.notes
    assert not any("layer 3" in n for n in p.notes)


def test_plan_has_no_data_or_sampled_mode_any_more() -> None:
    """One planner per guarantee: data and sampled plans are their own functions."""
    model = pb.models.mlp([8, 16, 3])
    with pytest.raises(ValueError, match="law must be one of 'uniform', 'gaussian', 'trained'"):
        plan(model, 0.5, 0.1, law="data")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'bound'"):
        plan(model, 0.5, 0.1, bound="sampled")  # type: ignore[call-arg]
    params = inspect.signature(plan).parameters
    assert len(params) <= 10, list(params)


def test_data_plan_is_its_own_planner() -> None:
    torch.manual_seed(0)  # default init draws from the global RNG: independent of test order
    model = pb.models.mlp([8, 16, 3])
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen)
    p = pb.theory.data_plan(model, (x1, x2), 0.5, max_gap_rate=0.1, confidence=0.9)
    assert p.guarantee == "data" and p.law is None and set(p.counts) == {"1", "3"}
    assert p.confidence == 0.9 and p.max_gap_rate == 0.1
    assert "not a sup over the ball" in p.notes[0]
    assert "Plan (data, magnitude)" in str(p) and "P_x(gap > eps) <= 0.1" in str(p)
    with pytest.raises(TypeError, match="max_gap_rate"):
        pb.theory.data_plan(model, (x1, x2), 0.5)  # type: ignore[call-arg]


def test_trained_conv_plan_uses_conv_norms() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    p = plan(model, 0.5, 0.1, law="trained", input_shape=(2, 6, 6), split="equal")
    res = bound(model, dict(p.counts), 0.1, law="trained", input_shape=(2, 6, 6))
    assert res.eps <= 0.5 and p.total_pruned > 0
    w = model[0].weight.detach().double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(50):  # power iteration: a lower estimate of the true conv norm
        y = nn.functional.conv2d(x, w, padding=1)
        x = nn.functional.conv_transpose2d(y, w, padding=1)
        x = x / x.norm()
    lower = float(nn.functional.conv2d(x, w, padding=1).norm())
    assert lower <= res.norm_w[0] <= 3 * float(torch.linalg.matrix_norm(w.reshape(4, -1), 2)) + 1e-9


def test_trained_tightened_plan_prunes_more_and_is_certified() -> None:
    torch.manual_seed(5)  # test-only: default init uses the global RNG
    model = pb.models.mlp([16, 24, 12, 5]).eval()
    base = plan(model, 0.3, 0.1, law="trained")
    tight = plan(model, 0.3, 0.1, law="trained", tighten=True)
    assert all(t >= b for t, b in zip(tight.counts.values(), base.counts.values(), strict=True))
    assert tight.total_pruned > base.total_pruned
    assert any("tightened" in n for n in tight.notes)
    pruned = pb.prune(copy.deepcopy(model), plan=tight)
    cert = pb.theory.certify(pruned, radius=1.0)
    assert cert.bound <= 0.3
    assert 0 < worst_gap(pruned, model, radius=1.0, input_shape=(16,)) <= cert.bound
    with pytest.raises(ValueError, match="tighten=True needs law='trained'"):
        plan(model, 0.3, 0.1, law="uniform", tighten=True)


def test_gaussian_magnitude_plan_is_finite_without_warnings() -> None:
    # regression: counts near n made the Gaussian threshold bound infinite (numpy warnings)
    p = plan([50, 40, 30], 0.5, 0.1, law="gaussian")
    assert p.total_pruned > 0
    assert all(lp.threshold is None or math.isfinite(lp.threshold) for lp in p.layers)


# --- layers before the first prunable layer (audit bug 1) ---------------------------------------


def test_plan_and_bound_account_for_a_leading_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].running_var.fill_(0.01)  # type: ignore[operator]
    model.eval()
    p = plan(model, eps=0.5, delta=0.05, law="trained")
    pruned = pb.prune(copy.deepcopy(model), plan=p)
    assert worst_gap(pruned, model, input_shape=(8,)) <= 0.5
    # bound sees the 10x gain of the BatchNorm: the same counts without it certify less
    b = bound(model, p.counts, 0.05, law="trained")
    b_plain = bound(copy.deepcopy(model)[1:], p.counts, 0.05, law="trained")
    assert b.eps <= 0.5 + 1e-9
    assert b.eps > 5 * b_plain.eps
    assert worst_gap(pruned, model, input_shape=(8,)) <= b.eps


def test_leading_relu_and_dropout_map_the_ball_into_itself() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Identity(), *body).eval()
    counts = {"3": 40, "5": 10}
    b = bound(model, counts, 0.05, law="trained")
    b_body = bound(body, {"0": 40, "2": 10}, 0.05, law="trained")
    assert b.eps == pytest.approx(b_body.eps)
