"""`prunebound prune`, `export` and `report`: checkpoints and results directories on disk."""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
from pathlib import Path
from typing import Any

from torch import nn

from prunebound import report, theory_tables
from prunebound._masks import prunable_layers
from prunebound.checkpoint import save
from prunebound.commands._args import (
    UsageError,
    add_checkpoint_args,
    add_data_args,
    dataset_for,
    fraction,
    ints,
    key_value,
    load_checkpoint,
    method,
    name_count,
    names,
    pos_int,
)
from prunebound.deploy.export import export, export_report
from prunebound.deploy.export_file import save_export
from prunebound.methods import METHODS, get_method
from prunebound.outputs import leave_outputs
from prunebound.pruning import prune
from prunebound.refitting import refit
from prunebound.sparsity_stats import sparsity


def add_prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint and save it")
    add_checkpoint_args(p)
    p.add_argument(
        "--method",
        type=method,
        default="magnitude",
        help=f"one of {', '.join(sorted(METHODS))} (prunebound.METHODS; default magnitude)",
    )
    p.add_argument("--amount", type=fraction, help="fraction of survivors to prune, [0, 1]")
    p.add_argument(
        "--counts",
        type=name_count,
        action="append",
        metavar="LAYER=N",
        help="instead of --amount: prune exactly N surviving units of LAYER (repeatable)",
    )
    p.add_argument(
        "--layers",
        type=names,
        action="append",
        metavar="NAMES",
        help="comma-separated layer names or globs to prune (default: all Linear/Conv; "
        "structured methods prune an output layer only when it is named here)",
    )
    p.add_argument(
        "--exclude",
        type=names,
        action="append",
        metavar="NAMES",
        help="comma-separated layer names or globs to leave alone",
    )
    p.add_argument("--norm", type=int, choices=[1, 2], help="row norm of neuron/filter (default 2)")
    p.add_argument("--scope", choices=["layer", "global"], default="layer")
    p.add_argument("--seed", type=int, default=0, help="for random methods")
    add_data_args(p, default=None)
    p.add_argument(
        "--calibration",
        type=pos_int,
        default=1024,
        help="training examples of --dataset used as calibration data (data-aware methods, "
        "--coupled tracing, --refit; default 1024)",
    )
    p.add_argument(
        "--coupled",
        action="store_true",
        help="structured methods: prune coupled units whole (residual channels together)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="then refit the survivors towards the checkpoint's layer outputs (least squares "
        "on the calibration examples)",
    )
    p.add_argument(
        "--out", help="output checkpoint (default: CHECKPOINT stem + .pruned.safetensors)"
    )
    p.set_defaults(handler=run_prune)


