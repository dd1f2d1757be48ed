"""Certify a 100M-parameter MLP: time, certified norms vs exact singular values.

6 x Linear(4096, 4096) without bias (weights U[-1, 1], as benchmarks/global_prune.py), 90% global
magnitude pruning, `torch.set_num_threads(2)`. Reports the wall time of `certify`, its
candidates, and for the first `--exact-layers` layers the certified ||W||, ||W~||, ||Delta|| next to
the largest singular value from `torch.linalg.svdvals` (float32 LAPACK, relative accuracy ~1e-6:
plenty to measure a ~1% margin). Baseline in the same run: the previous method (dense float64
Lanczos, 100 steps, on each of W, W~, Delta of every layer), then `certify` again, so load
changes show. The machine may be shared: load averages are reported. Prints JSON.

    python benchmarks/certify_speed.py [--layers 6] [--width 4096] [--exact-layers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from global_prune import build  # the same model (this script's folder is on sys.path)

import prunebound as pb
from prunebound._masks import effective_weight, original_weight
from prunebound.theory.certificate import certify
from prunebound.theory.norms import norm_bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--amount", type=float, default=0.9)
    ap.add_argument("--exact-layers", type=int, default=1)
    ap.add_argument("--baseline-layers", type=int, default=6, help="0: no baseline")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    model = pb.prune(build(args.layers, args.width), "magnitude", args.amount, scope="global")
    print("built and pruned", file=sys.stderr)
    t0 = time.perf_counter()
    cert = certify(model, radius=1.0, seed=0)
    seconds = time.perf_counter() - t0
    print(f"certify: {seconds:.1f} s", file=sys.stderr)
    load_after = os.getloadavg()
    exact = []
    for lt, mod in list(zip(cert.layers, model, strict=True))[: args.exact_layers]:
        w = original_weight(mod).detach()
        wt = effective_weight(mod).detach()
        row: dict[str, object] = {"layer": lt.name}
        for key, mat, bound in (
            ("W", w, lt.norm_w),
            ("W_pruned", wt, lt.norm_kept),
            ("Delta", w - wt, lt.norm_delta),
        ):
            t1 = time.perf_counter()
            sv = float(torch.linalg.svdvals(mat.float())[0])
            row[key] = {
                "certified": bound,
                "svdvals_float32": sv,
                "overshoot": bound / sv - 1,
                "svd_seconds": time.perf_counter() - t1,
            }
            print(f"exact {lt.name} {key}: {bound:.6g} vs {sv:.6g}", file=sys.stderr)
        exact.append(row)
    baseline: dict[str, object] | None = None
    if args.baseline_layers > 0:
        gen = torch.Generator().manual_seed(1)
        k = min(args.baseline_layers, args.layers)
        t1 = time.perf_counter()
        for mod in list(model)[:k]:
            w = original_weight(mod).detach()
            wt = effective_weight(mod).detach()
            for mat in (w, wt, w - wt):
                norm_bound(mat, method="lanczos", steps=100, fail_prob=1e-9 / 18, seed=gen)
        took = time.perf_counter() - t1
        baseline = {
            "method": "dense float64 Lanczos on W, W~, Delta of every layer (previous certify)",
            "layers": k,
            "seconds": took,
            "estimated_total_seconds": took * args.layers / k,
            "load_average_after": os.getloadavg(),
        }
        print(f"baseline {k} layers: {took:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        certify(model, radius=1.0, seed=2)
        baseline["certify_again_seconds"] = time.perf_counter() - t0
        baseline["load_average_after_certify_again"] = os.getloadavg()
        print(f"certify again: {baseline['certify_again_seconds']:.1f} s", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "certify_speed",
                "layers": args.layers,
                "width": args.width,
                "parameters": sum(p.numel() for p in model.parameters()),
                "amount": args.amount,
                "threads": torch.get_num_threads(),
                "load_average_before": load_before,
                "load_average_after_certify": load_after,
                "seconds": seconds,
                "bound": cert.bound,
                "method": cert.method,
                "candidates": cert.candidates,
                "notes": list(cert.notes),
                "norm_methods": sorted({lt.norm_method for lt in cert.layers}),
                "fail_prob": cert.fail_prob,
                "layers_detail": [
                    {
                        "name": lt.name,
                        "norm_w": lt.norm_w,
                        "norm_kept": lt.norm_kept,
                        "norm_delta": lt.norm_delta,
                        "method": lt.norm_method,
                    }
                    for lt in cert.layers
                ],
                "exact_subset": exact,
                "baseline": baseline,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
