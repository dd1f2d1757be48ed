"""Tables of the theory's results for the CLI: plans, certificates, Monte Carlo checks.

Plain text from the `to_dict()` of `theory.Plan`, `theory.Certificate`,
`check.VerifyReport` and `check.LargestFraction` (no matplotlib: plots live in `report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prunebound.report import format_table


def _g(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def plan_table(plan: Mapping[str, Any]) -> str:
    """A theory plan per layer, with the guarantee it carries: a `Plan.to_dict()`."""
    rows = [
        {
            "layer": lp["name"],
            "shape": "x".join(str(n) for n in spec["shape"]),
            "weights": math.prod(spec["shape"]),
            "prune": lp["count"],
            "fraction": lp["fraction"],
            "threshold": _g(lp["threshold"]),
            "eps share": lp["eps_share"],
            "||Delta|| <=": _g(lp["norm_delta"]),
        }
        for lp, spec in zip(plan["layers"], plan["specs"], strict=True)
    ]
    p, kind = plan, plan.get("guarantee", "prior")
    sup = f"sup_{{||x||<={p['radius']:g}}} ||f(x) - F(x)|| <= eps = {p['eps']:.4g}"
    masks = " and masks" if p["method"] == "random" else ""
    guarantee = {
        "prior": f"with probability >= {1 - p['delta']:.4g} over the weights{masks}, {sup}",
        "trained": f"for these trained weights, {sup}"
        + (f", with probability >= {1 - p['delta']:.4g} over the mask" if masks else ""),
        "sampled": f"with confidence {p.get('confidence')} over the certification samples, "
        f"P_weights{masks}({sup.replace(' <= ', ' > ')}) <= delta = {p['delta']:.4g}",
        "data": f"with confidence {p.get('confidence')} over the held-out sample, "
        f"P_x(||f(x) - F(x)|| > eps = {p['eps']:.4g}) <= {p.get('max_gap_rate')}",
    }[kind]
    pruned = sum(lp["count"] for lp in p["layers"])
    scale = (
        f"output scale r_L = {p['output_scale']:.4g} (bound on sup ||F(x)||); "
        f"eps / r_L = {p['eps'] / p['output_scale']:.4g}; "
        if p["output_scale"] > 0
        else ""
    )
    lines = [
        format_table(rows),
        f"guarantee ({kind}): {guarantee}",
        f"{scale}pruned {pruned} {'neurons' if p['method'] == 'neuron' else 'weights'}",
    ]
    return "\n".join(lines + [f"note: {n}" for n in p["notes"]])


def largest_table(largest: Mapping[str, Any]) -> str:
    """Planned against empirically largest fractions per layer: a `LargestFraction.to_dict()`."""
    lf = largest
    rows = [
        {"layer": n, "planned": a, "empirical": b, "ratio": "" if r is None else f"{r:.3g}"}
        for n, a, b, r in zip(
            lf["layers"], lf["planned"], lf["empirical"], lf["ratio"], strict=True
        )
    ]
    return format_table(rows)


def certificate_table(cert: Mapping[str, Any]) -> str:
    """A certificate's per-layer terms, its bound and its assumptions: `Certificate.to_dict()`."""
    rows = [
        {
            "layer": t["name"],
            "pruned": f"{t['pruned']}/{t['total']}",
            "||W||": t["norm_w"],
            "||W~||": t["norm_kept"],
            "||Delta||": t["norm_delta"],
            "r_in": t["r_in"],
            "contribution": t["contribution"],
        }
        for t in cert["layers"]
    ]
    bound = (
        f"sup_{{||x||<={cert['radius']:g}}} ||f(x) - F(x)|| <= {cert['bound']:.5g} "
        f"({cert['method']}); output scale r_L = {cert['output_scale']:.5g}, "
        f"relative {cert['relative']:.4g}"
    )
    lines = [format_table(rows), bound]
    if cert.get("vacuous"):
        lines.append(
            "VACUOUS: the bound is no better than the trivial bound on the unpruned output "
            f"(sup ||F(x)|| <= {cert['output_scale']:.5g})"
        )
    return "\n".join([*lines, cert["assumptions"], *(f"note: {n}" for n in cert.get("notes", ()))])


def verify_summary(rep: Mapping[str, Any]) -> str:
    """What a Monte Carlo check found: a `VerifyReport.to_dict()`."""
    lines = [
        f"{rep['violations']}/{rep['trials']} violations (gap > eps = {rep['eps']:.4g}); rate "
        f"{rep['rate']:.3g} <= {rep['rate_upper']:.3g} (Clopper-Pearson, "
        f"{rep['confidence']:.0%}); {'PASS' if rep['passed'] else 'FAIL'} vs delta = "
        f"{rep['delta']:g}",
        f"{1 - rep['delta']:.0%} quantile of the worst-gap estimate {rep['gap_quantile']:.4g}, "
        f"tightness {rep['tightness']:.3g}; eps / r_L = {rep['relative_eps']:.4g} "
        "(gap estimates are lower bounds on each network's sup)",
    ]
    if rep["certified"] is not None:
        lines.append(f"certified (certificate <= eps): {rep['certified']}/{rep['trials']} networks")
    return "\n".join(lines)