def _selection(model: nn.Module, args: argparse.Namespace) -> list[str] | None:
    """The `layers=` of `prune`: --layers as given, or without --exclude's matches (resolved here
    as `prune` would select, so an output layer left alone stays alone)."""
    chosen = [n for group in args.layers or () for n in group]
    if not args.exclude:
        return chosen or None
    meth = get_method(args.method, args.norm)
    layers = prunable_layers(model, chosen or None, types=meth.layer_types)
    if meth.unit == "row":
        layers = leave_outputs(model, layers, chosen, dict(args.counts or ()))[0]
    kept = list(layers)
    for pattern in (p for group in args.exclude for p in group):
        hits = [n for n in kept if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(f"--exclude {pattern!r} matches none of the layers to prune {kept}")
        kept = [n for n in kept if n not in hits]
    if not kept:
        raise UsageError("--exclude leaves no layer to prune")
    return kept


def run_prune(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.with_name(f"{ckpt.stem}.pruned.safetensors")
    if out.resolve() == ckpt.resolve():
        raise UsageError(f"--out {out} is the input checkpoint: choose another path")
    if (args.amount is None) == (args.counts is None):
        raise UsageError("give exactly one of --amount or --counts")
    model = load_checkpoint(args)
    counts = dict(args.counts) if args.counts else None
    meth = get_method(args.method, args.norm)
    if meth.coupled and not args.coupled:
        raise UsageError(f"method {args.method!r} scores whole coupled units: pass --coupled")
    needs = meth.needs
    calib = None
    if needs or args.coupled or args.refit:
        if args.dataset is None:
            why = f"method {args.method!r}" if needs else "--coupled" if args.coupled else "--refit"
            raise UsageError(f"{why} needs calibration data: pass --dataset (and --data-dir)")
        data = dataset_for(model, args)
        calib = (data.x_train[: args.calibration], data.y_train[: args.calibration])
    original = copy.deepcopy(model) if args.refit else None
    prune(model, args.method, args.amount, scope=args.scope, layers=_selection(model, args),
          counts=counts, seed=args.seed, norm=args.norm, data=calib if needs else None,
          coupled=args.coupled, example_inputs=calib[0][:64] if calib else None)  # fmt: skip
    if original is not None and calib is not None:
        refit(model, original, calib[0])
    save(model, out)
    sp = sparsity(model)
    print(report.sparsity_table(sp.to_dict(), shapes=False))
    print(
        f"compression {sp.compression:.2f}x of the prunable weights; "
        f"{sp.model_sparsity:.1%} of all parameters zero; saved {out}"
    )
    if sp.unpruned:
        print(f"not prunable here: {', '.join(sp.unpruned)}")
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a pruned checkpoint for sparse inference")
    add_checkpoint_args(p)
    p.add_argument("--format", choices=["csr", "dense"], default="csr")
    p.add_argument("--batch-size", type=pos_int, default=1, help="batch to measure at (default 1)")
    p.add_argument(
        "--input-shape", type=ints, help="one sample's shape, e.g. 1,28,28 (measures convs)"
    )
    p.add_argument(
        "--layer",
        type=key_value,
        action="append",
        default=[],
        metavar="NAME=CHOICE",
        help="per-layer override: dense, sparse or a kernel name (repeatable; globs allowed)",
    )
    p.add_argument(
        "--out",
        help="output file (default: CHECKPOINT stem + .export.safetensors; an existing file, "
        "such as the export a run wrote, is only replaced with --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.with_name(f"{ckpt.stem}.export.safetensors")
    if out.resolve() == ckpt.resolve():
        raise UsageError(f"--out {out} is the input checkpoint: choose another path")
    model = load_checkpoint(args)
    if out.exists() and not args.overwrite:
        raise UsageError(
            f"{out} exists (a run's own export?); pass --out PATH to write elsewhere, or "
            "--overwrite to replace it"
        )
    exported = export(
        model,
        args.format,
        layers=dict(args.layer),
        batch_size=args.batch_size,
        input_shape=args.input_shape,
    )
    save_export(exported, out)
    print(report.export_table(export_report(exported).to_dict()))
    size, ckpt_size = out.stat().st_size, ckpt.stat().st_size
    print(f"saved {out}: {size} bytes ({size / ckpt_size:.1%} of the checkpoint's {ckpt_size})")
    return 0


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="print and re-plot a results directory (of run/demo, or of verify)"
    )
    p.add_argument("results_dir", help="a directory with results.json or verify.json, or above")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    root = Path(args.results_dir)
    dirs = (
        [root]
        if (root / "results.json").is_file()
        else sorted(p.parent for p in root.glob("*/results.json"))
    )
    verify_dirs = (
        [root]
        if (root / "verify.json").is_file()
        else sorted(p.parent for p in root.glob("*/verify.json"))
    )
    if not dirs and not verify_dirs:
        raise FileNotFoundError(f"no results.json or verify.json in {root} or its subdirectories")
    for d in verify_dirs:
        report_verify(d)
    for d in dirs:
        res = report.load_results(d)
        schedule = res["config"]["schedule"]
        print(f"== {d} ({schedule['kind']} {schedule['method']}) ==")
        print(report.rounds_table(res))
        if res.get("final_sparsity"):
            print(report.layers_table(res))
        paths = report.plot_run(res, d)
        print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def report_verify(d: Path) -> None:
    """Print the tables of a `prunebound verify` directory and re-plot its gaps.png."""
    try:
        out = json.loads((d / "verify.json").read_text())
        rep = out["verify"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{d / 'verify.json'} is not a prunebound verify file") from None
    print(f"== {d} (verify) ==")
    if "plan" in out:
        print(theory_tables.plan_table(out["plan"]))
    print(theory_tables.verify_summary(rep))
    if "largest_fraction" in out:
        print(theory_tables.largest_table(out["largest_fraction"]))
    print(f"plots: {report.plot_gaps(rep, d / 'gaps.png')}")
