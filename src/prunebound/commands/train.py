"""`prunebound demo` and `prunebound run`: whole train → prune → retrain runs."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prunebound import report
from prunebound.commands._args import (
    UsageError,
    add_data_args,
    nonneg_int,
    pos_int,
    positive_float,
    sparsity,
)
from prunebound.training.config import DataSpec, Experiment, InputShapeError, ModelSpec
from prunebound.training.distributed import BACKENDS, env_ranks
from prunebound.training.experiment import run
from prunebound.training.launch import exit_process, run_distributed
from prunebound.training.loop import TrainConfig
from prunebound.training.runner import Round
from prunebound.training.schedule import Schedule


def print_round(r: Round) -> None:
    """One line per round (module level: spawned ranks of `run --nproc` pickle it); through
    `tqdm.write`, so that a progress bar on the terminal stays intact."""
    tqdm.write(report.round_line(r.to_dict()), file=sys.stdout)


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="LeNet-300-100 on digits: iterative magnitude vs random pruning to 90%%",
        description="Train LeNet-300-100 (64 inputs) on scikit-learn's digits, prune it "
        "iteratively to 90% sparsity with retraining, by magnitude and at random (the control), "
        "and compare.",
    )
    p.add_argument("--out", default="runs/demo", help="results directory (default runs/demo)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds init, shuffling, random masks")
    p.add_argument("--sparsity", type=sparsity, default=0.9, help="target in [0, 1) (def. 0.9)")
    p.add_argument("--rounds", type=pos_int, default=5, help="pruning rounds (default 5)")
    p.add_argument("--epochs", type=nonneg_int, default=20, help="dense epochs (default 20)")
    p.add_argument("--retrain-epochs", type=nonneg_int, default=4, help="per round (def. 4)")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 3 dense epochs, 2 rounds of 1 epoch"
    )
    add_data_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    epochs, rounds, retrain = args.epochs, args.rounds, args.retrain_epochs
    if args.quick:
        epochs, rounds, retrain = 3, 2, 1
    in_features = 64 if args.dataset == "digits" else 784
    runs: dict[str, dict[str, Any]] = {}
    for method in ("magnitude", "random"):
        exp = Experiment(
            model=ModelSpec("lenet_300_100", {"in_features": in_features}),
            data=DataSpec(args.dataset, data_dir=args.data_dir),
            train=TrainConfig(epochs=epochs, batch_size=32, lr=2e-3),
            schedule=Schedule(
                kind="iterative",
                method=method,
                target_sparsity=args.sparsity,
                rounds=rounds,
                retrain_epochs=retrain,
            ),
            seed=args.seed,
            out_dir=str(out / method),
            quiet=args.quiet,
        )
        if not args.quiet:
            print(f"== {method} pruning, {rounds} rounds to {args.sparsity:.0%} ==")
        runs[method] = run(exp, on_round=None if args.quiet else print_round).to_dict()
    report.plot_accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png")
    print(report.comparison_table(runs))
    print(report.demo_summary(runs))
    print(
        f"results: {out}/<method>/results.json, rounds.csv, *.png; {out}/accuracy_vs_sparsity.png"
    )
    return 0


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run an experiment from a TOML config")
    p.add_argument("config", help="TOML file (see configs/)")
    p.add_argument("--out", help="results directory (overrides out_dir)")
    add_data_args(p, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.safetensors (an interrupted epoch restarts)",
    )
    d = p.add_argument_group("distributed (DDP; see docs/distributed.md)")
    d.add_argument(
        "--nproc",
        type=pos_int,
        default=1,
        help="processes to launch on this machine (default 1); train.batch_size is the global "
        "batch and must be a multiple; leave at 1 under torchrun",
    )
    d.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="gloo (CPU), nccl (one GPU per process) or auto (nccl if CUDA; default)",
    )
    d.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=300.0,
        metavar="SECONDS",
        help="how long a rank waits for the others before the run fails (default 300)",
    )
    p.set_defaults(handler=run_run)


def run_run(args: argparse.Namespace) -> int:
    exp = Experiment.from_toml(args.config)
    if args.out:
        exp = replace(exp, out_dir=args.out)
    if args.dataset:
        exp = replace(exp, data=replace(exp.data, name=args.dataset))
    if args.data_dir:
        exp = replace(exp, data=replace(exp.data, data_dir=args.data_dir))
    if args.quiet:
        exp = replace(exp, quiet=True)
    ranks = env_ranks(os.environ)  # set by torchrun
    try:
        d = run_distributed(
            exp,
            args.nproc,
            backend=args.backend,
            timeout=args.dist_timeout,
            threads=args.threads,
            resume=args.resume,
            ranks=ranks,
            on_round=None if exp.quiet else print_round,
        )
    except InputShapeError as e:
        if args.dataset:  # the flag chose data the config's model does not take: usage
            raise UsageError(f"--dataset {args.dataset}: {e}") from None
        raise
    if d is None:
        exit_process(0)  # a torchrun rank other than 0: done, skip finalization
    print(report.rounds_table(d))
    print(report.layers_table(d))
    for line in report.run_notes(d):
        print(line)
    print(f"results: {exp.out_dir} (config hash {exp.hash()})")
    if ranks is not None and ranks.world_size > 1:
        exit_process(0)  # rank 0 under torchrun: as above
    return 0
