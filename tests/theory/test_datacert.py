"""Data certificates (theory/datacert.py) and weight-law checks (theory/assumptions.py)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunebound as pb
from prunebound.stats import clopper_pearson_upper
from prunebound.theory.assumptions import check_law, check_model
from prunebound.theory.datacert import data_certificate, dense_reference, shared_samples
from prunebound.theory.heldout_plan import search_data_plan

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(seed: int = 0, widths: tuple[int, ...] = (8, 32, 32, 4)) -> nn.Sequential:
    torch.manual_seed(seed)  # test-only: nn.Linear's default init draws from the global RNG
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers).eval()


# ----------------------------------------------------------------------------- Clopper-Pearson


def test_clopper_pearson_known_values() -> None:
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    # U solves P(Binomial(n, U) <= k) = delta
    from scipy import stats

    u = clopper_pearson_upper(7, 50, 0.1)
    assert stats.binom.cdf(7, 50, u) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="delta must be in"):
        clopper_pearson_upper(1, 10, 0.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson_upper(11, 10, 0.1)


def test_clopper_pearson_coverage_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    delta, n, reps = 0.1, 200, 4000
    for p in (0.01, 0.1, 0.4):
        ks = rng.binomial(n, p, size=reps)
        uppers = {k: clopper_pearson_upper(int(k), n, delta) for k in set(ks.tolist())}
        covered = np.mean([uppers[int(k)] >= p for k in ks])
        # exact CP is conservative: coverage >= 1 - delta; 3 sigma of MC noise below
        assert covered >= 1 - delta - 3 * math.sqrt(delta * (1 - delta) / reps), (p, covered)


# ---------------------------------------------------------------------------- data_certificate


def test_data_certificate_counts_match_manual() -> None:
    net = pb.prune(_net(), "magnitude", 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(500, 8, generator=_gen(1))
    y = torch.randint(0, 4, (500,), generator=_gen(2))
    ref = pb.reset(copy.deepcopy(net))
    with torch.no_grad():
        gaps = (net(x).double() - ref(x).double()).norm(dim=1)
        flips = int((net(x).argmax(1) != ref(x).argmax(1)).sum())
        new_err = int(((ref(x).argmax(1) == y) & (net(x).argmax(1) != y)).sum())
    eps = float(gaps.median())
    cert = data_certificate(net, (x, y), eps, confidence=0.95)
    assert cert.exceed == int((gaps > eps).sum())
    assert cert.flips == flips and cert.new_errors == new_err
    assert cert.exceed_upper == pytest.approx(clopper_pearson_upper(cert.exceed, 500, 0.05))
    assert cert.exceed_rate <= cert.exceed_upper <= 1
    assert cert.max_gap == pytest.approx(float(gaps.max()), rel=1e-6)
    assert pb.is_pruned(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    json.dumps(cert.to_dict())


def test_data_certificate_unpruned_is_zero_and_covers_population() -> None:
    net = _net(1)
    cert = data_certificate(net, torch.randn(300, 8, generator=_gen(0)), 1e-6, confidence=0.95)
    assert cert.exceed == 0 and cert.flips == 0 and cert.new_errors is None
    assert cert.exceed_upper == pytest.approx(1 - 0.05 ** (1 / 300))
    # against a large "population" sample: the certified upper limit covers the true rate
    pruned = pb.prune(_net(2), "magnitude", 0.7)
    eps = 0.05
    cert = data_certificate(pruned, torch.randn(400, 8, generator=_gen(3)), eps, confidence=0.99)
    pop = data_certificate(pruned, torch.randn(40000, 8, generator=_gen(4)), eps, confidence=0.99)
    assert 0 < pop.exceed_rate <= cert.exceed_upper


def test_data_certificate_bad_input() -> None:
    net = _net()
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="eps must be"):
        data_certificate(net, x, -1.0, confidence=0.9)
    with pytest.raises(ValueError, match=r"confidence must be a float in \(0, 1\)"):
        data_certificate(net, x, 0.1, confidence=1.0)
    with pytest.raises(ValueError, match="labels must match"):
        data_certificate(net, (x, torch.zeros(3, dtype=torch.long)), 0.1, confidence=0.9)
    with pytest.raises(TypeError, match="data must be"):
        data_certificate(net, [1, 2, 3], 0.1, confidence=0.9)  # type: ignore[arg-type]


def test_search_data_plan_searches_then_certifies_on_other_split() -> None:
    net = _net(5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xs = torch.randn(400, 8, generator=_gen(0))
    xc = torch.randn(400, 8, generator=_gen(1))
    eps, delta, alpha = 0.1, 0.05, 0.2
    counts, cert = search_data_plan(
        net, xs, xc, eps, max_gap_rate=alpha, confidence=1 - delta, grid=(0.25, 0.5, 0.75)
    )
    assert not pb.is_pruned(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert set(counts) == {"0", "2", "4"} and sum(counts.values()) > 0
    assert cert.n == 400 and cert.eps == eps
    # the chosen pruning meets the target on the search split...
    pruned = pb.prune(
        copy.deepcopy(net), "magnitude", counts={k: v for k, v in counts.items() if v}
    )
    on_search = data_certificate(pruned, xs, eps, confidence=1 - delta)
    assert on_search.exceed_upper <= alpha
    # ...and the certify-split certificate is that of the same pruned model
    again = data_certificate(pruned, xc, eps, confidence=1 - delta)
    assert again.exceed == cert.exceed
    # one more grid step in any layer would break the target on the search split (maximality)
    sizes = {k: pb.original_weight(m).numel() for k, m in pb.prunable_layers(net).items()}
    for name, c in counts.items():
        frac = c / sizes[name]
        nxt = [g for g in (0.25, 0.5, 0.75) if g > frac + 1e-9]
        if nxt:
            trial = {**counts, name: round(nxt[0] * sizes[name])}
            t = pb.prune(
                copy.deepcopy(net), "magnitude", counts={k: v for k, v in trial.items() if v}
            )
            assert data_certificate(t, xs, eps, confidence=1 - delta).exceed_upper > alpha


def test_search_data_plan_rejects_same_split() -> None:
    x = torch.randn(50, 8)
    with pytest.raises(ValueError, match="disjoint"):
        search_data_plan(_net(), x, x, 0.1, max_gap_rate=0.2, confidence=0.95)
    with pytest.raises(ValueError, match="max_gap_rate must be a float in"):
        search_data_plan(_net(), x, x.clone(), 0.1, max_gap_rate=1.5, confidence=0.95)


# --------------------------------------------------------------------------------- assumptions


def test_default_init_passes_uniform_at_nominal_rate() -> None:
    rejections = 0
    trials = 60
    for seed in range(trials):
        torch.manual_seed(1000 + seed)  # test-only: default init uses the global RNG
        checks = check_model(nn.Sequential(nn.Linear(60, 40)), "uniform", init_scale=True)
        assert checks[0].scale == pytest.approx(1 / math.sqrt(60))
        rejections += not checks[0].passed
    # nominal 5%; Binomial(60, 0.05) exceeds 9 with probability < 0.002
    assert rejections <= 9
    fitted = check_law(torch.rand(200, 50, generator=_gen(0)) * 2 - 1, "uniform")
    assert fitted.scale_fitted and fitted.passed
    gauss = check_law(torch.randn(200, 50, generator=_gen(1)) * 0.3, "gaussian", scale=0.3)
    assert gauss.passed and gauss.row_p is not None and gauss.row_p > 0.001


def _trained_mlp() -> nn.Sequential:
    """A small MLP trained by plain gradient descent on a structured synthetic task: half of
    the 64 input features are constant zero (like the border pixels of digit images)."""
    g = _gen(0)
    x = torch.rand(1024, 64, generator=g)
    x[:, 32:] = 0.0
    y = (x[:, :32] @ torch.randn(32, 10, generator=g)).argmax(1)
    net = _net(0, (64, 64, 10)).train()
    for _ in range(200):
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.5 * p.grad
    return net.eval()


def test_trained_weights_fail_the_law_check() -> None:
    checks = check_model(_trained_mlp(), "uniform", init_scale=True)
    assert not any(c.passed for c in checks)
    assert all(c.p_value < 1e-6 for c in checks)
    # the input layer's columns carry very unequal energy after training (dead inputs)
    assert checks[0].col_p is not None and checks[0].col_p < 1e-6


def test_check_law_bad_input() -> None:
    w = torch.randn(5, 5)
    with pytest.raises(ValueError, match="law must be"):
        check_law(w, "cauchy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be"):
        check_law(w, "uniform", scale=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        check_law(w, "uniform", alpha=0.0)


# ------------------------------------------------------------- data plans (pb.theory.plan law=data)


def test_random_data_plan_prunes_the_certified_mask() -> None:
    net = _net(3)
    xs = torch.randn(300, 8, generator=_gen(0))
    xc = torch.randn(300, 8, generator=_gen(1))
    eps, delta, alpha = 0.3, 0.05, 0.3
    p = pb.theory.data_plan(
        net, (xs, xc), eps, max_gap_rate=alpha, confidence=1 - delta, method="random", seed=7
    )
    assert p.seed == 7 and p.to_dict()["seed"] == 7 and p.total_pruned > 0
    certified = pb.masks(pb.prune(dense_reference(net), "random", counts=p.counts, seed=7))
    applied = pb.masks(pb.prune(copy.deepcopy(net), plan=p))
    assert applied.keys() == certified.keys()
    assert all(torch.equal(applied[k], certified[k]) for k in certified)
    # the certificate in the notes is that of the pruned model
    cert = data_certificate(pb.prune(copy.deepcopy(net), plan=p), xc, eps, confidence=1 - delta)
    assert f"<= {cert.exceed_upper:.4g}" in p.notes[0]
    # an explicit seed still wins; magnitude plans record none
    other = pb.masks(pb.prune(copy.deepcopy(net), plan=p, seed=8))
    assert any(not torch.equal(other[k], certified[k]) for k in certified if p.counts[k])
    pm = pb.theory.data_plan(net, (xs, xc), eps, max_gap_rate=alpha, confidence=1 - delta)
    assert pm.seed is None


def test_data_plan_failing_certification_prunes_nothing() -> None:
    net = _net(4)
    xs = 1e-3 * torch.randn(300, 8, generator=_gen(0))  # tiny inputs: every pruning passes
    xc = 1e3 * torch.randn(300, 8, generator=_gen(1))  # huge ones: the searched pruning fails
    eps, delta, alpha = 0.1, 0.05, 0.2
    counts, cert = search_data_plan(net, xs, xc, eps, max_gap_rate=alpha, confidence=1 - delta)
    assert sum(counts.values()) > 0 and cert.exceed_upper > alpha  # the scenario
    p = pb.theory.data_plan(net, (xs, xc), eps, max_gap_rate=alpha, confidence=1 - delta)
    assert p.total_pruned == 0
    assert "FAILED" in p.notes[0] and f"{cert.exceed_upper:.4g}" in p.notes[0]
    assert f"max_gap_rate = {alpha:.4g}" in p.notes[0]
    pruned = pb.prune(copy.deepcopy(net), plan=p)
    assert data_certificate(pruned, xc, eps, confidence=1 - delta).exceed == 0


def test_data_plan_refuses_inputs_labels_and_overlapping_splits() -> None:
    net = _net(5)
    x = torch.randn(100, 8, generator=_gen(0))
    y = torch.randint(0, 4, (100,), generator=_gen(1))
    with pytest.raises(ValueError, match=r"looks like data=\(inputs, labels\)"):
        pb.theory.data_plan(net, (x, y), 0.1, max_gap_rate=0.2, confidence=0.95)
    with pytest.raises(ValueError, match="differ in sample shape"):
        pb.theory.data_plan(net, (x, torch.randn(100)), 0.1, max_gap_rate=0.2, confidence=0.95)
    with pytest.raises(ValueError, match="disjoint"):
        pb.theory.data_plan(net, (x[:60], x[40:]), 0.1, max_gap_rate=0.2, confidence=0.95)
    with pytest.raises(ValueError, match="disjoint"):
        search_data_plan(
            net, (x[:60], y[:60]), (x[40:], y[40:]), 0.1, max_gap_rate=0.2, confidence=0.95
        )
    # the supported forms: disjoint views of one tensor, with or without labels
    for data in [(x[:50], x[50:]), ((x[:50], y[:50]), (x[50:], y[50:])), (x[::2], x[1::2])]:
        p = pb.theory.data_plan(net, data, 0.1, max_gap_rate=0.3, confidence=0.95)
        assert p.guarantee == "data" and p.law is None


def test_splits_are_compared_by_content_not_storage() -> None:
    # issue 9 defect 10: clones, index copies and the same data twice passed the storage check
    net = _net(5)
    x = torch.randn(200, 8, generator=_gen(0))
    perm = torch.randperm(200, generator=_gen(2))
    for search, cert, shared in [
        (x[perm[:120]], x[perm[80:]], 40),  # index copies: new storage, 40 common rows
        (x[:100], x[:100].clone(), 100),  # a clone
        (x[:100].clone(), torch.cat([x[150:], x[:1].clone()]), 1),  # one row in common
    ]:
        with pytest.raises(ValueError, match=rf"got {shared} of the {cert.shape[0]} certify"):
            search_data_plan(net, search, cert, 0.1, max_gap_rate=0.2, confidence=0.95)
    assert shared_samples(x[:100], x[100:].clone()) == 0


def test_a_model_retrained_after_pruning_needs_its_reference() -> None:
    # issue 9 defect 8: reset(retrained model) is a model that never existed
    net = _net(5)
    dense = copy.deepcopy(net)
    x = torch.randn(64, 8, generator=_gen(0))
    pb.prune(net, "magnitude", 0.5)
    data_certificate(copy.deepcopy(net), x, 0.1, confidence=0.95)  # not retrained: the default is F
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).square().mean().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"trained after pruning.*pass reference="):
        data_certificate(net, x, 0.1, confidence=0.95)
    cert = data_certificate(net, x, 0.1, confidence=0.95, reference=dense)
    assert cert.n == 64
