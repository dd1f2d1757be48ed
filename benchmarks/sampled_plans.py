"""A-priori plans from sampled certificates vs the theorem plans (docs/theory.md §6b).

Widths 784-300-100-10 at PyTorch's default initialisation, delta = 0.05, confidence 0.95, eps
relative to the theorem plan's output scale r_L (as benchmarks/validity.py). For each (rel eps,
method): the theorem plan, `sampled_plan(plan(...))`, the empirically largest pruning along its
direction
(`pb.largest_fraction`, a worst-gap search: optimistic) and a `pb.verify` check. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import prunebound as pb
from prunebound.check.sampled import sampled_plan
from prunebound.theory import plan

WIDTHS = [784, 300, 100, 10]
DELTA = 0.05


def case(rel: float, method: str, search: pb.SearchConfig) -> dict[str, Any]:
    """One row: theorem vs sampled plan, their empirical ceiling and a verify run."""
    r_l = plan(WIDTHS, 1.0, DELTA, method=method).output_scale
    th = plan(WIDTHS, rel * r_l, DELTA, method=method)
    t0 = time.perf_counter()
    sp = sampled_plan(th, seed=0)
    sampled_s = time.perf_counter() - t0
    total = sum(s.numel for s in th.specs)
    row: dict[str, Any] = {
        "rel_eps": rel,
        "method": method,
        "eps": th.eps,
        "output_scale": r_l,
        "theorem_fractions": [lp.fraction for lp in th.layers],
        "theorem_total_fraction": th.total_pruned / total,
        "sampled_fractions": [lp.fraction for lp in sp.plan.layers],
        "sampled_total_fraction": sp.plan.total_pruned / total,
        "accepted": sp.accepted,
        "attempts": [{"n": a.n, "k": a.k, "upper": a.upper} for a in sp.attempts],
        "sampled_seconds": sampled_s,
    }
    if sp.plan.total_pruned > 0:
        lf = pb.largest_fraction(sp.plan, trials=50, search=search, iters=6)
        rep = pb.verify(sp.plan, trials=100, search=search)
        row |= {
            "largest_empirical": list(lf.empirical),
            "largest_over_sampled": lf.total_ratio,
            "verify_violations": rep.violations,
            "verify_rate_upper": rep.rate_upper,
            "verify_gap_max": rep.gap_max,
        }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rel", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    search = pb.SearchConfig(samples=64, restarts=4, steps=20)
    t0 = time.perf_counter()
    rows = [case(r, m, search) for r in args.rel for m in ("magnitude", "random")]
    out = {"benchmark": "sampled_plans", "widths": WIDTHS, "delta": DELTA, "confidence": 0.95}
    out |= {"rows": rows, "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
