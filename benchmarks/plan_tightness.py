"""How tight are a priori plans? Planned fraction per layer vs the empirically largest one.

For widths 784-300-100-10 at PyTorch default init (weights and biases U[-1/sqrt(fan_in), ...]):
sample N networks, prune each per layer by the count form (magnitude: m smallest |w|), estimate
sup_{||x||<=1} ||f(x) - F(x)|| by projected gradient ascent with restarts (a lower estimate of
the true sup), and bisect the largest scale s such that pruning min(1, s * planned fraction)
per layer keeps the empirical (1 - delta)-quantile of the gap <= eps. eps is given relative to
the median of sup ||F(x)|| (estimated the same way). Prints JSON.

Usage: python benchmarks/plan_tightness.py [--nets 50] [--rel 0.05 0.1 0.2] [--method magnitude]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import torch

from prunebound.models import mlp
from prunebound.theory import plan

WIDTHS = (784, 300, 100, 10)


def sample_nets(
    n: int, widths: tuple[int, ...], gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batched layers [(W (n, out, in), b (n, out))] with U[-1/sqrt(in), 1/sqrt(in)] entries."""
    out = []
    for a, b in itertools.pairwise(widths):
        s = 1.0 / math.sqrt(a)
        w = (torch.rand(n, b, a, generator=gen) * 2 - 1) * s
        bias = (torch.rand(n, b, generator=gen) * 2 - 1) * s
        out.append((w, bias))
    return out


def prune_count(w: torch.Tensor, m: int, method: str, gen: torch.Generator) -> torch.Tensor:
    """Zero the m smallest |w| (magnitude) or a uniform m-subset (random) of each net's layer."""
    if m <= 0:
        return w
    flat = w.flatten(1)
    keys = flat.abs() if method == "magnitude" else torch.rand(flat.shape, generator=gen)
    idx = keys.argsort(dim=1)[:, :m]
    out = flat.clone()
    out.scatter_(1, idx, 0.0)
    return out.reshape(w.shape)


