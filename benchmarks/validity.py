"""Do a priori plans keep their promise? Validity grid, scaling, and a small CNN, by Monte Carlo.

Networks: MLPs with widths [w] * depth + [10] (depth = number of Linear layers, ReLU between),
or a conv stack (3 -> 16 -> 16 -> 16 channels, 3x3 kernels, stride 2, padding 1, on 16x16
inputs, ReLU between); weights and biases i.i.d. U[-1/sqrt(fan_in), 1/sqrt(fan_in)] (PyTorch's
default init, the plan's law). Input ball: ||x|| <= 1.

eps is relative to the plan's output scale r_L, the bound on sup_{||x||<=1} ||F(x)|| of the
theory (Lemma A's r_L with the plan's norm bounds, valid w.p. >= 1 - delta); eps = rel * r_L.

1. validity: for every cell, `prunebound.check.verify` with >= 200 networks: violations (worst-gap
   estimate > eps), Clopper-Pearson 95% upper limit (must be <= delta = 0.05), the 95% gap
   quantile and tightness = quantile / eps. Gap estimates are lower bounds on each sup.
2. scaling: planned vs empirically largest fraction (`prunebound.largest_fraction`, bisection
   along the plan's per-layer fractions) as width grows, magnitude vs random at equal eps.
3. conv: both, for the CNN with random pruning.
4. sampled random: the theorem plans for random pruning of MLPs prune (almost) nothing at these
   eps, so their validity says little; plans from sampled certificates (`sampled_plan`,
   docs/theory.md 6b) prune something, and are checked the same way.

Plans that prune nothing have gap 0 on every network; they are reported with "trivial": true
and not searched. The search effort per network (`prunebound.SearchConfig`) is smaller for
the largest networks to keep the full run near 15 minutes on 2 cores; it is in the JSON.

Usage: python benchmarks/validity.py --out runs/validity [--quick]
Prints JSON to stdout (also OUT/validity.json), progress to stderr, PNGs into OUT.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import prunebound as pb
from prunebound.check.sampled import sampled_plan
from prunebound.theory import plan
from prunebound.theory.resolve import conv_specs
from prunebound.theory.values import LayerSpec

DELTA = 0.05
SMALL = pb.SearchConfig(samples=64, restarts=4, steps=20)
LARGE = pb.SearchConfig(samples=16, restarts=1, steps=8)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def search_for(target: list[Any]) -> pb.SearchConfig:
    numel = sum(s.numel for s in target) if isinstance(target[0], LayerSpec) else 0
    if not numel:
        numel = sum(a * b for a, b in itertools.pairwise(target))
    return SMALL if numel < 500_000 else LARGE


def relative_plan(target: list[Any], rel: float, method: str, bound: str = "theorem") -> Any:
    """eps = rel * r_L; r_L bounds the target only, so it does not depend on eps."""
    r_l = plan(target, 1.0, DELTA, method=method).output_scale
    theorem = plan(target, rel * r_l, DELTA, method=method)
    return theorem if bound == "theorem" else sampled_plan(theorem, seed=0).plan


def cell(
    target: list[Any], rel: float, method: str, trials: int, label: str, bound: str = "theorem"
) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = relative_plan(target, rel, method, bound)
    row: dict[str, Any] = {
        "target": label,
        "method": method,
        "bound": bound,
        "rel_eps": rel,
        "eps": p.eps,
        "output_scale": p.output_scale,
        "planned_fractions": [lp.fraction for lp in p.layers],
        "planned_total": p.total_pruned,
        "trials": trials,
    }
    if p.total_pruned == 0:
        row.update(trivial=True, violations=0, rate_upper=0.0, passed=True, tightness=0.0)
        return row
    search = search_for(target)
    rep = pb.verify(p, trials=trials, seed=0, search=search)
    row.update(
        trivial=False,
        violations=rep.violations,
        rate_upper=rep.rate_upper,
        passed=rep.passed,
        gap_quantile=rep.gap_quantile,
        gap_max=rep.gap_max,
        tightness=rep.tightness,
        search=search.__dict__,
        seconds=time.perf_counter() - t0,
    )
    return row


def scaling_row(target: list[Any], rel: float, method: str, trials: int, label: str) -> Any:
    t0 = time.perf_counter()
    p = relative_plan(target, rel, method)
    lf = pb.largest_fraction(p, trials=trials, seed=1, search=search_for(target), iters=6)
    n = sum(s.numel for s in p.specs)
    return {
        "target": label,
        "method": method,
        "rel_eps": rel,
        "eps": p.eps,
        "planned": list(lf.planned),
        "empirical": list(lf.empirical),
        "ratio": list(lf.ratio),
        "direction": lf.direction,
        "planned_total_fraction": lf.planned_total / n,
        "empirical_total_fraction": lf.empirical_total / n,
        "total_ratio": lf.total_ratio,
        "trials": trials,
        "seconds": time.perf_counter() - t0,
    }


def plot_validity(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    live = [r for r in rows if not r["trivial"]]
    for method, marker in (("magnitude", "o"), ("random", "s")):
        rs = [r for r in live if r["method"] == method]
        xs = [f"{r['target']}\n{r['rel_eps']}" for r in rs]
        axes[0].scatter(xs, [r["tightness"] for r in rs], marker=marker, label=method)
        axes[1].scatter(xs, [r["rate_upper"] for r in rs], marker=marker, label=method)
    axes[0].axhline(1.0, color="red", label="eps")
    axes[0].set_ylabel("95% gap quantile / eps (tightness)")
    axes[1].axhline(DELTA, color="red", label="delta")
    axes[1].set_ylabel("violation rate, 95% CP upper limit")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=90, labelsize=6)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("validity of a priori plans (cells that prune something)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("magnitude", "C0"), ("random", "C1")):
        rs = [r for r in rows if r["method"] == method and r["target"].startswith("mlp")]
        ws = [int(r["target"].split("w")[1].split("-")[0]) for r in rs]
        ax.plot(ws, [r["planned_total_fraction"] for r in rs], "o--", color=color,
                label=f"{method}: planned")  # fmt: skip
        ax.plot(ws, [r["empirical_total_fraction"] for r in rs], "o-", color=color,
                label=f"{method}: empirical")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("fraction of all weights pruned")
    ax.set_title("planned vs empirically largest pruning (eps = 0.1 r_L)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/validity")
    ap.add_argument("--quick", action="store_true", help="widths 64/256, 60 networks")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    widths = (64, 256) if args.quick else (64, 256, 1024)
    trials = 60 if args.quick else 200
    rels = (0.05, 0.1, 0.2)
    grid = []
    for w in widths:
        for depth in (2, 3, 4):
            for method in ("magnitude", "random"):
                for rel in rels:
                    r = cell([w] * depth + [10], rel, method, trials, f"mlp w{w}-d{depth}")
                    grid.append(r)
                    log(f"grid {r['target']} {method} {rel}: {r['violations']}/{trials} "
                        f"(trivial={r['trivial']}) {time.perf_counter() - t0:.0f}s")  # fmt: skip
    # random pruning: the theorem plans above prune (almost) nothing, so their validity is
    # trivial; sampled-certificate plans (docs/theory.md 6b) prune something: check those
    sampled = []
    for w in (64,) if args.quick else (64, 256):  # a sampled plan for w=256 takes ~150 s
        for depth in (2, 3):
            for rel in (0.2,):
                label = f"mlp w{w}-d{depth}"
                r = cell([w] * depth + [10], rel, "random", trials, label, bound="sampled")
                sampled.append(r)
                log(f"sampled {label} random {rel}: {r['violations']}/{trials}, planned "
                    f"{r['planned_total']} {time.perf_counter() - t0:.0f}s")  # fmt: skip
    cnn = list(conv_specs([3, 16, 16, 16], 3, (16, 16), stride=2, padding=1))
    conv_rows = []
    for rel in (*rels, 0.4):
        r = cell(cnn, rel, "random", trials, "cnn 3-16-16-16 s2 p1")
        conv_rows.append(r)
        log(f"conv random {rel}: {r['violations']}/{trials} (trivial={r['trivial']})")
    scale_trials = 30 if args.quick else 50
    scaling = []
    for w in (64, 128, 256) if args.quick else (64, 128, 256, 512, 1024):
        for method in ("magnitude", "random"):
            scaling.append(scaling_row([w] * 3 + [10], 0.1, method, scale_trials, f"mlp w{w}-d3"))
            log(f"scaling w{w} {method}: {scaling[-1]['total_ratio']} "
                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
    for rel in (0.2, 0.4):
        scaling.append(scaling_row(cnn, rel, "random", scale_trials, "cnn 3-16-16-16 s2 p1"))
    live = [r for r in grid + conv_rows + sampled if not r["trivial"]]
    result = {
        "definitions": {
            "networks": "MLP widths [w]*depth + [10], ReLU between; CNN conv 3-16-16-16 k3 s2 "
            "p1 on 16x16; weights and biases U[-1/sqrt(fan_in), 1/sqrt(fan_in)]",
            "rel_eps": "eps / r_L, r_L = the plan's output_scale: the theory's bound on "
            "sup_{||x||<=1} ||F(x)|| (Lemma A with the plan's norm bounds)",
            "violation": "worst-gap estimate > eps (the estimate is a lower bound on the sup)",
            "rate_upper": "one-sided Clopper-Pearson upper limit at 95% confidence",
            "tightness": "empirical (1 - delta)-quantile of the gap / eps",
            "trivial": "the plan prunes nothing, so the gap is 0 (not searched)",
            "empirical": "largest_fraction: bisection on s, layer l prunes min(1, s * planned_l) "
            "(uniform s if the plan prunes nothing), largest s with <= floor(delta * trials) "
            "violations on the same networks",
        },
        "delta": DELTA,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "search_small": SMALL.__dict__,
        "search_large": LARGE.__dict__,
        "max_rate_upper": max((r["rate_upper"] for r in live), default=None),
        "all_passed": all(r["passed"] for r in grid + conv_rows + sampled),
        "max_tightness": max((r["tightness"] for r in live), default=None),
        "grid": grid,
        "sampled_random": sampled,
        "conv": conv_rows,
        "scaling": scaling,
        "seconds": time.perf_counter() - t0,
    }
    plot_validity(grid + conv_rows, out / "validity.png")
    plot_scaling(scaling, out / "scaling.png")
    text = json.dumps(result, indent=1)
    (out / "validity.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
