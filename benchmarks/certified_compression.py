"""Certified compression (`pb.compress`) on Fashion-MNIST: the largest sparsity whose certified
flip rate against the dense model is <= 1%, 2% and 5% (Clopper-Pearson, 95%).

Search split: the 60,000 training images (calibration, retraining, the sparsity choice on its
held-out 20%); certify split: 5,000 test images (touched only by the final certification);
accuracy on the other 5,000. For each model x method x mode (one-shot, retrained,
retrained with distillation) and target: sparsity certified, accuracy there, wall time.
The "today" baseline of issue 13: global magnitude one-shot, 50% -> 3.8% certified flip limit.

    python benchmarks/certified_compression.py [--models lenet_300_100,lenet5]
        [--methods magnitude,obs] [--modes oneshot,distill] [--targets 0.01,0.02,0.05]

Prints JSON. Needs Debian's dataset-fashion-mnist (or --data-dir).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import torch

import prunebound as pb
from prunebound.certified.search import DEFAULT_SPARSITIES
from prunebound.data import load_dataset
from prunebound.models import build_model
from prunebound.training.loop import TrainConfig, evaluate, train

# compress's default grid from 0.3 (below it nothing flips): fine steps where flips rise
GRID = tuple(s for s in DEFAULT_SPARSITIES if s >= 0.3)


def dense_model(name: str, data: pb.data.Dataset, epochs: int, seed: int) -> torch.nn.Module:
    kw = {"in_features": 784} if name == "lenet_300_100" else {}
    model = build_model(name, seed=seed, **kw)
    train(model, data, TrainConfig(epochs=epochs, batch_size=128, lr=1e-3), seed=seed)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lenet_300_100")
    ap.add_argument("--methods", default="magnitude,obs")
    ap.add_argument("--modes", default="oneshot,distill")
    ap.add_argument("--targets", default="0.01,0.02,0.05")
    ap.add_argument("--epochs", type=int, default=5, help="dense training epochs")
    ap.add_argument("--retrain-epochs", type=int, default=6, help="per candidate sparsity")
    ap.add_argument("--lr", type=float, default=1e-3, help="retraining LR (cosine to 0 per step)")
    ap.add_argument("--distill-weight", type=float, default=1.0, help="KL share (1: no labels)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--data-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw = load_dataset("fashion-mnist", data_dir=args.data_dir)
    out: dict[str, Any] = {"benchmark": "certified_compression", "confidence": 0.95, "runs": []}
    out["args"] = vars(args)
    for name in args.models.split(","):
        data = raw.image() if name == "lenet5" else raw.flat()
        t0 = time.perf_counter()
        dense = dense_model(name, data, args.epochs, args.seed)
        xt, yt = data.x_test, data.y_test
        certify, held = (xt[:5000], yt[:5000]), (xt[5000:], yt[5000:])
        acc_data = pb.data.Dataset("held", xt[:1], yt[:1], *held, 10, data.input_shape)
        out[f"{name}_dense"] = {
            "accuracy": evaluate(dense, acc_data).accuracy,
            "seconds": time.perf_counter() - t0,
        }
        search = (data.x_train, data.y_train)
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                retrain = None
                if mode != "oneshot":
                    retrain = TrainConfig(
                        epochs=args.retrain_epochs, batch_size=128, lr=args.lr,
                        lr_schedule="cosine",
                        objective="distill" if mode == "distill" else "ce",
                        distill_weight=args.distill_weight, temperature=args.temperature,
                    )  # fmt: skip
                for target in (float(t) for t in args.targets.split(",")):
                    t1 = time.perf_counter()
                    res = pb.compress(
                        copy.deepcopy(dense), search, certify, max_flip_rate=target,
                        method=method, retrain=retrain, sparsities=GRID, seed=args.seed,
                    )  # fmt: skip
                    cert = res.certificate
                    row = {
                        "model": name, "method": method, "mode": mode, "target": target,
                        "accepted": res.accepted, "sparsity": res.sparsity,
                        "flip_upper": None if cert is None else cert.flip_upper,
                        "flips": None if cert is None else cert.flips,
                        "accuracy": evaluate(res.model, acc_data).accuracy,
                        "seconds": time.perf_counter() - t1,
                        "tried": [t.sparsity for t in res.history],
                    }  # fmt: skip
                    out["runs"].append(row)
                    print(json.dumps(row), flush=True, file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
