"""`prunebound compress`: the sparsest pruning of a checkpoint certified on held-out data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prunebound.certified.search import compress
from prunebound.checkpoint import save
from prunebound.commands._args import (
    UsageError,
    add_checkpoint_args,
    add_data_args,
    dataset_for,
    load_checkpoint,
    method,
    nonneg_int,
    open_unit,
    pos_int,
)
from prunebound.training.loop import Objective, TrainConfig, evaluate


def add_compress_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="the sparsest pruning whose flip rate against the checkpoint is certified <= a "
        "budget on held-out data",
    )
    add_checkpoint_args(p)
    add_data_args(p, default="digits")
    p.add_argument(
        "--max-flip-rate", type=open_unit, default=0.01, help="budget on P(argmax changes)"
    )
    p.add_argument("--confidence", type=open_unit, default=0.95, help="(default 0.95)")
    p.add_argument("--method", type=method, default="obs", help="pruning criterion (default obs)")
    p.add_argument(
        "--certify",
        type=pos_int,
        help="test-split samples certified on (default: half the test split); the rest "
        "measure accuracy",
    )
    p.add_argument(
        "--retrain-epochs",
        type=nonneg_int,
        default=0,
        help="retraining per candidate (0: one-shot)",
    )
    p.add_argument("--distill", action="store_true", help="retrain towards the checkpoint")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="runs/compress", help="directory for results.json, model")
    p.set_defaults(handler=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    if args.distill and args.retrain_epochs == 0:
        raise UsageError("--distill needs --retrain-epochs N (N >= 1)")
    model = load_checkpoint(args).eval()
    data = dataset_for(model, args)
    n_test = data.x_test.shape[0]
    n_cert = args.certify if args.certify is not None else max(1, n_test // 2)
    if n_cert > n_test:
        raise UsageError(f"--certify {n_cert} exceeds the {n_test} test samples")
    retrain = None
    if args.retrain_epochs > 0:
        objective: Objective = "distill" if args.distill else "ce"
        # the goal is to match the original: pure distillation at a mild temperature, each
        # step's LR annealed (benchmarks/certified_compression.py's settings)
        retrain = TrainConfig(
            epochs=args.retrain_epochs, batch_size=128, lr=1e-3, lr_schedule="cosine",
            objective=objective, distill_weight=1.0, temperature=2.0,
        )  # fmt: skip
    res = compress(
        model,
        (data.x_train, data.y_train),
        (data.x_test[:n_cert], data.y_test[:n_cert]),
        max_flip_rate=args.max_flip_rate,
        confidence=args.confidence,
        method=args.method,
        retrain=retrain,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = res.to_dict()
    if n_cert < n_test:
        rest = data.__class__(
            data.name, data.x_train[:1], data.y_train[:1], data.x_test[n_cert:],
            data.y_test[n_cert:], data.num_classes, data.input_shape,
        )  # fmt: skip
        d["accuracy"] = {"original": evaluate(model, rest).accuracy}
        d["accuracy"]["compressed"] = evaluate(res.model, rest).accuracy
    (out / "results.json").write_text(json.dumps(d, indent=1))
    save(res.model, out / "model.safetensors")
    print(res)
    if "accuracy" in d:
        acc = d["accuracy"]
        print(f"accuracy on the other {n_test - n_cert} test samples: "
              f"{acc['original']:.4f} -> {acc['compressed']:.4f}")  # fmt: skip
    print(f"wrote {out / 'results.json'} and {out / 'model.safetensors'}")
    return 0
