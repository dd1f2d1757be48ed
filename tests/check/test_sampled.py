"""Sampled-certificate plans (`check.sampled_plan(theory.plan(...))`, docs/theory.md §6b)."""

from __future__ import annotations

import math

import pytest
import torch

import prunebound as pb
from prunebound.check.sampled import (
    SEARCH_STREAM,
    default_n_cert,
    network_generator,
    sampled_plan,
)
from prunebound.stats import clopper_pearson_upper
from prunebound.theory import plan

WIDTHS = [16, 12, 8, 4]
DELTA = 0.05
SEARCH = pb.SearchConfig(samples=32, restarts=4, steps=20)


def _theorem(method: str, rel: float = 0.2) -> pb.theory.Plan:
    r_l = plan(WIDTHS, 1.0, DELTA, method=method).output_scale
    return plan(WIDTHS, rel * r_l, DELTA, method=method)


@pytest.fixture(scope="module")
def random_sp() -> object:
    return sampled_plan(_theorem("random"), n_search=8, seed=3)


def test_default_n_cert_is_the_smallest_zero_failure_sample() -> None:
    n = default_n_cert(0.95, DELTA, 3)
    assert n == 80  # log(0.05 / 3) / log(0.95) = 79.8
    assert (
        clopper_pearson_upper(0, n, 0.05 / 3) <= DELTA < clopper_pearson_upper(0, n - 1, 0.05 / 3)
    )


def test_accepted_only_when_clopper_pearson_limit_is_at_most_delta(random_sp: object) -> None:
    sp = random_sp
    assert sp.accepted
    last = sp.attempts[-1]
    assert last.accepted and last.upper == clopper_pearson_upper(last.k, last.n, 0.05 / 3)
    assert last.upper + last.fail_prob <= DELTA
    assert all(not a.accepted and a.upper > DELTA for a in sp.attempts[:-1])
    assert sp.plan.guarantee == "sampled" and f"k={last.k}" in sp.plan.notes[-1]
    assert sp.plan.confidence == 0.95 and "Plan (sampled, random)" in str(sp.plan)
    assert tuple(sp.plan.counts.values()) == last.counts


def test_rejected_everywhere_gives_an_empty_plan() -> None:
    # n_cert = 10 cannot reach CP <= 0.05 even with 0 failures (0.05 ** (1/10) ~ 0.74)
    sp = sampled_plan(_theorem("random"), n_search=4, n_cert=10, attempts=2)
    assert not sp.accepted and len(sp.attempts) == 2
    assert all(a.upper >= clopper_pearson_upper(0, 10, 0.05 / 2) > DELTA for a in sp.attempts)
    assert sp.plan.total_pruned == 0 and "prunes nothing" in sp.plan.notes[-1]


def test_sampled_prunes_more_than_theorem_when_theorem_is_tiny(random_sp: object) -> None:
    th = _theorem("random")
    assert th.total_pruned == 0  # Theorem R' prunes nothing here
    assert random_sp.plan.total_pruned >= 250  # measured: 320 of 336 at seed 3
    # the slope decomposition (default) is what buys it: Lemma A variants alone allow 35
    lemma_a = sampled_plan(th, n_search=8, seed=3, slopes=False).plan
    assert 0 < lemma_a.total_pruned <= 50


def test_verify_finds_no_violation_of_a_sampled_plan(random_sp: object) -> None:
    p = random_sp.plan
    rep = pb.verify(p, trials=80, seed=11, search=SEARCH)
    assert rep.violations == 0 and rep.gap_max <= p.eps
    assert rep.rate_upper <= DELTA


def test_sampled_plan_is_reproducible_and_prunes_more() -> None:
    th = _theorem("magnitude")
    a = sampled_plan(th, n_search=4, seed=1).plan
    b = pb.sampled_plan(th, n_search=4, seed=1).plan
    assert a.counts == b.counts and a.total_pruned > th.total_pruned
    default = plan(WIDTHS, th.eps, DELTA, method="magnitude")
    assert default.counts == th.counts and default.split == "optimized"
    assert default.guarantee == "prior" and a.guarantee == "sampled"
    assert pb.prune(pb.models.mlp(WIDTHS), plan=a) is not None


def test_search_and_certification_streams_are_disjoint(random_sp: object) -> None:
    sp = random_sp
    assert sp.streams[0] == SEARCH_STREAM and SEARCH_STREAM not in sp.streams[1:]
    assert len(set(sp.streams)) == len(sp.streams)
    search = [network_generator(sp.seed, SEARCH_STREAM, i).initial_seed() for i in range(8)]
    cert = [
        network_generator(sp.seed, t, i).initial_seed()
        for t in sp.streams[1:]
        for i in range(sp.attempts[0].n)
    ]
    assert not set(search) & set(cert) and len(set(cert)) == len(cert)
    w0 = torch.rand(3, generator=network_generator(0, 0, 0))
    assert not torch.equal(w0, torch.rand(3, generator=network_generator(0, 1, 0)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_search": 0}, "n_search"),
        ({"n_cert": 0}, "n_cert"),
        ({"confidence": 1.5}, "confidence"),
        ({"shrink": 1.0}, "shrink"),
        ({"attempts": 0}, "attempts"),
        ({"search_allowed": 8, "n_search": 8}, "search_allowed"),
        ({"search_z": math.nan}, "search_z"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sampled_plan(_theorem("magnitude"), **kwargs)


def test_bad_plan_arguments_raise() -> None:
    with pytest.raises(ValueError, match="needs a prior plan"):
        sampled_plan(plan(pb.models.mlp(WIDTHS), 0.5, DELTA, law="trained"))
    with pytest.raises(ValueError, match="sampling='count'"):
        sampled_plan(plan(WIDTHS, 0.5, DELTA, method="random", sampling="bernoulli"))
    with pytest.raises(TypeError, match="Plan"):
        sampled_plan("plan")  # type: ignore[arg-type]
