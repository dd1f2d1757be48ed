"""Command line: `prunebound demo | run | prune | export | report | plan | certify | verify`.

Each command is an `add_<cmd>_parser` / `run_<cmd>` pair. Exit codes: 0 success, 2 usage error
(argparse), 1 runtime failure with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebound import report
from prunebound.training.config import DataSpec, Experiment, ModelSpec
from prunebound.training.experiment import CHECKPOINT, add_export_summary, run
from prunebound.training.loop import TrainConfig
from prunebound.training.runner import Round
from prunebound.training.schedule import Schedule

if TYPE_CHECKING:
    from torch import nn

    from prunebound.training.distributed import DistContext

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A bad combination of arguments found by a handler: exit 2 with the command's usage."""


def _float_where(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a float with `ok(value)` (NaN never passes), else "expected ..."."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not ok(v):  # comparisons with NaN are False: refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    parse.__name__ = expected
    return parse


_fraction = _float_where(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_sparsity = _float_where(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")  # 1 prunes everything
_open_unit = _float_where(lambda v: 0.0 < v < 1.0, "a number in (0, 1)")  # a probability
_positive_float = _float_where(lambda v: v > 0.0, "a number > 0")


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _ints(text: str) -> tuple[int, ...]:
    try:
        v = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return v


def _int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an int >= lo."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}")
        return v

    parse.__name__ = f"int >= {lo}"
    return parse


_nonneg_int = _int_at_least(0)
_pos_int = _int_at_least(1)


def _method(text: str) -> str:
    """A key of prunebound.METHODS (checked when parsing, so registered methods count)."""
    from prunebound.methods import get_method

    try:
        get_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _model_name(text: str) -> str:
    """A key of prunebound.models.MODELS."""
    from prunebound.models import MODELS

    if text not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; valid names: {', '.join(sorted(MODELS))}"
        )
    return text


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
    p.add_argument(
        "--seed", type=_nonneg_int, default=0, help="seeds init, shuffling, random masks"
    )
    p.add_argument("--sparsity", type=_sparsity, default=0.9, help="target in [0, 1) (def. 0.9)")
    p.add_argument("--rounds", type=_pos_int, default=5, help="pruning rounds (default 5)")
    p.add_argument("--epochs", type=_nonneg_int, default=20, help="dense epochs (default 20)")
    p.add_argument("--retrain-epochs", type=_nonneg_int, default=4, help="per round (def. 4)")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 3 dense epochs, 2 rounds of 1 epoch"
    )
    _add_data_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-round lines")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    epochs, rounds, retrain = args.epochs, args.rounds, args.retrain_epochs
    if args.quick:
        epochs, rounds, retrain = 3, 2, 1
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.safetensors (an interrupted epoch restarts)",
    )
    d = p.add_argument_group("distributed (DDP; see docs/distributed.md)")
    d.add_argument(
        "--nproc",
        type=_pos_int,
        default=1,
        help="processes to launch on this machine (default 1); train.batch_size is the global "
        "batch and must be a multiple; leave at 1 under torchrun",
    )
    d.add_argument(
        "--backend",
        choices=["auto", "gloo", "nccl"],
        default="auto",
        help="gloo (CPU), nccl (one GPU per process) or auto (nccl if CUDA; default)",
    )
    d.add_argument(
        "--dist-timeout",
        type=_positive_float,
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
    from prunebound.training import distributed as pbd

    ranks = pbd.env_ranks(os.environ)  # set by torchrun
    if args.nproc != 1:
        if ranks is not None:
            raise ValueError("--nproc launches its own processes: leave it at 1 under torchrun")
        pbd.check_world_size(exp.train.batch_size, args.nproc)  # before anything starts
        level = logging.getLogger().getEffectiveLevel()
        try:
            pbd.launch(
                _run_rank,
                args.nproc,
                (exp, args.resume, level),
                backend=args.backend,
                timeout=args.dist_timeout,
                threads=args.threads,
            )
        except RuntimeError as e:
            ckpt = Path(exp.out_dir) / CHECKPOINT
            if not ckpt.is_file():
                raise
            raise RuntimeError(f"{e}. Checkpoint {ckpt} is intact: rerun with --resume") from None
        d = add_export_summary(exp)  # the ranks are gone: measure here
    elif ranks is not None and ranks.world_size > 1:
        pbd.check_world_size(exp.train.batch_size, ranks.world_size)
        with pbd.process_group(
            rank=ranks.rank,
            world_size=ranks.world_size,
            local_rank=ranks.local_rank,
            backend=args.backend,
            timeout=args.dist_timeout,
        ) as ctx:
            on_round = None if exp.quiet or not ctx.is_main else _print_round
            d = run(exp, on_round=on_round, resume=args.resume, dist=ctx).to_dict()
        if not ctx.is_main:
            pbd.exit_process(0)  # this process is torchrun's rank: done, skip finalization
        d = add_export_summary(exp)  # rank 0, the group closed: nobody waits on it now
    else:
        res = run(exp, on_round=None if exp.quiet else _print_round, resume=args.resume)
        d = res.to_dict()
    print(report.rounds_table(d))
    print(report.layers_table(d))
    if "distributed" in d:
        dd = d["distributed"]
        print(
            f"distributed: {dd['world_size']} ranks ({dd['backend']}), largest difference "
            f"between the ranks' final models {dd['max_rank_divergence']:.3g}"
        )
    ex = d.get("export", {})
    if ex.get("bytes"):
        print(
            f"export (csr): {ex['bytes'] / 1024:.0f} KiB on disk ({100 * ex['size_ratio']:.1f}% of "
            f"dense), {ex['speedup']:.2f}x faster at batch 1 than dense (measured)"
        )
    print(f"results: {exp.out_dir} (config hash {exp.hash()})")
    if ranks is not None and ranks.world_size > 1:
        pbd.exit_process(0)  # rank 0 under torchrun: as above
    return 0


def _run_rank(ctx: DistContext, exp: Experiment, resume: bool, log_level: int) -> None:
    """One process of `run --nproc N` (spawned by `distributed.launch`; rank 0 prints)."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    on_round = None if exp.quiet or not ctx.is_main else _print_round
    run(exp, on_round=on_round, resume=resume, dist=ctx)


# --- prune ----------------------------------------------------------------------------------


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT, --model (inferred from the results.json beside it) and --model-arg."""
    p.add_argument("checkpoint", help="safetensors checkpoint written by prunebound")
    p.add_argument(
        "--model",
        type=_model_name,
        help="model name (prunebound.models.MODELS); default: the model of the results.json "
        "next to the checkpoint",
    )
    p.add_argument("--model-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE")


def _load_checkpoint(args: argparse.Namespace) -> nn.Module:
    """The model named by --model (or inferred) with the checkpoint's weights and masks."""
    import prunebound as pb

    ckpt = Path(args.checkpoint)
    try:
        name, model_args = _model_spec(ckpt, args.model, dict(args.model_arg))
    except ModelNotInferredError as e:
        raise UsageError(f"{e}; pass --model NAME (and --model-arg KEY=VALUE as needed)") from None
    model = pb.models.build_model(name, **model_args)
    pb.load(model, ckpt)
    return model


def add_prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint and save it")
    _add_checkpoint_args(p)
    p.add_argument(
        "--method", type=_method, default="magnitude", help="a key of prunebound.METHODS"
    )
    p.add_argument(
        "--amount", type=_fraction, required=True, help="fraction of survivors to prune, [0, 1]"
    )
    p.add_argument("--scope", choices=["layer", "global"], default="layer")
    p.add_argument("--seed", type=int, default=0, help="for random methods")
    p.add_argument(
        "--out", help="output checkpoint (default: CHECKPOINT stem + .pruned.safetensors)"
    )
    p.set_defaults(handler=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    import prunebound as pb

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.with_name(f"{ckpt.stem}.pruned.safetensors")
    if out.resolve() == ckpt.resolve():
        raise UsageError(f"--out {out} is the input checkpoint: choose another path")
    model = _load_checkpoint(args)
    pb.prune(model, args.method, args.amount, scope=args.scope, seed=args.seed)
    pb.save(model, out)
    sp = pb.sparsity(model)
    rows = [
        {"layer": r.name, "total": r.total, "zeros": r.zeros, "sparsity": r.sparsity}
        for r in sp.layers
    ]
    rows.append({"layer": "all", "total": sp.total, "zeros": sp.zeros, "sparsity": sp.sparsity})
    print(report.format_table(rows))
    print(f"compression {sp.compression:.2f}x; saved {out}")
    return 0


# --- export ---------------------------------------------------------------------------------


class ModelNotInferredError(ValueError):
    """No --model, and no usable results.json next to the checkpoint to take it from."""


def _model_spec(
    ckpt: Path, name: str | None, model_args: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The model (name, args) of a checkpoint: `name` if given, else the results.json's beside it.

    `model_args` (from --model-arg) override the inferred args. Raises ModelNotInferredError.
    """
    if name is not None:
        return name, model_args
    results = ckpt.parent / "results.json"
    if not results.is_file():
        raise ModelNotInferredError(f"--model is required: no results.json next to {ckpt}")
    try:
        spec = json.loads(results.read_text())["config"]["model"]
        name, inferred = spec["name"], spec.get("args", {})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelNotInferredError(
            f"--model is required: {results} has no config.model.name (not a prunebound "
            "results file?)"
        ) from None
    if not isinstance(name, str) or not isinstance(inferred, dict):
        raise ModelNotInferredError(f"--model is required: {results} has a malformed config.model")
    return name, {**inferred, **model_args}


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a pruned checkpoint for sparse inference")
    _add_checkpoint_args(p)
    p.add_argument("--format", choices=["csr", "dense"], default="csr")
    p.add_argument("--batch-size", type=_pos_int, default=1, help="batch to measure at (default 1)")
    p.add_argument(
        "--input-shape", type=_ints, help="one sample's shape, e.g. 1,28,28 (measures convs)"
    )
    p.add_argument(
        "--layer",
        type=_kv,
        action="append",
        default=[],
        metavar="NAME=CHOICE",
        help="per-layer override: dense, sparse or a kernel name (repeatable; globs allowed)",
    )
    p.add_argument("--out", help="output file (default: CHECKPOINT stem + .export.safetensors)")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    import prunebound as pb

    ckpt = Path(args.checkpoint)
    model = _load_checkpoint(args)
    exported = pb.export(
        model,
        args.format,
        layers=dict(args.layer),
        batch_size=args.batch_size,
        input_shape=args.input_shape,
    )
    out = Path(args.out) if args.out else ckpt.with_name(f"{ckpt.stem}.export.safetensors")
    pb.save_export(exported, out)
    rows = [
        {
            "layer": r.name,
            "type": r.type,
            "sparsity": r.sparsity,
            "kernel": r.kernel,
            "speedup": "" if r.speedup is None else f"{r.speedup:.2f}x",
            "reason": r.reason,
        }
        for r in pb.export_report(exported).layers
    ]
    print(report.format_table(rows))
    size, ckpt_size = out.stat().st_size, ckpt.stat().st_size
    print(f"saved {out}: {size} bytes ({size / ckpt_size:.1%} of the checkpoint's {ckpt_size})")
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


# --- plan / certify / verify (theory) --------------------------------------------------------


def _add_target_args(p: argparse.ArgumentParser) -> None:
    """Target (an MLP or a plain conv stack, ReLU between) and budget of a theory plan."""
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--widths", type=_ints, help="MLP widths n0,...,nL (as models.mlp)")
    t.add_argument("--conv", type=_ints, metavar="C0,...,CL", help="conv stack channels")
    p.add_argument("--in-size", type=_ints, help="conv input spatial size, e.g. 12,12")
    p.add_argument("--kernel", type=int, default=3, help="conv kernel (default 3)")
    p.add_argument("--stride", type=int, default=1, help="conv stride (default 1)")
    p.add_argument("--padding", type=int, default=0, help="conv zero padding (default 0)")
    e = p.add_mutually_exclusive_group(required=True)
    e.add_argument("--eps", type=float, help="allowed sup_{||x||<=R} ||f(x) - F(x)||, absolute")
    e.add_argument("--rel-eps", type=float, help="eps relative to the output scale r_L")
    p.add_argument(
        "--delta", type=_open_unit, default=0.05, help="failure probability in (0, 1) (def. 0.05)"
    )
    p.add_argument("--method", choices=["magnitude", "random"], default="magnitude")
    p.add_argument("--law", choices=["uniform", "gaussian"], default="uniform")
    p.add_argument("--split", choices=["optimized", "equal", "params"], default="optimized")
    p.add_argument("--sampling", choices=["count", "bernoulli"], default="count")
    p.add_argument("--radius", type=float, default=1.0, help="input ball radius R (default 1)")
    p.add_argument(
        "--bound",
        choices=["theorem", "sampled"],
        default="theorem",
        help="closed-form bound, or certificates of sampled networks (docs/theory.md §6b)",
    )


def _make_plan(args: argparse.Namespace) -> Any:
    from prunebound.theory import plan
    from prunebound.theory.network import conv_specs

    if args.conv is not None:
        if args.in_size is None:
            raise ValueError("--conv needs --in-size, e.g. --in-size 12,12")
        target: Any = list(
            conv_specs(args.conv, args.kernel, args.in_size, stride=args.stride,
                       padding=args.padding)
        )  # fmt: skip
    else:
        target = list(args.widths)
    kw = {
        "method": args.method,
        "law": args.law,
        "split": args.split,
        "radius": args.radius,
        "sampling": args.sampling,
    }
    eps = args.eps
    if eps is None:  # r_L bounds the target alone: it does not depend on eps or the counts
        if not args.rel_eps > 0:
            raise ValueError(f"--rel-eps must be > 0, got {args.rel_eps}")
        eps = args.rel_eps * plan(target, 1.0, args.delta, **kw).output_scale
    if args.bound == "sampled":  # minutes for wide layers: show the search as it goes
        print("sampled plan: search on 32 networks, then certify on fresh ones", file=sys.stderr)
        logging.getLogger("prunebound.theory.sampled").setLevel(logging.INFO)
    return plan(target, eps, args.delta, bound=args.bound, **kw)


def _plan_table(p: Any) -> str:
    rows = [
        {
            "layer": lp.name,
            "shape": "x".join(str(n) for n in spec.shape),
            "weights": spec.numel,
            "prune": lp.count,
            "fraction": lp.fraction,
            "threshold": "" if lp.threshold is None else f"{lp.threshold:.4g}",
            "eps share": lp.eps_share,
            "||Delta|| <=": "" if lp.norm_bound is None else f"{lp.norm_bound:.4g}",
        }
        for lp, spec in zip(p.layers, p.specs, strict=True)
    ]
    lines = [
        report.format_table(rows),
        f"guarantee: with probability >= {1 - p.delta:.4g} over the weights"
        f"{' and masks' if p.method == 'random' else ''}, sup_{{||x||<={p.radius:g}}} "
        f"||f(x) - F(x)|| <= eps = {p.eps:.4g}",
        f"output scale r_L = {p.output_scale:.4g} (bound on sup ||F(x)||); "
        f"eps / r_L = {p.eps / p.output_scale:.4g}; pruned {p.total_pruned} weights",
    ]
    return "\n".join(lines + [f"note: {n}" for n in p.notes])


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="per-layer prunable counts for an error budget (eps, delta)")
    _add_target_args(p)
    _add_largest_arg(p)
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seeds the --largest networks")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=run_plan)


def _add_largest_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--largest", type=_nonneg_int, default=0, metavar="TRIALS",
        help="also bisect the empirically largest fraction along the plan on TRIALS sampled "
        "networks, and print planned vs empirical per layer (default off)",
    )  # fmt: skip


def _largest(p: Any, trials: int, seed: int, search: Any) -> tuple[dict[str, Any], str]:
    """`largest_fraction` of a plan: its dict and a per-layer table (planned, empirical, ratio)."""
    import prunebound as pb

    lf = pb.largest_fraction(p, trials=trials, seed=seed, search=search)
    rows = [
        {"layer": n, "planned": a, "empirical": b, "ratio": "" if r is None else f"{r:.3g}"}
        for n, a, b, r in zip(lf.layers, lf.planned, lf.empirical, lf.ratio, strict=True)
    ]
    return lf.to_dict(), report.format_table(rows)


def run_plan(args: argparse.Namespace) -> int:
    import prunebound as pb

    p = _make_plan(args)
    d: dict[str, Any] = p.to_dict()
    table = _plan_table(p)
    if args.largest > 0:
        d["largest_fraction"], lt = _largest(p, args.largest, args.seed, pb.SearchConfig())
        table += (
            "\nempirically largest fractions along the plan (bisection; the worst-gap search "
            "under-estimates each gap, so these may overshoot; 1 = saturated):\n"
        )
        table += lt
    print(json.dumps(d, indent=1) if args.json else table)
    return 0


def add_certify_parser(sub: Any) -> None:
    p = sub.add_parser("certify", help="deterministic bound on a pruned checkpoint's output gap")
    _add_checkpoint_args(p)
    p.add_argument(
        "--radius", type=_positive_float, default=1.0, help="input ball radius R (default 1)"
    )
    p.add_argument("--input-shape", type=_ints, help="one sample's shape (needed for conv)")
    p.add_argument("--json", action="store_true", help="print the certificate as JSON")
    p.set_defaults(handler=run_certify)


def run_certify(args: argparse.Namespace) -> int:
    import prunebound as pb

    model = _load_checkpoint(args)
    cert = pb.theory.certify(model.eval(), radius=args.radius, input_shape=args.input_shape)
    if args.json:
        print(json.dumps(cert.to_dict(), indent=1))
        return 0
    rows = [
        {
            "layer": t.name,
            "pruned": f"{t.pruned}/{t.total}",
            "||W||": t.norm_w,
            "||W~||": t.norm_pruned,
            "||Delta||": t.norm_delta,
            "r_in": t.r_in,
            "contribution": t.contribution,
        }
        for t in cert.layers
    ]
    print(report.format_table(rows))
    print(
        f"sup_{{||x||<={cert.radius:g}}} ||f(x) - F(x)|| <= {cert.bound:.5g} ({cert.method}); "
        f"output scale r_L = {cert.output_scale:.5g}, relative {cert.relative:.4g}"
    )
    print(cert.assumptions)
    return 0


def add_verify_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help="Monte Carlo check of a plan on sampled networks")
    _add_target_args(p)
    p.add_argument("--trials", type=int, default=500, help="networks to sample (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.95, help="of the CP upper limit")
    p.add_argument("--samples", type=int, default=128, help="random inputs per network")
    p.add_argument("--restarts", type=int, default=8, help="gradient-ascent restarts")
    p.add_argument("--steps", type=int, default=40, help="gradient-ascent steps")
    p.add_argument("--certificates", action="store_true", help="also certify every network")
    _add_largest_arg(p)
    p.add_argument("--out", default="runs/verify", help="directory for verify.json, gaps.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import prunebound as pb

    search = pb.SearchConfig(samples=args.samples, restarts=args.restarts, steps=args.steps)
    p = _make_plan(args)
    if not args.quiet:
        print(_plan_table(p))
    with tqdm(total=args.trials, desc="verify", unit="net", disable=args.quiet) as bar:
        rep = pb.verify(
            p, trials=args.trials, seed=args.seed, search=search, confidence=args.confidence,
            certificates=args.certificates, progress=lambda done, _: bar.update(done - bar.n),
        )  # fmt: skip
    out: dict[str, Any] = {"plan": p.to_dict(), "verify": rep.to_dict()}
    print(
        f"{rep.violations}/{rep.trials} violations (gap > eps = {rep.eps:.4g}); rate "
        f"{rep.rate:.3g} <= {rep.rate_upper:.3g} (Clopper-Pearson, {rep.confidence:.0%}); "
        f"{'PASS' if rep.passed else 'FAIL'} vs delta = {rep.delta:g}"
    )
    print(
        f"{1 - rep.delta:.0%} quantile of the worst-gap estimate {rep.gap_quantile:.4g}, "
        f"tightness {rep.tightness:.3g}; eps / r_L = {rep.relative_eps:.4g} "
        "(gap estimates are lower bounds on each network's sup)"
    )
    if rep.certified is not None:
        print(f"certified (certificate <= eps): {rep.certified}/{rep.trials} networks")
    if args.largest > 0:
        out["largest_fraction"], table = _largest(p, args.largest, args.seed, search)
        print(table)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "verify.json").write_text(json.dumps(out, indent=1))
    png = report.plot_gaps(out["verify"], d / "gaps.png")
    print(f"results: {d / 'verify.json'}, {png}")
    return 0


# --- main -----------------------------------------------------------------------------------

COMMANDS: list[Callable[[Any], None]] = [
    add_demo_parser,
    add_run_parser,
    add_prune_parser,
    add_export_parser,
    add_report_parser,
    add_plan_parser,
    add_certify_parser,
    add_verify_parser,
]


def build_parser() -> argparse.ArgumentParser:
    from prunebound import __version__

    parser = argparse.ArgumentParser(
        prog="prunebound", description="Prune PyTorch networks, with bounds you can check."
    )
    parser.add_argument("--version", action="version", version=f"prunebound {__version__}")
    parser.add_argument(
        "--threads", type=_pos_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # for UsageError: the command's own usage line
        p.set_defaults(command_parser=p)
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
            import torch

            torch.set_num_threads(args.threads)
        return handler(args)
    except UsageError as e:  # argparse-style: usage, "prog cmd: error: ...", exit 2
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.error(str(e))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"prunebound {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prunebound {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
