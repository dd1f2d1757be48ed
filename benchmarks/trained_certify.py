"""Trained LeNet-300-100: deterministic certificate vs measured worst gap vs accuracy change.

Trains LeNet-300-100 on digits (64 inputs; and on Fashion-MNIST where installed, `--fashion`),
magnitude-prunes it (global) at 50..95% sparsity without retraining, and for each sparsity
reports: the certificate `pb.theory.certify` (valid for these trained weights: no i.i.d.
assumption), the worst gap found by projected gradient ascent on the input ball (a lower bound on
the true sup), their ratio, and the change in test accuracy. The radius is the largest input norm
in the test set, so the ball covers the data. Prints JSON; writes a PNG with --out.

    python benchmarks/trained_certify.py [--fashion] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import prunebound as pb
from prunebound.data import load_dataset
from prunebound.theory.certificate import certify
from prunebound.training.loop import TrainConfig, evaluate, train

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def worst_gap(
    f: torch.nn.Module,
    g: torch.nn.Module,
    dim: int,
    radius: float,
    *,
    starts: int = 256,
    steps: int = 200,
    seed: int = 0,
) -> float:
    """Max over the ball of ||f(x) - g(x)|| by random starts + projected gradient ascent."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(starts, dim, generator=gen)
    x = radius * x / x.norm(dim=1, keepdim=True)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05 * radius)
    best = 0.0
    for _ in range(steps):
        gap = (f(x) - g(x)).norm(dim=1)
        best = max(best, float(gap.detach().max()))
        opt.zero_grad()
        (-gap.sum()).backward()
        opt.step()
        with torch.no_grad():
            n = x.norm(dim=1, keepdim=True).clamp_min(radius)
            x.mul_(radius / n)
    with torch.no_grad():
        return max(best, float((f(x) - g(x)).norm(dim=1).max()))


def run(dataset: str, epochs: int) -> dict[str, object]:
    data = load_dataset(dataset).flat()
    dim = data.input_shape[0]
    model = pb.models.build_model("lenet_300_100", seed=0, in_features=dim)
    train(
        model,
        data,
        TrainConfig(epochs=epochs, batch_size=128, lr=2e-3),
        seed=torch.Generator().manual_seed(0),
    )
    model.eval()
    dense_acc = evaluate(model, data).accuracy
    radius = float(data.x_test.norm(dim=1).max())
    rows = []
    for s in SPARSITIES:
        pruned = pb.prune(copy.deepcopy(model), "magnitude", s, scope="global")
        t0 = time.perf_counter()
        cert = certify(pruned, radius=radius)
        t_cert = time.perf_counter() - t0
        dense = pb.reset(copy.deepcopy(pruned))
        gap = worst_gap(pruned, dense, dim, radius)
        with torch.no_grad():
            data_gap = float((pruned(data.x_test) - dense(data.x_test)).norm(dim=1).max())
        rows.append(
            {
                "sparsity": s,
                "certificate": cert.bound,
                "worst_gap_found": gap,
                "max_gap_on_test_data": data_gap,
                "certificate_over_gap": cert.bound / gap if gap > 0 else None,
                "method": cert.method,
                "candidates": cert.candidates,
                "lemma_a_over_gap": cert.candidates["lemma_a"] / gap if gap > 0 else None,
                "relative_certificate": cert.relative,
                "accuracy": evaluate(pruned, data).accuracy,
                "accuracy_change_pt": 100 * (evaluate(pruned, data).accuracy - dense_acc),
                "certify_seconds": t_cert,
            }
        )
    return {
        "dataset": dataset,
        "radius": radius,
        "dense_accuracy": dense_acc,
        "output_scale_bound": cert.output_scale,
        "rows": rows,
    }


def default_init(seed: int, amount: float = 0.3) -> dict[str, object]:
    """784-300-100-10 at PyTorch default init, magnitude-pruned per layer, R = 1 (the issue's
    tightness example): certificate candidates vs the worst gap found."""
    torch.manual_seed(seed)  # default init uses the global RNG
    net = pb.prune(pb.models.mlp([784, 300, 100, 10]).eval(), "magnitude", amount)
    t0 = time.perf_counter()
    cert = certify(net, radius=1.0)
    t_cert = time.perf_counter() - t0
    dense = pb.reset(copy.deepcopy(net))
    gap = worst_gap(net, dense, 784, 1.0, starts=128, steps=300, seed=seed)
    return {
        "seed": seed,
        "amount": amount,
        "certificate": cert.bound,
        "method": cert.method,
        "candidates": cert.candidates,
        "worst_gap_found": gap,
        "certificate_over_gap": cert.bound / gap,
        "lemma_a_over_gap": cert.candidates["lemma_a"] / gap,
        "output_scale_bound": cert.output_scale,
        "certify_seconds": t_cert,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fashion", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    default = [default_init(seed) for seed in (0, 1)]
    print("default-init rows done", file=sys.stderr)
    results = [run("digits", 20)]
    if args.fashion:
        results.append(run("fashion-mnist", 8))
    out = {"benchmark": "trained_certify", "default_init": default, "results": results}
    print(json.dumps(out, indent=2))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.out.mkdir(parents=True, exist_ok=True)
        fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 4))
        for res in results:
            rows: list[dict[str, float]] = res["rows"]  # type: ignore[assignment]
            name = res["dataset"]
            xs = [100 * r["sparsity"] for r in rows]
            ax.semilogy(xs, [r["certificate"] for r in rows], "o-", label=f"{name}: certificate")
            ax.semilogy(
                xs, [r["worst_gap_found"] for r in rows], "s--", label=f"{name}: worst gap found"
            )
            ax.semilogy(
                xs, [r["max_gap_on_test_data"] for r in rows], "^:", label=f"{name}: test data"
            )
            acc.plot(xs, [r["accuracy_change_pt"] for r in rows], "o-", label=name)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("sup ||f(x) - F(x)|| over the ball")
        ax.legend(fontsize=7)
        acc.set_xlabel("sparsity (%)")
        acc.set_ylabel("test accuracy change (points, no retraining)")
        acc.axhline(0.0, color="grey", lw=0.5)
        acc.legend()
        fig.suptitle("trained LeNet-300-100, one-shot global magnitude pruning")
        fig.tight_layout()
        fig.savefig(args.out / "trained_certify.png", dpi=120)


if __name__ == "__main__":
    main()
