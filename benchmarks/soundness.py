"""Soundness benchmark: certify random architectures and compare with the worst gap found.

Draws `--examples` models from the test suite's strategy (`tests/soundness.py`: everything
`prunebound.theory.certificate` accepts), certifies each and runs the independent worst-gap search
(float64 sphere sampling + projected gradient ascent). Prints JSON: examples tried, refusals by
reason, min / median certificate-to-gap ratio, violations (certificate below the found gap by more
than the relative 1e-6 slack), the worst cases, and wall time.

    python benchmarks/soundness.py --examples 2000 > runs/bench/soundness.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from soundness import TOL, architectures, worst_gap

from prunebound.theory.certificate import certify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    refusals: collections.Counter[str] = collections.Counter()
    ratios: list[tuple[float, str, str]] = []
    exact = 0
    t0 = time.perf_counter()

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(architectures())
    def run(case) -> None:  # type: ignore[no-untyped-def]
        nonlocal exact
        try:
            cert = certify(case.model, radius=case.radius, input_shape=case.input_shape)
        except ValueError as err:
            refusals[str(err).split(";")[0][:100]] += 1
            return
        found = worst_gap(case.model, radius=case.radius, input_shape=case.input_shape)
        if found == 0:
            exact += cert.bound == 0
            return
        ratios.append((cert.bound / found, case.description, cert.method))

    run()
    values = sorted(r for r, _, _ in ratios)
    worst = sorted(ratios)[:5]
    out = {
        "examples": len(ratios) + sum(refusals.values()) + exact,
        "certified_with_positive_gap": len(ratios),
        "zero_gap_and_zero_certificate": exact,
        "refusals": dict(refusals),
        "min_ratio": values[0] if values else None,
        "median_ratio": statistics.median(values) if values else None,
        "violations": sum(r < 1 - TOL for r in values),
        "worst": [{"ratio": r, "case": d, "method": m} for r, d, m in worst],
        "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
