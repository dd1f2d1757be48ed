"""LeNet-300-100 on Fashion-MNIST: dense vs iterative pruning at 80/90/95/98% sparsity.

All arms of a seed start from the same trained dense model and prune along one trajectory of
increasing sparsity, recording test accuracy and wall time at each target; with --seeds N
every arm runs for seeds 0..N-1 and the summary gives mean and standard deviation per target:

- `prunebound_global`: what a prunebound user would choose: global magnitude ranking, the
  output layer pruned at a fraction of the rate (`last_layer_scale`), the dense cosine LR
  schedule restarted (from a higher peak LR, `retrain_lr_scale`) in each retraining
  (`retrain_lr="restart"`), Adam, steps 80/90/95/97/98%;
- `prunebound_random`: the same schedule with layer-wise random pruning (the control);
- `torch_l1_baseline`: plain `torch.nn.utils.prune.l1_unstructured`, layer-wise, iterative with
  steps of at most half the survivors, 2 epochs of Adam (constant LR) after each step;
- `prunebound_distill`: `prunebound_global` retrained by distillation towards the dense model
  (`objective="distill"`, T = 4, 0.9 KL + 0.1 cross-entropy);
- `prunebound_obs`: the same iterative schedule with the "obs" criterion (SparseGPT-style
  reconstruction from 1024 training examples before each retraining);
- `gradual`, `gradual_distill`: Zhu & Gupta's cubic schedule to 98% in 20 pruning steps, one
  every epoch's worth of steps, inside one retraining as long as the iterative arms' (5 epochs
  per step), with and without distillation (accuracy at 98% only);
- `oneshot`, `oneshot_distill`: one prune to 98%, then 5 epochs of retraining.

`--arms` picks a subset (comma-separated names).

Needs Debian's dataset-fashion-mnist (or --data-dir). Prints JSON.

    python benchmarks/lenet_fashion.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

import torch
from torch.nn.utils import prune as tp

import prunebound as pb
from prunebound.data import load_dataset
from prunebound.models import build_model
from prunebound.training.loop import TrainConfig, evaluate, steps_per_epoch, train
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule

TARGETS = (0.8, 0.9, 0.95, 0.98)
ARMS = (
    "prunebound_global",
    "prunebound_random",
    "torch_l1_baseline",
    "prunebound_distill",
    "prunebound_obs",
    "gradual",
    "gradual_distill",
    "oneshot",
    "oneshot_distill",
)


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
    ap.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 (else --seed)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of arms")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    seeds = list(range(args.seeds)) if args.seeds > 1 else [args.seed]
    runs = [one_seed(args, seed) for seed in seeds]
    total = time.perf_counter() - t_all
    out = runs[0] if len(runs) == 1 else {"runs": runs, "summary": summary(runs)}
    out = {
        "benchmark": "lenet_fashion",
        "quick": args.quick,
        "seeds": seeds,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - total)),
        "load_average_1min_at_end": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        **out,
        "total_seconds": total,
    }
    print(json.dumps(out, indent=2))


def _progress(seed: int, arm: str, dense_acc: float, result: dict[str, Any]) -> None:
    """One JSON line per finished arm on stderr, so a long run's figures survive an abort."""
    line = {"seed": seed, "arm": arm, "dense_accuracy": dense_acc, **result}
    print(json.dumps({k: v for k, v in line.items() if k != "schedule"}), file=sys.stderr)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every arm's accuracy and gap per target."""
    out: dict[str, Any] = {"dense_accuracy": _mean_std([r["dense_accuracy"] for r in runs])}
    for arm in runs[0]["arms"]:
        accs = [r["arms"][arm]["accuracy"] for r in runs]
        gaps = [r["gap_to_dense_pt"][arm] for r in runs]
        out[arm] = {
            t: {
                "accuracy": _mean_std([a[t] for a in accs]),
                "gap_pt": _mean_std([g[t] for g in gaps]),
            }
            for t in accs[0]
        }
    return out


def _mean_std(xs: list[float]) -> dict[str, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    std = float(t.std()) if t.numel() > 1 else 0.0
    return {"mean": round(float(t.mean()), 5), "std": round(std, 5)}


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every selected arm from one dense model trained with `seed`."""
    args.seed = seed
    wanted = set(args.arms.split(","))
    unknown = wanted - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
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
    per_epoch = steps_per_epoch(data.x_train.shape[0], batch)
    common = {
        "scope": "global",
        "retrain_lr": "restart",
        "retrain_lr_scale": args.retrain_lr_scale,
        "last_layer_scale": args.last_layer_scale,
    }
    iterative = {**common, "steps": steps, "retrain_epochs": retrain}
    gradual = {
        **common,
        "kind": "gradual",
        "target_sparsity": 0.98,
        "rounds": 20 if not args.quick else 3,
        "every": per_epoch,
        "retrain_epochs": retrain * len(steps),
    }
    oneshot = {**common, "kind": "oneshot", "target_sparsity": 0.98, "retrain_epochs": retrain}
    distill = replace(dense_cfg, objective="distill", temperature=4.0, distill_weight=0.9)
    plans: dict[str, tuple[dict[str, Any], TrainConfig]] = {
        "prunebound_global": (iterative, dense_cfg),
        "prunebound_random": ({**iterative, "method": "random", "scope": "layer"}, dense_cfg),
        "prunebound_distill": (iterative, distill),
        "prunebound_obs": ({**iterative, "method": "obs"}, dense_cfg),
        "gradual": (gradual, dense_cfg),
        "gradual_distill": (gradual, distill),
        "oneshot": (oneshot, dense_cfg),
        "oneshot_distill": (oneshot, distill),
    }
    arms: dict[str, dict[str, Any]] = {}
    for name, (kw, cfg) in plans.items():
        if name in wanted:
            sched = Schedule(**{"method": "magnitude", **kw})
            g = torch.Generator().manual_seed(args.seed)
            arms[name] = prunebound_arm(model, data, cfg, sched, g)
            _progress(args.seed, name, dense_acc, arms[name])
    if "torch_l1_baseline" in wanted:
        t0 = time.perf_counter()
        base = torch_baseline(model, data, torch.Generator().manual_seed(args.seed), batch)
        arms["torch_l1_baseline"] = {"accuracy": base, "seconds": time.perf_counter() - t0}
        _progress(args.seed, "torch_l1_baseline", dense_acc, arms["torch_l1_baseline"])

    gaps = {
        n: {k: round(100 * (dense_acc - v), 2) for k, v in a["accuracy"].items()}
        for n, a in arms.items()
    }
    best98 = min((g["0.98"] for g in gaps.values() if "0.98" in g), default=99)
    out: dict[str, Any] = {
        "seed": args.seed,
        "dense_accuracy": dense_acc,
        "dense_seconds": dense_s,
        "arms": arms,
        "gap_to_dense_pt": gaps,
        "targets_met": {
            "gap_at_0.95_le_0.5pt": gaps.get("prunebound_global", {}).get("0.95", 99) <= 0.5,
            "best_gap_at_0.98_le_1.5pt": best98 <= 1.5,
        },
    }
    if "prunebound_global" in arms and "torch_l1_baseline" in arms:
        ours, ref = arms["prunebound_global"]["accuracy"], arms["torch_l1_baseline"]["accuracy"]
        out["prunebound_minus_torch_pt"] = {
            k: round(100 * (ours[k] - ref[k]), 2) for k in ref if k in ours
        }
    return out


if __name__ == "__main__":
    main()
