"""Wall-clock timing of small calls, the one benchmark utility of the library.

`measure_ms` interleaves the candidates and repeats them within a time budget, so that load on
a shared machine hits every candidate alike. `measure_rounds` repeats that in several rounds
and adds rounds while they disagree on the winner; `choose` then picks a candidate over the
baseline only if it wins by a margin on the median of the rounds *and* in every round, so a
tie within the noise (or one round spoiled by load) keeps the baseline, and the choice is
stable from run to run. `export` uses them to choose kernels, the run report to measure the
exported model, and `benchmarks/` to time what they compare. The clock is an argument, so the
decision logic is tested with fake clocks, not with timings.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch


def measure_ms(
    fns: Mapping[str, Callable[[], object]],
    *,
    budget_s: float = 0.3,
    min_repeats: int = 5,
    max_repeats: int = 30,
    statistic: Literal["median", "min"] = "median",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Wall time in ms of each function (median or minimum over repeats), calls interleaved so
    that load on a shared machine hits every candidate alike; the repeat count fits `budget_s`
    within the bounds. The minimum suits choosing between kernels: interference only adds time."""
    if not fns:
        return {}
    estimate = 0.0
    for f in fns.values():
        f()  # warm-up (allocations, kernel operands, caches)
        t0 = clock()
        f()
        estimate += clock() - t0
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(estimate, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    reduce = np.median if statistic == "median" else np.min
    return {k: 1e3 * float(reduce(v)) for k, v in times.items()}


class Timings(dict[str, float]):
    """Milliseconds per candidate (the median of the rounds' medians), with every round's
    medians in `rounds`. A plain dict of milliseconds reads as one round (`rounds_of`)."""

    rounds: dict[str, list[float]]

    def __init__(self, rounds: Mapping[str, Sequence[float]]) -> None:
        super().__init__({k: float(np.median(v)) for k, v in rounds.items()})
        self.rounds = {k: [float(x) for x in v] for k, v in rounds.items()}


def rounds_of(ms: Mapping[str, float]) -> dict[str, list[float]]:
    """Per-round milliseconds of a `Timings`, or a plain dict as one round."""
    return ms.rounds if isinstance(ms, Timings) else {k: [float(v)] for k, v in ms.items()}


def choose(
    ms: Mapping[str, float], baseline: str, margin: float, *, candidates: Sequence[str] = ()
) -> str:
    """The fastest of `candidates` (default: every key but `baseline`) if it beats `baseline`
    by `margin` (time ratio) on the medians and is faster than it in every round; otherwise
    `baseline` (a tie within the noise keeps the baseline)."""
    rounds = rounds_of(ms)
    others = [k for k in (candidates or ms) if k != baseline]
    if baseline not in ms or not others:
        return min(others, key=lambda k: ms[k]) if others else baseline
    best = min(others, key=lambda k: ms[k])
    every = all(b > c for b, c in zip(rounds[baseline], rounds[best], strict=True))
    return best if ms[best] * margin < ms[baseline] and every else baseline


def _agree(rounds: Mapping[str, Sequence[float]], baseline: str | None, margin: float) -> bool:
    n = len(next(iter(rounds.values())))
    if baseline is None:
        winners = {min(rounds, key=lambda k: rounds[k][i]) for i in range(n)}
    else:
        winners = {choose({k: v[i] for k, v in rounds.items()}, baseline, margin) for i in range(n)}
    return len(winners) == 1


def measure_rounds(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 3,
    max_rounds: int = 7,
    baseline: str | None = None,
    margin: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
    **kwargs: object,
) -> Timings:
    """`rounds` rounds of `measure_ms` (keyword arguments passed on), and more rounds, up to
    `max_rounds`, while the rounds disagree on the winner (`choose` against `baseline` with
    `margin`, or the fastest if `baseline` is None). Returns the `Timings` of all rounds."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    while True:
        ms = measure_ms(fns, clock=clock, **kwargs)  # type: ignore[arg-type]
        for k, v in ms.items():
            per[k].append(v)
        n = len(per[next(iter(per))]) if per else rounds
        if n >= max_rounds or (n >= rounds and (not per or _agree(per, baseline, margin))):
            return Timings(per)


def machine_state(threads: int, load_start: Sequence[float]) -> dict[str, Any]:
    """What a timing depends on, for a benchmark's JSON: threads, cores, load average at the
    start and now (a loaded machine makes ratios noise), torch and Python versions."""
    return {
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
