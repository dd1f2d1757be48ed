"""`prunebound plan`, `certify` and `verify`: the theory's plans, certificates and their checks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from prunebound import report, theory_tables
from prunebound.check.batch import SearchConfig
from prunebound.check.sampled import sampled_plan
from prunebound.check.verify import largest_fraction, verify
from prunebound.checkpoint import load
from prunebound.commands._args import (
    UsageError,
    add_checkpoint_args,
    add_data_args,
    float_where,
    ints,
    key_value,
    load_checkpoint,
    model_name,
    model_spec,
    nonneg_int,
    open_unit,
    pos_int,
    positive_float,
    widths,
)
from prunebound.data import load_dataset
from prunebound.layer_types import CONV
from prunebound.models import build_model
from prunebound.theory import Plan, certify, data_certificate, plan
from prunebound.theory.resolve import conv_specs


def add_target_args(p: argparse.ArgumentParser, *, trained: bool = False) -> None:
    """Target (an MLP or a plain conv stack, ReLU between; with `trained`, also a checkpoint)
    and budget of a theory plan."""
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--widths", type=widths, help="MLP widths n0,...,nL (as models.mlp)")
    t.add_argument("--conv", type=widths, metavar="C0,...,CL", help="conv stack channels")
    if trained:
        t.add_argument(
            "--checkpoint",
            help="a trained model's checkpoint: plan from its own weights (law 'trained')",
        )
        p.add_argument("--model", type=model_name, help="with --checkpoint (default: inferred)")
        p.add_argument(
            "--model-arg", type=key_value, action="append", default=[], metavar="KEY=VALUE"
        )
        p.add_argument("--input-shape", type=ints, help="with --checkpoint: one sample's shape")
        p.add_argument(
            "--tighten", action="store_true", help="trained magnitude plans: grow by certificates"
        )
    p.add_argument("--in-size", type=ints, help="conv input spatial size, e.g. 12,12")
    p.add_argument("--kernel", type=pos_int, default=3, help="conv kernel (default 3)")
    p.add_argument("--stride", type=pos_int, default=1, help="conv stride (default 1)")
    p.add_argument("--padding", type=nonneg_int, default=0, help="conv zero padding (default 0)")
    e = p.add_mutually_exclusive_group(required=True)
    e.add_argument(
        "--eps", type=positive_float, help="allowed sup_{||x||<=R} ||f(x) - F(x)||, absolute"
    )
    e.add_argument("--rel-eps", type=positive_float, help="eps relative to the output scale r_L")
    p.add_argument(
        "--delta", type=open_unit, default=0.05, help="failure probability in (0, 1) (def. 0.05)"
    )
    p.add_argument(
        "--method",
        choices=["magnitude", "random", "neuron"],
        default="magnitude",
        help="what each layer loses: weights by |w|, random weights, or whole neurons by norm",
    )
    laws = ["uniform", "gaussian", "trained"] if trained else ["uniform", "gaussian"]
    p.add_argument(
        "--law", choices=laws, help="weight law (default uniform; 'trained' with --checkpoint)"
    )
    p.add_argument("--split", choices=["optimized", "equal", "params"], default="optimized")
    p.add_argument("--sampling", choices=["count", "bernoulli"], default="count")
    p.add_argument(
        "--radius", type=positive_float, default=1.0, help="input ball radius R (default 1)"
    )
    p.add_argument(
        "--bound",
        choices=["theorem", "sampled"],
        default="theorem",
        help="closed-form bound, or certificates of sampled networks (docs/theory.md §6b)",
    )


def add_largest_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--largest", type=nonneg_int, default=0, metavar="TRIALS",
        help="also bisect the empirically largest fraction along the plan on TRIALS sampled "
        "networks, and print planned vs empirical per layer (default off)",
    )  # fmt: skip


def _target(args: argparse.Namespace) -> Any:
    """The planning target the arguments name; UsageError for a bad combination."""
    if getattr(args, "checkpoint", None) is not None:
        return load_checkpoint(args).eval()
    if args.conv is not None:
        if args.in_size is None:
            raise UsageError("--conv needs --in-size, e.g. --in-size 12,12")
        if len(args.conv) < 2 or len(args.in_size) not in (1, 2):
            raise UsageError("--conv needs >= 2 channel counts and --in-size 1 or 2 sizes")
        try:
            return list(
                conv_specs(args.conv, args.kernel, args.in_size, stride=args.stride,
                           padding=args.padding)
            )  # fmt: skip
        except ValueError as e:
            raise UsageError(str(e)) from None
    if len(args.widths) < 2 or min(args.widths) < 1:
        raise UsageError(f"--widths needs >= 2 positive widths n0,...,nL, got {args.widths}")
    return list(args.widths)


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan the target and budget arguments ask for (`--rel-eps` scaled by r_L)."""
    target = _target(args)
    trained = isinstance(target, nn.Module)
    law = args.law or ("trained" if trained else "uniform")
    if law == "trained" and not trained:
        raise UsageError("--law trained needs --checkpoint (a trained model's weights)")
    if getattr(args, "tighten", False) and law != "trained":
        raise UsageError("--tighten needs --checkpoint and --law trained")
    if args.bound == "sampled" and law == "trained":
        raise UsageError("--bound sampled samples networks from a law: not with --law trained")
    kw = {
        "method": args.method,
        "law": law,
        "split": args.split,
        "radius": args.radius,
        "sampling": args.sampling,
        "input_shape": getattr(args, "input_shape", None),
    }
    if getattr(args, "tighten", False):
        kw["tighten"] = True
    eps = args.eps
    if eps is None:  # r_L bounds the target alone: it does not depend on eps or the counts
        eps = args.rel_eps * plan(target, 1.0, args.delta, **{**kw, "tighten": False}).output_scale
    theorem = plan(target, eps, args.delta, **kw)
    if args.bound == "theorem":
        return theorem
    # minutes for wide layers: show the search as it goes
    print("sampled plan: search on 32 networks, then certify on fresh ones", file=sys.stderr)
    logging.getLogger("prunebound.check.sampled").setLevel(logging.INFO)
    return sampled_plan(theorem).plan


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="per-layer prunable counts for an error budget (eps, delta)")
    add_target_args(p, trained=True)
    add_largest_arg(p)
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the --largest networks")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    p = make_plan(args)
    d: dict[str, Any] = p.to_dict()
    table = theory_tables.plan_table(d)
    if args.largest > 0:
        lf = largest_fraction(p, trials=args.largest, seed=args.seed, search=SearchConfig())
        d["largest_fraction"] = lf.to_dict()
        table += (
            "\nempirically largest fractions along the plan (bisection; the worst-gap search "
            "under-estimates each gap, so these may overshoot; 1 = saturated):\n"
        )
        table += theory_tables.largest_table(d["largest_fraction"])
    print(json.dumps(d, indent=1) if args.json else table)
    return 0


