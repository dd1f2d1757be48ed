"""Monte Carlo checks of plans (prunebound.check.verify): batching, search quality, validity, errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
from helpers import batch_mlp
from torch import nn

import prunebound as pb
from prunebound.check.batch import (
    Batch,
    forward,
    prune_batch,
    sample_batch,
    smallest,
    sphere,
    worst_gap,
)
from prunebound.stats import clopper_pearson_lower
from prunebound.theory import plan
from prunebound.theory.resolve import conv_specs
from prunebound.theory.values import Law, LayerPlan, LayerSpec

FAST = pb.SearchConfig(samples=32, restarts=4, steps=15)


def _module(specs: Sequence[LayerSpec], ws: Sequence[torch.Tensor], bs: Sequence[object], i: int):
    """Network i of a batch as plain torch modules (the per-network reference)."""
    mods: list[nn.Module] = []
    for j, (spec, w, b) in enumerate(zip(specs, ws, bs, strict=True)):
        if spec.kind == "linear":
            if j and specs[j - 1].kind != "linear":
                mods.append(nn.Flatten())
            layer: nn.Module = nn.Linear(spec.shape[1], spec.shape[0], bias=b is not None)
        else:
            layer = nn.Conv2d(
                spec.shape[1], spec.shape[0], spec.shape[2:], spec.stride, spec.padding,
                spec.dilation, bias=b is not None,
            )  # fmt: skip
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(w[i])
            if isinstance(b, torch.Tensor):
                layer.bias.copy_(b[i])
        mods += [layer, nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def _loop_gap(batch: Batch, pruned: Sequence[torch.Tensor], i: int, x: torch.Tensor):
    """||F(x) - f(x)|| of network i at inputs x (K, *in_shape), with nn.Modules."""
    big = _module(batch.specs, batch.weights, batch.biases, i)
    small = _module(batch.specs, pruned, batch.biases, i)
    with torch.no_grad():
        return (big(x) - small(x)).flatten(1).norm(dim=1)


def _mixed_specs() -> list[LayerSpec]:
    """Conv (stride 2, padding 1) -> conv -> flatten -> linear."""
    convs = conv_specs([2, 3, 4], 3, (7, 6), stride=2, padding=1)
    out = 4 * 2 * 2
    return [*convs, LayerSpec("lin", "linear", (5, out), (out,), bias=True)]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_batched_forward_and_gap_equal_per_network_loop(kind: str) -> None:
    specs = plan([6, 9, 7, 3], 1.0, 0.1).specs if kind == "linear" else _mixed_specs()
    p = plan(list(specs), 10.0, 0.1, method="random") if kind == "conv" else None
    p = p or plan([6, 9, 7, 3], 1.0, 0.1)
    gen = torch.Generator().manual_seed(1)
    batch = sample_batch(p, 5, gen, dtype=torch.float64)
    counts = [s.numel // 3 for s in p.specs]
    pruned = prune_batch(batch, counts)
    x = sphere(5, 11, p.specs[0].in_shape, 1.0, gen).double()
    y = forward(p.specs, batch.weights, batch.biases, x)
    gaps = (y - forward(p.specs, pruned, batch.biases, x)).norm(dim=-1)
    for i in range(5):
        ref = _module(p.specs, batch.weights, batch.biases, i)
        with torch.no_grad():
            torch.testing.assert_close(y[i], ref(x[i]).flatten(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gaps[i], _loop_gap(batch, pruned, i, x[i]))
    # the whole search: batched over 5 networks == one network at a time, same starts
    whole = worst_gap(batch, pruned, 1.0, x, FAST)
    for i in range(5):
        one = Batch(
            batch.specs,
            tuple(w[i : i + 1] for w in batch.weights),
            tuple(None if b is None else b[i : i + 1] for b in batch.biases),
            tuple(k[i : i + 1] for k in batch.keys),
        )
        alone = worst_gap(one, [w[i : i + 1] for w in pruned], 1.0, x[i : i + 1], FAST)
        torch.testing.assert_close(whole[i : i + 1], alone, rtol=1e-9, atol=1e-12)


def test_worst_gap_dominates_its_samples_and_stays_below_certificate() -> None:
    p = plan([5, 12, 8, 2], 1.0, 0.1)
    gen = torch.Generator().manual_seed(3)
    batch = sample_batch(p, 6, gen, dtype=torch.float64)
    pruned = prune_batch(batch, [s.numel // 2 for s in p.specs])
    x0 = sphere(6, 40, (5,), 1.0, gen).double()
    est = worst_gap(batch, pruned, 1.0, x0, FAST)
    gains = []
    for i in range(6):
        at_samples = _loop_gap(batch, pruned, i, x0[i])
        assert est[i] >= at_samples.max() - 1e-12, "search lost its best sample"
        gains.append(float(est[i] / at_samples.max()))
    assert max(gains) > 1.001, f"gradient ascent never improved on random samples: {gains}"
    rep = pb.verify(
        replace(p, layers=tuple(replace(lp, count=s.numel // 2) for lp, s in
                                zip(p.layers, p.specs, strict=True))),
        trials=12, search=FAST, certificates=True, dtype=torch.float64,
    )  # fmt: skip
    assert rep.certificates is not None
    for g, c in zip(rep.gaps, rep.certificates, strict=True):
        assert 0 < g <= c, f"gap estimate {g} above its certificate {c}"


@pytest.mark.parametrize("dim", [1, 2])
def test_search_finds_brute_force_sup_on_tiny_nets(dim: int) -> None:
    p = plan([dim, 8, 6, 2], 1.0, 0.1)
    gen = torch.Generator().manual_seed(7)
    batch = sample_batch(p, 4, gen, dtype=torch.float64)
    pruned = prune_batch(batch, [s.numel // 2 for s in p.specs])
    if dim == 1:
        grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)[:, None]
    else:  # the disc in polar coordinates, radius up to 1
        r, t = torch.meshgrid(
            torch.linspace(0, 1, 201, dtype=torch.float64),
            torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64),
            indexing="ij",
        )
        grid = torch.stack([r * t.cos(), r * t.sin()], -1).reshape(-1, 2)
    x0 = sphere(4, 8, (dim,), 1.0, gen).double()
    est = worst_gap(batch, pruned, 1.0, x0, pb.SearchConfig(samples=8, restarts=8, steps=60))
    for i in range(4):
        brute = float(_loop_gap(batch, pruned, i, grid).max())
        assert brute > 0
        assert est[i] == pytest.approx(brute, rel=5e-3), f"net {i}: search {est[i]}, brute {brute}"


@pytest.mark.parametrize("m", [0, 1, 999, 20_000, 39_000, 39_999, 40_000])
def test_smallest_selects_exactly_m_per_row(m: int) -> None:
    keys = torch.rand((6, 40_000), generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    keys[:2, :1000] = 0.0  # a misleading sample: those rows must take the exact fallback
    mask = smallest(keys, m, sample=1000)
    assert mask.sum(1).tolist() == [m] * 6
    if 0 < m < keys.shape[1]:
        kept_min = keys.masked_fill(mask, 2.0).min(1).values
        assert (keys.masked_fill(~mask, -1.0).max(1).values <= kept_min).all()


def test_valid_plan_has_few_violations() -> None:
    p = plan([16, 32, 8], 0.3, 0.05, method="magnitude")
    assert p.total_pruned > 0
    rep = pb.verify(p, trials=80, seed=0, search=FAST)
    assert rep.violations == 0, rep.gaps
    assert rep.rate_upper == pytest.approx(1 - 0.05 ** (1 / 80)) and rep.rate_upper <= p.delta
    assert rep.passed and rep.tightness < 1 and rep.gap_quantile <= p.eps
    assert rep.relative_eps == pytest.approx(p.eps / p.output_scale)
    assert len(rep.gaps) == 80 and min(rep.gaps) > 0
    d = rep.to_dict()
    assert d["search"]["steps"] == FAST.steps and d["violations"] == 0
    rnd = pb.verify(plan([16, 32, 8], 0.3, 0.05, method="random"), trials=60, search=FAST)
    assert rnd.violations == 0 and rnd.passed


def test_over_permissive_plans_are_caught() -> None:
    p = plan([16, 32, 8], 0.3, 0.05)
    greedy = replace(
        p,
        layers=tuple(
            replace(lp, count=int(0.9 * s.numel)) for lp, s in zip(p.layers, p.specs, strict=True)
        ),
    )
    for bad in (greedy, replace(p, eps=p.eps / 100)):
        rep = pb.verify(bad, trials=40, search=FAST)
        assert rep.violations >= 30, f"a wrong plan passed: {rep.violations}/40 violations"
        assert not rep.passed and clopper_pearson_lower(rep.violations, 40, 0.05) > p.delta


def test_verify_prunes_exactly_like_prune_with_plan() -> None:
    widths = [10, 20, 6]
    for method in ("magnitude", "random"):
        p = plan(widths, 0.5 if method == "magnitude" else 2.5, 0.1, method=method)
        assert p.total_pruned > 0
        model = pb.models.mlp(widths)
        pb.prune(model, plan=p)
        zeros = {r.name: r.zeros for r in pb.sparsity(model).layers}
        assert zeros == p.counts, "prune(plan=) must apply exactly the planned counts"
    gen = torch.Generator().manual_seed(0)
    p = plan(widths, 0.5, 0.1, method="magnitude")
    batch = sample_batch(p, 3, gen)
    pruned = prune_batch(batch, [lp.count for lp in p.layers])
    for i in range(3):
        model, lins = batch_mlp(widths, batch, i)
        pb.prune(model, plan=p)
        for lin, wp in zip(lins, pruned, strict=True):
            assert torch.equal(lin.weight.detach() != 0, wp[i] != 0)


def test_sampled_weights_and_biases_follow_the_plan_law() -> None:
    p = plan([50, 40, 30], 0.5, 0.1)
    batch = sample_batch(p, 50, torch.Generator().manual_seed(0))
    for spec, lp, w, b in zip(p.specs, p.layers, batch.weights, batch.biases, strict=True):
        a = 1 / math.sqrt(spec.fan_in)
        assert lp.law is not None and lp.law.scale == pytest.approx(a)
        for t in (w, b):
            assert t is not None and t.abs().max() <= a
            assert float(t.var()) == pytest.approx(a * a / 3, rel=0.05)
    # (built by hand: theory.plan(law="gaussian") is not needed to test the sampler)
    g = replace(
        p,
        law="gaussian",
        layers=tuple(replace(lp, law=Law("gaussian", lp.law.scale)) for lp in p.layers),  # type: ignore[union-attr]
    )
    bg = sample_batch(g, 50, torch.Generator().manual_seed(0))
    assert float(bg.biases[0].std()) == pytest.approx(1 / math.sqrt(50), rel=0.05)  # type: ignore[union-attr]


def test_bernoulli_plan_prunes_each_weight_with_its_fraction() -> None:
    p = plan([30, 40, 5], 2.0, 0.1, method="random", sampling="bernoulli")
    assert p.sampling == "bernoulli"
    q = [0.3] * len(p.layers)
    batch = sample_batch(p, 20, torch.Generator().manual_seed(0))
    pruned = prune_batch(batch, q, cutoff=True)
    frac = float((pruned[0] == 0).double().mean())
    assert frac == pytest.approx(0.3, abs=0.01)
    rep = pb.verify(p, trials=30, search=FAST)
    assert rep.sampling == "bernoulli" and rep.violations == 0


def test_verify_is_reproducible_and_chunk_sized() -> None:
    p = plan([8, 16, 4], 0.5, 0.1)
    a = pb.verify(p, trials=10, seed=3, search=FAST, chunk=4)
    b = pb.verify(p, trials=10, seed=3, search=FAST, chunk=4)
    c = pb.verify(p, trials=10, seed=4, search=FAST, chunk=4)
    assert a.gaps == b.gaps and a.gaps != c.gaps


def test_conv_plan_with_stride_and_padding() -> None:
    specs = conv_specs([2, 4, 4], 3, (9, 9), stride=2, padding=1)
    p = plan(list(specs), 6.0, 0.1, method="random")
    assert p.total_pruned > 0
    rep = pb.verify(p, trials=40, search=FAST, certificates=True)
    assert rep.certificates is not None and rep.certified is not None
    assert rep.violations == 0 and rep.certified >= 1
    assert all(g <= c for g, c in zip(rep.gaps, rep.certificates, strict=True))


def test_largest_fraction_brackets_the_plan() -> None:
    p = plan([16, 32, 8], 0.3, 0.1)
    lf = pb.largest_fraction(p, trials=20, search=FAST, iters=5)
    assert lf.direction == "plan" and lf.allowed_violations == 2
    planned = [lp.fraction for lp in p.layers]
    assert lf.planned == tuple(planned)
    for e, f, r in zip(lf.empirical, planned, lf.ratio, strict=True):
        if f > 0:
            assert e == pytest.approx(min(1.0, lf.scale * f)) and r == pytest.approx(e / f)
            assert r >= 1, "the plan is valid, so the empirical fraction is at least as large"
        else:
            assert e == 0 and r is None
    ok = [s for s, k in lf.evaluations if k <= 2]
    assert lf.scale == max(ok)
    assert all(k > 2 for s, k in lf.evaluations if s > lf.scale)
    nothing = replace(p, layers=tuple(replace(lp, count=0, fraction=0.0) for lp in p.layers))
    lf0 = pb.largest_fraction(nothing, trials=10, search=FAST, iters=3)
    assert lf0.direction == "uniform" and lf0.total_ratio is None
    assert len(set(lf0.empirical)) == 1 and lf0.empirical[0] > 0


def test_bad_input_is_refused() -> None:
    p = plan([8, 16, 4], 0.5, 0.1)
    with pytest.raises(ValueError, match="trials"):
        pb.verify(p, trials=0)
    with pytest.raises(ValueError, match="confidence"):
        pb.verify(p, trials=5, confidence=1.5)
    with pytest.raises(ValueError, match="delta"):
        pb.verify(replace(p, delta=1.0), trials=5)
    with pytest.raises(ValueError, match="eps"):
        pb.verify(replace(p, eps=0.0), trials=5)
    with pytest.raises(TypeError, match="Plan"):
        pb.verify({"counts": {}}, trials=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="law"):
        pb.verify(replace(p, law="trained"), trials=5)
    with pytest.raises(ValueError, match="restarts"):
        pb.SearchConfig(samples=4, restarts=8)
    with pytest.raises(ValueError, match="steps"):
        pb.SearchConfig(steps=-1)
    with pytest.raises(ValueError, match="iters"):
        pb.largest_fraction(p, trials=5, iters=0)
    broken = (p.specs[0], LayerSpec("x", "linear", (3, 99), (99,)))
    lps = tuple(LayerPlan(s.name, 0, 0.0, None, 0.0, 0.0, p.layers[0].law) for s in broken)
    with pytest.raises(ValueError, match="plain Linear/Conv chain"):
        pb.verify(replace(p, specs=broken, layers=lps), trials=5)


def test_plan_from_a_non_relu_module_is_refused() -> None:
    # verify rebuilds ReLU chains; a Tanh network must not be checked as if it were one
    torch.manual_seed(0)  # default init draws from the global RNG: independent of test order
    tanh = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    relu = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    assert pb.theory.plan(relu, 0.5, 0.1).activation == "relu"
    p = pb.theory.plan(tanh, 0.5, 0.1)
    assert p.activation == "other"
    with pytest.raises(ValueError, match="ReLU between layers"):
        pb.verify(p, trials=2)


def test_report_prints_a_short_summary_and_a_bounded_repr() -> None:
    rep = pb.verify(plan([16, 32, 8], 0.3, 0.05, method="magnitude"), trials=200, search=FAST)
    text = str(rep)
    lines = text.splitlines()
    assert len(lines) == 3, text
    assert lines[0].startswith("VerifyReport: PASS: 0/200 networks with gap > eps = ")
    assert f"max {rep.gap_max:.4g}" in lines[2] and "median" in lines[2]
    r = repr(rep)
    assert "gaps=<200 floats>" in r and "violations=0" in r and "certificates=None" in r
    assert len(r) < 600 and str(rep.gaps[0]) not in r  # no 200-element dump


def test_report_says_when_too_few_trials_fail_a_clean_run() -> None:
    rep = pb.verify(plan([16, 32, 8], 0.3, 0.05, method="magnitude"), trials=20, search=FAST)
    assert rep.violations == 0 and not rep.passed
    assert str(rep).startswith(
        "VerifyReport: FAIL (no violation, but too few trials to bound the rate by delta): 0/20"
    )
