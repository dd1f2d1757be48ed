"""LeNet-300-100 on Fashion-MNIST: dense vs iterative pruning at 80/90/95/98% sparsity.

All arms start from the same trained dense model (same seed) and prune along one trajectory of
increasing sparsity, recording test accuracy and wall time at each target:

- `prunebound_global`: what a prunebound user would choose: global magnitude ranking, the
  output layer pruned at a fraction of the rate (`last_layer_scale`), the dense cosine LR
  schedule restarted (from a higher peak LR, `retrain_lr_scale`) in each retraining
  (`retrain_lr="restart"`), Adam, steps 80/90/95/97/98%;
- `prunebound_random`: the same schedule with layer-wise random pruning (the control);
- `torch_l1_baseline`: plain `torch.nn.utils.prune.l1_unstructured`, layer-wise, iterative with
  steps of at most half the survivors, 2 epochs of Adam (constant LR) after each step.

Needs Debian's dataset-fashion-mnist (or --data-dir). Prints JSON.

    python benchmarks/lenet_fashion.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import torch
from torch.nn.utils import prune as tp

import prunebound as pb
from prunebound.data import load_dataset
from prunebound.models import build_model
from prunebound.training.loop import TrainConfig, evaluate, train
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule

TARGETS = (0.8, 0.9, 0.95, 0.98)


def torch_baseline(
    dense: torch.nn.Module, data: pb.data.Dataset, g: torch.Generator, batch_size: int
) -> dict[str, float]:
    """Layer-wise L1, iterative, each step at most half of the survivors, 2 epochs Adam."""
    model = copy.deepcopy(dense)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=1e-3)
    out, sparsity = {}, 0.0
    for target in TARGETS:
        while sparsity < target - 1e-9:
            nxt = min(target, 1 - (1 - sparsity) / 2)
            amount = 1 - (1 - nxt) / (1 - sparsity)  # fraction of survivors (PruningContainer)
            for m in layers:
                tp.l1_unstructured(m, "weight", amount=amount)  # type: ignore[no-untyped-call]
            train(model, data, cfg, seed=g)
            sparsity = nxt
        out[f"{target:.2f}"] = evaluate(model, data).accuracy
    return out


def prunebound_arm(
    dense: torch.nn.Module,
    data: pb.data.Dataset,
    dense_cfg: TrainConfig,
    schedule: Schedule,
    g: torch.Generator,
) -> dict[str, Any]:
    """Run `schedule` from a copy of the trained dense model; accuracy at each target."""
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    rounds = run_schedule(model, data, dense_cfg, schedule, seed=g, train_dense=False)
    seconds = time.perf_counter() - t0
    acc = {f"{r.sparsity:.2f}": r.accuracy for r in rounds[1:]}
    return {"accuracy": acc, "seconds": seconds, "schedule": schedule.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and samples (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--retrain-epochs", type=int, default=5, help="per pruning step")
    ap.add_argument("--last-layer-scale", type=float, default=0.2)
    ap.add_argument(
        "--retrain-lr-scale", type=float, default=2.0, help="retraining peak LR / dense LR"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = load_dataset("fashion-mnist", data_dir=args.data_dir).flat()
    if args.quick:
        data = data.subsample(6000, 2000, seed=args.seed)
    batch = 128
    dense_cfg = TrainConfig(
        epochs=2 if args.quick else args.dense_epochs,
        batch_size=batch,
        lr=2e-3,
        lr_schedule="cosine",
    )
    retrain = 1 if args.quick else args.retrain_epochs

    model = build_model("lenet_300_100", seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    train(model, data, dense_cfg, seed=g)
    dense_acc = evaluate(model, data).accuracy
    dense_s = time.perf_counter() - t0

    steps = (0.8, 0.9, 0.95, 0.97, 0.98)
    arms: dict[str, dict[str, Any]] = {}
    for name, method, scope, last in (
        ("prunebound_global", "magnitude", "global", args.last_layer_scale),
        ("prunebound_random", "random", "layer", args.last_layer_scale),
    ):
        sched = Schedule(
            method=method,
            scope=scope,  # type: ignore[arg-type]
            steps=steps,
            retrain_epochs=retrain,
            last_layer_scale=last,
            retrain_lr="restart",
            retrain_lr_scale=args.retrain_lr_scale,
        )
        arms[name] = prunebound_arm(
            model, data, dense_cfg, sched, torch.Generator().manual_seed(args.seed)
        )
    t0 = time.perf_counter()
    base = torch_baseline(model, data, torch.Generator().manual_seed(args.seed), batch)
    arms["torch_l1_baseline"] = {"accuracy": base, "seconds": time.perf_counter() - t0}

    gaps = {
        n: {k: round(100 * (dense_acc - v), 2) for k, v in a["accuracy"].items()}
        for n, a in arms.items()
    }
    ours, ref = arms["prunebound_global"]["accuracy"], arms["torch_l1_baseline"]["accuracy"]
    total = time.perf_counter() - t_all
    print(
        json.dumps(
            {
                "benchmark": "lenet_fashion",
                "quick": args.quick,
                "started_utc": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - total)
                ),
                "load_average_1min_at_end": os.getloadavg()[0],
                "threads": torch.get_num_threads(),
                "dense_accuracy": dense_acc,
                "dense_seconds": dense_s,
                "arms": arms,
                "gap_to_dense_pt": gaps,
                "prunebound_minus_torch_pt": {
                    k: round(100 * (ours[k] - ref[k]), 2) for k in ref if k in ours
                },
                "targets_met": {
                    "gap_at_0.95_le_0.5pt": gaps["prunebound_global"].get("0.95", 99) <= 0.5,
                    "gap_at_0.98_le_2pt": gaps["prunebound_global"].get("0.98", 99) <= 2.0,
                    "total_under_180s": total < 180,
                },
                "total_seconds": total,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