def add_certify_parser(sub: Any) -> None:
    p = sub.add_parser("certify", help="deterministic bound on a pruned checkpoint's output gap")
    add_checkpoint_args(p)
    p.add_argument(
        "--radius", type=positive_float, default=1.0, help="input ball radius R (default 1)"
    )
    p.add_argument("--input-shape", type=ints, help="one sample's shape (needed for conv)")
    p.add_argument("--json", action="store_true", help="print the certificate as JSON")
    p.set_defaults(handler=run_certify)


def run_certify(args: argparse.Namespace) -> int:
    model = load_checkpoint(args)
    cert = certify(model.eval(), radius=args.radius, input_shape=args.input_shape)
    d = cert.to_dict()
    print(json.dumps(d, indent=1) if args.json else theory_tables.certificate_table(d))
    return 0


def add_verify_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help="Monte Carlo check of a plan on sampled networks")
    add_target_args(p)
    p.add_argument("--trials", type=pos_int, default=500, help="networks to sample (default 500)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--confidence", type=open_unit, default=0.95, help="of the CP upper limit")
    p.add_argument("--samples", type=pos_int, default=128, help="random inputs per network")
    p.add_argument("--restarts", type=pos_int, default=8, help="gradient-ascent restarts")
    p.add_argument("--steps", type=pos_int, default=40, help="gradient-ascent steps")
    p.add_argument("--certificates", action="store_true", help="also certify every network")
    add_largest_arg(p)
    p.add_argument("--out", default="runs/verify", help="directory for verify.json, gaps.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    search = SearchConfig(samples=args.samples, restarts=args.restarts, steps=args.steps)
    p = make_plan(args)
    out: dict[str, Any] = {"plan": p.to_dict()}
    if not args.quiet:
        print(theory_tables.plan_table(out["plan"]))
    with tqdm(total=args.trials, desc="verify", unit="net", disable=args.quiet) as bar:
        rep = verify(
            p, trials=args.trials, seed=args.seed, search=search, confidence=args.confidence,
            certificates=args.certificates, progress=lambda done, _: bar.update(done - bar.n),
        )  # fmt: skip
    out["verify"] = rep.to_dict()
    print(theory_tables.verify_summary(out["verify"]))
    if args.largest > 0:
        lf = largest_fraction(p, trials=args.largest, seed=args.seed, search=search)
        out["largest_fraction"] = lf.to_dict()
        print(theory_tables.largest_table(out["largest_fraction"]))
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "verify.json").write_text(json.dumps(out, indent=1))
    png = report.plot_gaps(out["verify"], d / "gaps.png")
    print(f"results: {d / 'verify.json'}, {png}")
    return 0


def add_data_certificate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "data-certificate",
        help="held-out-data bounds on how often a pruned checkpoint's output changes",
    )
    add_checkpoint_args(p)
    p.add_argument(
        "--reference",
        help="the dense checkpoint the pruning started from (needed after retraining; default: "
        "CHECKPOINT with its masks removed)",
    )
    add_data_args(p, default="digits")
    p.add_argument(
        "--eps",
        type=float_where(lambda v: v >= 0, "a number >= 0"),
        default=0.0,
        help="output-gap threshold (default 0)",
    )
    p.add_argument(
        "--confidence", type=open_unit, default=0.95, help="of each limit (default 0.95)"
    )
    p.add_argument("--json", action="store_true", help="print the certificate as JSON")
    p.set_defaults(handler=run_data_certificate)


def run_data_certificate(args: argparse.Namespace) -> int:
    """Certify on the data set's test split, which no pruning choice may have seen."""
    model = load_checkpoint(args).eval()
    reference = None
    if args.reference is not None:
        name, model_args = model_spec(Path(args.checkpoint), args.model, dict(args.model_arg))
        reference = build_model(name, **model_args).eval()
        load(reference, Path(args.reference))
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    data = data.image() if any(isinstance(m, CONV) for m in model.modules()) else data.flat()
    x, y = data.x_test, data.y_test
    cert = data_certificate(
        model, (x, y), args.eps, confidence=args.confidence, reference=reference
    )
    print(json.dumps(cert.to_dict(), indent=1) if args.json else str(cert))
    return 0
