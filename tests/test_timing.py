"""Timing decisions with fake clocks: rounds, re-measuring on disagreement, ties -> baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import make_mlp

import prunebound as pb
from prunebound.deploy import export as export_module
from prunebound.deploy import summary as summary_module
from prunebound.timing import Timings, choose, measure_ms, measure_rounds, rounds_of


class FakeClock:
    """A clock that advances only when a fake function runs: each call of `fn(name)` costs
    the next value of that name's cost sequence (ms)."""

    def __init__(self, costs: dict[str, Callable[[int], float]]) -> None:
        self.now = 0.0
        self.costs = costs
        self.calls = dict.fromkeys(costs, 0)

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str) -> Callable[[], None]:
        def run() -> None:
            self.now += self.costs[name](self.calls[name]) / 1e3
            self.calls[name] += 1

        return run


def _rounds(clock: FakeClock, **kw: object) -> Timings:
    fns = {k: clock.fn(k) for k in clock.costs}
    return measure_rounds(fns, clock=clock, min_repeats=5, max_repeats=5, **kw)  # type: ignore[arg-type]


def test_measure_ms_uses_the_injected_clock() -> None:
    clock = FakeClock({"a": lambda i: 2.0, "b": lambda i: 0.5})
    ms = measure_ms({k: clock.fn(k) for k in "ab"}, clock=clock, min_repeats=3, max_repeats=3)
    assert ms == {"a": pytest.approx(2.0), "b": pytest.approx(0.5)}


def test_tie_within_noise_keeps_the_baseline() -> None:
    # sparse 2% faster: below the 5% margin, dense in every run of the decision
    clock = FakeClock({"dense": lambda i: 1.0, "sparse": lambda i: 0.98})
    t = _rounds(clock, baseline="dense", margin=1.05)
    assert len(rounds_of(t)["dense"]) == 3  # the rounds agree: no extra round
    assert choose(t, "dense", 1.05) == "dense"


def test_a_load_spike_in_one_round_is_remeasured_and_does_not_decide() -> None:
    # round 1: the dense runs hit a load spike (40x slower); then the two are equal
    spike: Iterator[bool] = iter([False] * 2 + [True] * 5 + [False] * 1000)

    def dense(i: int) -> float:
        return 40.0 if next(spike) else 1.0

    clock = FakeClock({"dense": dense, "sparse": lambda i: 1.0})
    t = _rounds(clock, baseline="dense", margin=1.05)
    assert rounds_of(t)["dense"][0] == pytest.approx(40.0)  # the spoiled round
    assert len(rounds_of(t)["dense"]) > 3  # rounds disagreed: re-measured
    assert choose(t, "dense", 1.05) == "dense"  # and the artefact does not win


def test_a_real_win_is_chosen_and_the_choice_is_stable() -> None:
    picks = set()
    for jitter in (0.0, 0.1, 0.2):
        clock = FakeClock(
            {
                "dense": lambda i, j=jitter: 3.0 + j * (i % 2),
                "sparse": lambda i: 1.0 + 0.1 * (i % 3),
            }
        )
        picks.add(choose(_rounds(clock, baseline="dense", margin=1.05), "dense", 1.05))
    assert picks == {"sparse"}


def test_choose_needs_a_win_in_every_round() -> None:
    t = Timings({"dense": [3.0, 3.0, 1.0], "csr": [1.0, 1.0, 1.2]})
    assert t["dense"] == 3.0 and t["csr"] == 1.0  # medians: a 3x win ...
    assert choose(t, "dense", 1.05) == "dense"  # ... but slower in one round
    assert choose({"dense": 3.0, "csr": 1.0}, "dense", 1.05) == "csr"  # a plain dict: one round
    assert choose({"dense": 1.04, "csr": 1.0}, "dense", 1.05) == "dense"


def test_export_flags_a_speedup_above_the_flop_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 90% sparse: the FLOP limit is 10x; a measured 40x is re-measured, then flagged
    calls = []

    def fake_measure(m: object, shape: object, candidates: object, with_dense: bool) -> Timings:
        calls.append(with_dense)
        return Timings({"dense": [40.0] * 3, "scipy_csr": [1.0] * 3})

    monkeypatch.setattr(export_module, "_measure", fake_measure)
    model = make_mlp(widths=(40, 40, 3))
    pb.prune(model, "magnitude", 0.9)
    report = pb.export_report(pb.export(model, candidates=["scipy_csr"]))
    assert calls == [True] * 4  # two shapes, each measured twice (above the limit: again)
    row = report.layers[0]
    assert row.speedup == pytest.approx(40.0)
    assert "FLAGGED" in row.reason and "FLOP limit 10x" in row.reason


def test_export_summary_flags_a_speedup_above_the_flop_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_mlp(widths=(40, 40, 3))
    pb.prune(model, "magnitude", 0.9)
    calls: list[int] = []

    def fake(fns: object, rounds: int = 3, **_: object) -> Timings:
        calls.append(rounds)
        return Timings({"dense": [50.0] * rounds, "exported": [1.0] * rounds})

    monkeypatch.setattr(summary_module, "measure_rounds", fake)
    s = summary_module.export_summary(model, (40,))
    assert calls == [3, 5]  # re-measured with more rounds
    assert s["speedup"] == pytest.approx(50.0)
    assert s["flop_limit"] == pytest.approx(10.0, rel=0.05)
    assert "exceeds the FLOP limit" in s["speedup_flag"]
    assert "FLAGGED" in " ".join(pb.report.run_notes({"export": s}))