def forward(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """x: (n, k, in) -> (n, k, out); ReLU between layers."""
    h = x
    for i, (w, b) in enumerate(layers):
        h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def sup_gap(
    a: list[tuple[torch.Tensor, torch.Tensor]],
    b: list[tuple[torch.Tensor, torch.Tensor]] | None,
    radius: float,
    gen: torch.Generator,
    restarts: int = 16,
    steps: int = 40,
) -> torch.Tensor:
    """Per net: max over restarts of projected gradient ascent of ||a(x) - b(x)|| on the ball."""
    n, d = a[0][0].shape[0], a[0][0].shape[2]
    x = torch.randn(n, restarts, d, generator=gen)
    x = radius * x / x.norm(dim=-1, keepdim=True)
    best = torch.zeros(n)
    for it in range(steps):
        x.requires_grad_(True)
        ya = forward(a, x)
        gap = (ya - forward(b, x)).norm(dim=-1) if b is not None else ya.norm(dim=-1)
        best = torch.maximum(best, gap.detach().max(dim=1).values)
        (g,) = torch.autograd.grad(gap.sum(), x)
        lr = radius * 0.5 * (1 - it / steps) + 0.01 * radius
        with torch.no_grad():
            x = x + lr * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            x = x * (radius / x.norm(dim=-1, keepdim=True).clamp_min(radius))
    return best


def quantile_gap(
    nets: list[tuple[torch.Tensor, torch.Tensor]],
    fractions: list[float],
    method: str,
    q: float,
    seed: int,
) -> float:
    gen = torch.Generator().manual_seed(seed)
    pruned = [
        (prune_count(w, round(f * w[0].numel()), method, gen), b)
        for (w, b), f in zip(nets, fractions, strict=True)
    ]
    gaps = sup_gap(pruned, nets, 1.0, gen)
    return float(torch.quantile(gaps, q))


def largest_scale(
    nets: list[tuple[torch.Tensor, torch.Tensor]],
    direction: list[float],
    eps: float,
    method: str,
    q: float,
) -> float:
    """Largest s (bisection) with quantile gap of min(1, s * direction) <= eps."""
    smax = 1.0 / max(direction)

    def ok(s: float) -> bool:
        return quantile_gap(nets, [min(1.0, s * f) for f in direction], method, q, 1) <= eps

    if ok(smax):
        return smax
    lo, hi = 0.0, smax
    for _ in range(8):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def exact_norm_fractions(
    nets: list[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    delta: float,
    method: str,
    split: str,
    k: int,
    tighten: bool = False,
) -> list[float]:
    """Median over k sampled nets of the law='trained' plan (Lemma A with exact norms; with
    `tighten`, grown while min(Lemma A, slope decomposition) <= eps, docs/theory.md §7.5)."""
    fracs = []
    for i in range(k):
        model = mlp(list(WIDTHS))
        lins = [m for m in model if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for lin, (w, b) in zip(lins, nets, strict=True):
                lin.weight.copy_(w[i])
                lin.bias.copy_(b[i])
        p = plan(model, eps, delta, method=method, law="trained", split=split, tighten=tighten)
        fracs.append([lp.fraction for lp in p.layers])
    return [float(torch.tensor(col).median()) for col in zip(*fracs, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", type=int, default=50)
    ap.add_argument("--rel", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--method", default="magnitude")
    ap.add_argument("--splits", nargs="+", default=["optimized", "equal"])
    ap.add_argument("--exact-nets", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    nets = sample_nets(args.nets, WIDTHS, gen)
    out_norm = sup_gap(nets, None, 1.0, torch.Generator().manual_seed(1))
    scale = float(out_norm.median())
    rows = []
    for rel in args.rel:
        eps = rel * scale
        for split in args.splits:
            p = plan(list(WIDTHS), eps, args.delta, method=args.method, split=split)
            fr = [lp.fraction for lp in p.layers]
            row: dict[str, object] = {
                "rel_eps": rel,
                "eps": eps,
                "split": split,
                "planned": fr,
                "plan_output_scale": p.output_scale,
            }
            if args.exact_nets > 0:
                row["exact_norm_lemma_a"] = exact_norm_fractions(
                    nets, eps, args.delta, args.method, split, args.exact_nets
                )
                if split == "optimized" and args.method == "magnitude":
                    row["trained_tightened"] = exact_norm_fractions(
                        nets, eps, args.delta, args.method, split, args.exact_nets, True
                    )
                print(f"rel {rel} {split}: trained plans done", file=sys.stderr)
            if max(fr) > 0:
                s = largest_scale(nets, fr, eps, args.method, 1 - args.delta)
                emp = [min(1.0, s * f) for f in fr]
                row["empirical_along_plan"] = emp
                row["ratio_along_plan"] = s
                tot_p = sum(f * w[0].numel() for f, (w, _) in zip(fr, nets, strict=True))
                tot_e = sum(f * w[0].numel() for f, (w, _) in zip(emp, nets, strict=True))
                row["total_count_ratio"] = tot_e / tot_p
            uni = largest_scale(nets, [1.0, 1.0, 1.0], eps, args.method, 1 - args.delta)
            row["empirical_uniform_fraction"] = uni
            # pruned-count ratios: empirical uniform fraction vs each plan's total count
            sizes = [w[0].numel() for w, _ in nets]
            for key in ("planned", "exact_norm_lemma_a", "trained_tightened"):
                fr_k = row.get(key)
                if isinstance(fr_k, list) and sum(fr_k) > 0:
                    tot = sum(f * n for f, n in zip(fr_k, sizes, strict=True))
                    row[f"uniform_over_{key}"] = uni * sum(sizes) / tot
            rows.append(row)
    print(
        json.dumps(
            {
                "widths": WIDTHS,
                "nets": args.nets,
                "delta": args.delta,
                "method": args.method,
                "median_sup_output_norm": scale,
                "seconds": time.time() - t0,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
