"""Monte Carlo throughput: batched `prunebound.check.verify` vs a naive per-network loop.

1000 networks of widths 784-300-100-10 (PyTorch default init, i.e. the plan's uniform law for
weights and biases), pruned by a magnitude plan, each searched for its worst gap with the same
search (random points on the sphere, then projected gradient ascent from the best of them).
Batched: `prunebound.check.verify` (networks as (N, out, in) tensors, torch.baddbmm). Naive: one
network at a time as nn.Modules pruned with `prunebound.prune(model, plan=plan)`; it runs on
`--naive` networks and its throughput is extrapolated to `--nets` (said in the JSON).

Usage: python benchmarks/verify_speed.py [--nets 1000] [--naive 50] [--threads 2]
Prints JSON to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

import prunebound as pb
from prunebound.check.batch import sphere
from prunebound.theory import plan

WIDTHS = [784, 300, 100, 10]


def naive_worst_gap(
    big: nn.Module, small: nn.Module, x0: torch.Tensor, search: pb.SearchConfig
) -> float:
    """The search of `prunebound.check.batch.worst_gap` on one network, with plain modules."""

    def gap(x: torch.Tensor) -> torch.Tensor:
        return (big(x) - small(x)).norm(dim=-1)

    with torch.no_grad():
        vals = torch.cat([gap(x0[i : i + 64]) for i in range(0, len(x0), 64)])
    best = float(vals.max())
    x = x0[vals.topk(search.restarts).indices].clone()
    for it in range(search.steps):
        x.requires_grad_(True)
        g = gap(x)
        (grad,) = torch.autograd.grad(g.sum(), x)
        best = max(best, float(g.detach().max()))
        lr = search.step_size * (1.0 - it / search.steps + 0.02)
        with torch.no_grad():
            x = x + lr * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)
    with torch.no_grad():
        return max(best, float(gap(x).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", type=int, default=1000)
    ap.add_argument("--naive", type=int, default=50, help="networks timed in the naive loop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rel-eps", type=float, default=0.1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    search = pb.SearchConfig()
    probe = plan(WIDTHS, 1.0, 0.05)
    p = plan(WIDTHS, args.rel_eps * probe.output_scale, 0.05, method="magnitude")
    print(f"plan counts {p.counts}; batched run on {args.nets} networks...", file=sys.stderr)
    t0 = time.perf_counter()
    rep = pb.verify(p, trials=args.nets, seed=0, search=search)
    t_batched = time.perf_counter() - t0
    print(f"batched: {t_batched:.1f} s; naive loop on {args.naive}...", file=sys.stderr)
    gen = torch.Generator().manual_seed(1)
    naive_gaps = []
    t0 = time.perf_counter()
    for i in range(args.naive):
        big = pb.models.build_model("mlp", widths=WIDTHS, seed=10_000 + i)
        small = pb.prune(copy.deepcopy(big), plan=p)
        x0 = sphere(1, search.samples, (784,), 1.0, gen)[0]
        naive_gaps.append(naive_worst_gap(big, small, x0, search))
    t_naive = time.perf_counter() - t0
    nps_b, nps_n = args.nets / t_batched, args.naive / t_naive
    out = {
        "widths": WIDTHS,
        "plan_counts": p.counts,
        "eps": p.eps,
        "relative_eps": args.rel_eps,
        "search": rep.search.__dict__,
        "threads": torch.get_num_threads(),
        "batched": {"nets": args.nets, "seconds": t_batched, "nets_per_s": nps_b},
        "naive": {
            "nets_timed": args.naive,
            "seconds": t_naive,
            "nets_per_s": nps_n,
            "extrapolated_seconds_for_all": args.nets / nps_n,
            "note": f"naive loop timed on {args.naive} networks, extrapolated to {args.nets}",
        },
        "speedup": nps_b / nps_n,
        "batched_gap_median": sorted(rep.gaps)[len(rep.gaps) // 2],
        "naive_gap_median": sorted(naive_gaps)[len(naive_gaps) // 2],
        "violations": rep.violations,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
