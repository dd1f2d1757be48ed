"""One-shot pruning criteria on trained Fashion-MNIST LeNet-300-100 and LeNet-5.

Each model is trained dense (5 epochs of Adam, cosine LR), then pruned once, without
retraining, by every criterion at 50/70/90/95% of its Linear/Conv weights: magnitude (global,
the baseline of issue 12, and per layer), random (per layer, the control) and the data-aware
criteria with 1024 labelled training examples as calibration data: wanda (per output row), obs
(SparseGPT-style reconstruction; per layer and global), obd, taylor and snip (global: their
scores estimate the loss change, comparable across layers). Reported per cell: test accuracy
and prediction flips against the dense model (share of the 10,000 test images whose predicted
class changed, with its Clopper-Pearson upper limit at 95%), and the seconds the prune took.

Needs Debian's dataset-fashion-mnist (or --data-dir). Prints JSON.

    python benchmarks/data_criteria.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import torch

import prunebound as pb
from prunebound.data import load_dataset
from prunebound.models import build_model
from prunebound.stats import clopper_pearson_upper
from prunebound.training.loop import TrainConfig, evaluate, train

AMOUNTS = (0.5, 0.7, 0.9, 0.95)
ARMS = (
    ("magnitude_global", "magnitude", "global"),
    ("magnitude", "magnitude", "layer"),
    ("random", "random", "layer"),
    ("wanda", "wanda", "layer"),  # compared within each output row: uniform per layer
    ("obs", "obs", "layer"),
    ("obs_global", "obs", "global"),
    ("obd_global", "obd", "global"),
    ("taylor_global", "taylor", "global"),
    ("snip_global", "snip", "global"),
)


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 2048]).argmax(1) for i in range(0, x.shape[0], 2048)])


def one_model(name: str, data: pb.data.Dataset, args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(name, seed=args.seed)
    cfg = TrainConfig(epochs=args.dense_epochs, batch_size=128, lr=2e-3, lr_schedule="cosine")
    t0 = time.perf_counter()
    train(model, data, cfg, seed=args.seed)
    dense_s = time.perf_counter() - t0
    dense_acc = evaluate(model, data).accuracy
    ref = predictions(model, data.x_test)
    n = ref.numel()
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(data.x_train.shape[0], generator=g)[: args.calibration]
    calib = (data.x_train[idx], data.y_train[idx])
    table: dict[str, dict[str, Any]] = {}
    for arm, method, scope in ARMS:
        table[arm] = {}
        for amount in AMOUNTS:
            pruned = copy.deepcopy(model)
            t0 = time.perf_counter()
            pb.prune(pruned, method, amount, scope=scope, data=calib, seed=args.seed)  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
            flips = int((predictions(pruned, data.x_test) != ref).sum())
            table[arm][f"{amount:.2f}"] = {
                "accuracy": evaluate(pruned, data).accuracy,
                "flips": flips / n,
                "flips_upper95": clopper_pearson_upper(flips, n, 0.05),
                "prune_seconds": round(seconds, 3),
            }
    base = table["magnitude_global"]
    ratios = {
        arm: {a: table[arm][a]["flips"] / max(base[a]["flips"], 1 / n) for a in base}
        for arm in table
        if arm != "magnitude_global"
    }
    return {
        "dense_accuracy": dense_acc,
        "dense_seconds": dense_s,
        "criteria": table,
        "flips_over_global_magnitude": ratios,
        "target_obs_global_flips_le_quarter_of_magnitude_at_0.70": ratios["obs_global"]["0.70"]
        <= 0.25,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and samples (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-epochs", type=int, default=5)
    ap.add_argument("--calibration", type=int, default=1024, help="calibration examples")
    ap.add_argument("--models", default="lenet_300_100,lenet5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    images = load_dataset("fashion-mnist", data_dir=args.data_dir)
    if args.quick:
        images = images.subsample(3000, 1000, seed=args.seed)
        args.dense_epochs, args.calibration = 1, 256
    out: dict[str, Any] = {}
    for name in args.models.split(","):
        data = images.flat() if name == "lenet_300_100" else images
        out[name] = one_model(name, data, args)
    total = time.perf_counter() - t_all
    print(
        json.dumps(
            {
                "benchmark": "data_criteria",
                "quick": args.quick,
                "started_utc": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - total)
                ),
                "load_average_1min_at_end": os.getloadavg()[0],
                "threads": torch.get_num_threads(),
                "calibration_examples": args.calibration,
                "models": out,
                "total_seconds": total,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
