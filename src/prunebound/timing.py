"""Wall-clock timing of small calls, the one benchmark utility of the library.

`measure_ms` interleaves the candidates and repeats them within a time budget, so that load on
a shared machine hits every candidate alike. `export` uses it to choose kernels, the run report
to measure the exported model, and `benchmarks/` to time what they compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np


def measure_ms(
    fns: Mapping[str, Callable[[], object]],
    *,
    budget_s: float = 0.3,
    min_repeats: int = 5,
    max_repeats: int = 30,
    statistic: Literal["median", "min"] = "median",
) -> dict[str, float]:
    """Wall time in ms of each function (median or minimum over repeats), calls interleaved so
    that load on a shared machine hits every candidate alike; the repeat count fits `budget_s`
    within the bounds. The minimum suits choosing between kernels: interference only adds time."""
    if not fns:
        return {}
    estimate = 0.0
    for f in fns.values():
        f()  # warm-up (allocations, kernel operands, caches)
        t0 = time.perf_counter()
        f()
        estimate += time.perf_counter() - t0
    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(estimate, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    reduce = np.median if statistic == "median" else np.min
    return {k: 1e3 * float(reduce(v)) for k, v in times.items()}
