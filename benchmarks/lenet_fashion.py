"""LeNet-300-100 on Fashion-MNIST: dense vs iterative pruning at 80/90/95/98% sparsity.

All arms start from the same trained dense model (same seed) and prune along one trajectory,
recording test accuracy at each sparsity:

- `prunebound_magnitude`: global magnitude, output layer pruned at half the rate, learning-rate
  rewinding (cosine schedule restarted each round) — what a user of prunebound would choose;
- `prunebound_random`: the same schedule with layer-wise random pruning (the control);
- `torch_l1_baseline`: plain `torch.nn.utils.prune.l1_unstructured` layer-wise, iterative with
  steps of at most half the survivors, 2 epochs of Adam (constant LR) after each step.

Needs Debian's dataset-fashion-mnist (or --data-dir). Prints JSON.

    python benchmarks/lenet_fashion.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch.nn.utils import prune as tp

import prunebound as pb
from prunebound.data import load_dataset
from prunebound.models import build_model
from prunebound.pipeline import TrainConfig, evaluate, train
from prunebound.schedule import Schedule, run_schedule

TARGETS = (0.8, 0.9, 0.95, 0.98)


def torch_baseline(
    dense: torch.nn.Module, data: pb.data.Dataset, g: torch.Generator
) -> dict[str, float]:
    """Layer-wise L1, iterative, each step at most half of the survivors, 2 epochs Adam."""
    model = copy.deepcopy(dense)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cfg = TrainConfig(epochs=2, batch_size=256, lr=1e-3)
    out, sparsity = {}, 0.0
    for target in TARGETS:
        while sparsity < target - 1e-9:
            nxt = min(target, 1 - (1 - sparsity) / 2)
            amount = 1 - (1 - nxt) / (1 - sparsity)  # fraction of survivors (PruningContainer)
            for m in layers:
                tp.l1_unstructured(m, "weight", amount=amount)
            train(model, data, cfg, generator=g)
            sparsity = nxt
        out[f"{target:.2f}"] = evaluate(model, data).accuracy
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and samples (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_all = time.perf_counter()
    data = load_dataset("fashion-mnist", data_dir=args.data_dir).flat()
    if args.quick:
        data = data.subsample(6000, 2000, seed=args.seed)
    dense_cfg = TrainConfig(
        epochs=2 if args.quick else 12, batch_size=256, lr=2e-3, lr_schedule="cosine"
    )
    retrain = 1 if args.quick else 5

    model = build_model("lenet_300_100", seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    train(model, data, dense_cfg, generator=g)
    dense_acc = evaluate(model, data).accuracy
    dense_s = time.perf_counter() - t0

    steps = (0.5, 0.7, 0.8, 0.87, 0.9, 0.93, 0.95, 0.965, 0.975, 0.98)
    arms: dict[str, dict[str, object]] = {}
    for name, method, scope, last in (
        ("prunebound_magnitude", "magnitude", "global", 0.5),
        ("prunebound_random", "random", "layer", 1.0),
    ):
        m = copy.deepcopy(model)
        sched = Schedule(
            method=method,
            scope=scope,
            steps=steps,
            retrain_epochs=retrain,
            last_layer_scale=last,
            lr_rewind=True,
        )
        t0 = time.perf_counter()
        # dense training is done: epochs=0 skips it; retraining uses this LR and cosine schedule
        no_dense = TrainConfig(epochs=0, batch_size=256, lr=2e-3, lr_schedule="cosine")
        rounds = run_schedule(m, data, no_dense, sched, generator=g)
        arms[name] = {"seconds": time.perf_counter() - t0}
        arms[name]["accuracy"] = {f"{r.sparsity:.2f}": r.accuracy for r in rounds[1:]}
    t0 = time.perf_counter()
    base = torch_baseline(model, data, g)
    arms["torch_l1_baseline"] = {"accuracy": base, "seconds": time.perf_counter() - t0}

    print(
        json.dumps(
            {
                "benchmark": "lenet_fashion",
                "quick": args.quick,
                "dense_accuracy": dense_acc,
                "dense_seconds": dense_s,
                "arms": arms,
                "gap_to_dense_pt": {
                    n: {k: round(100 * (dense_acc - v), 2) for k, v in a["accuracy"].items()}  # type: ignore[union-attr]
                    for n, a in arms.items()
                },
                "total_seconds": time.perf_counter() - t_all,
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
