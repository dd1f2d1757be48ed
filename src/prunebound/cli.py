"""Command line: `prunebound demo | run | prune | report | plan | certify | verify`.

Each command is an `add_<cmd>_parser` / `run_<cmd>` pair. Exit codes: 0 success, 2 usage error
(argparse), 1 runtime failure with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from prunebound import report
from prunebound.experiment import DataSpec, Experiment, ModelSpec, run
from prunebound.pipeline import TrainConfig
from prunebound.schedule import Round, Schedule

Handler = Callable[[argparse.Namespace], int]


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return v


def _add_data_args(p: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    p.add_argument(
        "--dataset",
        default=default,
        choices=["digits", "fashion-mnist", "mnist", "idx"],
        help="data set" + (f" (default {default})" if default else " (overrides data.name)"),
    )
    p.add_argument(
        "--data-dir",
        help="MNIST-format IDX directory (needed for mnist/idx; fashion-mnist defaults to "
        "/usr/share/datasets/fashion-mnist)",
    )


# --- demo -----------------------------------------------------------------------------------


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="LeNet-300-100 on digits: iterative magnitude vs random pruning to 90%%",
        description="Train LeNet-300-100 (64 inputs) on scikit-learn's digits, prune it "
        "iteratively to 90%% sparsity with retraining, by magnitude and at random (the control), "
        "and compare.",
    )
    p.add_argument("--out", default="runs/demo", help="results directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, shuffling, random masks")
    p.add_argument("--sparsity", type=_fraction, default=0.9, help="target (default 0.9)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="pruning rounds (default 5)")
    p.add_argument("--epochs", type=_positive_int, default=20, help="dense epochs (default 20)")
    p.add_argument("--retrain-epochs", type=_positive_int, default=4, help="per round (def. 4)")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 3 dense epochs, 2 rounds of 1 epoch"
    )
    _add_data_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if args.sparsity >= 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    out = Path(args.out)
    epochs, rounds, retrain = args.epochs, args.rounds, args.retrain_epochs
    if args.quick:
        epochs, rounds, retrain = 3, 2, 1
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    in_features = 64 if args.dataset == "digits" else 784
    summary = []
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
        res = run(exp, on_round=None if args.quiet else _print_round)
        summary.append(res)
    runs = {r.experiment.schedule.method: r.to_dict() for r in summary}
    report.plot_accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png")
    rows = [
        {
            "method": name,
            "dense acc": d["rounds"][0]["accuracy"],
            "final sparsity": d["rounds"][-1]["sparsity"],
            "final acc": d["rounds"][-1]["accuracy"],
            "compression": d["rounds"][-1]["compression"],
            "seconds": d["seconds"],
        }
        for name, d in runs.items()
    ]
    print(report.format_table(rows))
    mag, rnd = runs["magnitude"]["rounds"][-1], runs["random"]["rounds"][-1]
    print(
        f"summary: at {mag['sparsity']:.1%} sparsity magnitude pruning keeps "
        f"{mag['accuracy']:.1%} test accuracy, random pruning (the control) {rnd['accuracy']:.1%} "
        f"(dense {runs['magnitude']['rounds'][0]['accuracy']:.1%})"
    )
    print(
        f"results: {out}/<method>/results.json, rounds.csv, *.png; {out}/accuracy_vs_sparsity.png"
    )
    return 0


def _print_round(r: Round) -> None:
    print(
        f"round {r.round}: sparsity {r.sparsity:6.1%}  "
        f"accuracy {r.accuracy:6.1%}  loss {r.loss:.3f}"
    )


# --- run ------------------------------------------------------------------------------------


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run an experiment from a TOML config")
    p.add_argument("config", help="TOML file (see configs/)")
    p.add_argument("--out", help="results directory (overrides out_dir)")
    _add_data_args(p, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
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
    res = run(exp, on_round=None if exp.quiet else _print_round)
    print(report.rounds_table(res.to_dict()))
    print(report.layers_table(res.to_dict()))
    print(f"results: {res.out_dir} (config hash {exp.hash()})")
    return 0


# --- prune ----------------------------------------------------------------------------------


def add_prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint and save it")
    p.add_argument("checkpoint", help="safetensors checkpoint written by prunebound")
    p.add_argument("--model", required=True, help="model name (prunebound.models.MODELS)")
    p.add_argument("--model-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--method", default="magnitude", help="a key of prunebound.METHODS")
    p.add_argument(
        "--amount", type=_fraction, required=True, help="fraction of survivors to prune, [0, 1]"
    )
    p.add_argument("--scope", choices=["layer", "global"], default="layer")
    p.add_argument("--seed", type=int, default=0, help="for random methods")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.set_defaults(handler=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    import prunebound as pb

    model = pb.models.build_model(args.model, **dict(args.model_arg))
    pb.load(model, args.checkpoint)
    pb.prune(model, args.method, args.amount, scope=args.scope, seed=args.seed)
    pb.save(model, args.out)
    sp = pb.sparsity(model)
    rows = [
        {"layer": r.name, "total": r.total, "zeros": r.zeros, "sparsity": r.sparsity}
        for r in sp.layers
    ]
    rows.append({"layer": "all", "total": sp.total, "zeros": sp.zeros, "sparsity": sp.sparsity})
    print(report.format_table(rows))
    print(f"compression {sp.compression:.2f}x; saved {args.out}")
    return 0


# --- report ---------------------------------------------------------------------------------


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="print and re-plot a results directory")
    p.add_argument("results_dir")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    root = Path(args.results_dir)
    dirs = (
        [root]
        if (root / "results.json").is_file()
        else sorted(p.parent for p in root.glob("*/results.json"))
    )
    if not dirs:
        raise FileNotFoundError(f"no results.json in {root} or its subdirectories")
    for d in dirs:
        res = report.load_results(d)
        print(
            f"== {d} ({res['config']['schedule']['kind']} {res['config']['schedule']['method']}) =="
        )
        print(report.rounds_table(res))
        if res.get("final_sparsity"):
            print(report.layers_table(res))
        paths = report.plot_run(res, d)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


# --- main -----------------------------------------------------------------------------------

COMMANDS: list[Callable[[Any], None]] = [
    add_demo_parser,
    add_run_parser,
    add_prune_parser,
    add_report_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from prunebound import __version__

    parser = argparse.ArgumentParser(
        prog="prunebound", description="Prune PyTorch networks, with bounds you can check."
    )
    parser.add_argument("--version", action="version", version=f"prunebound {__version__}")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (tests call `main([...])`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"prunebound {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prunebound {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
