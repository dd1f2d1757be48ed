"""Tables and summary lines from result dicts; their plots live in `prunebound.plots` (the
only module that imports matplotlib) and are re-exported here.

Every function takes the `to_dict()` of a result (a run's `results.json`, a `SparsityReport`, an
`ExportReport`, a theory `Plan` or `Certificate`, a `VerifyReport`), so that it needs no import
from the wings and the CLI only parses and prints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# the plots of these results (`report.plot_*` as before): explicit re-exports
from prunebound.plots import gaps_figure as gaps_figure
from prunebound.plots import layer_sparsity_figure as layer_sparsity_figure
from prunebound.plots import plot_accuracy_vs_sparsity as plot_accuracy_vs_sparsity
from prunebound.plots import plot_gaps as plot_gaps
from prunebound.plots import plot_layer_sparsity as plot_layer_sparsity
from prunebound.plots import plot_run as plot_run

ROUND_KEYS = ("round", "sparsity", "compression", "accuracy", "loss", "sparse_flops", "layers")
FINAL_KEYS = ("total", "zeros", "sparsity")
FINAL_LAYER_KEYS = ("name", "shape", "total", "zeros", "sparsity")


def load_results(directory: str | Path) -> dict[str, Any]:
    """Read and check `results.json` from a run directory.

    Raises FileNotFoundError if absent, ValueError (one line, naming the first missing or
    malformed key) if it is not a prunebound results file that `rounds_table`, `layers_table`
    and `plot_run` can use.
    """
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a prunebound results directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0]
        raise ValueError(f"{path} is not a prunebound results file: invalid JSON ({msg})") from None
    check_results(data, source=str(path))
    checked: dict[str, Any] = data
    return checked


def check_results(results: Any, *, source: str = "results") -> None:
    """Raise ValueError naming the first key a results dict lacks (or has of the wrong kind)."""

    def bad(key: str, problem: str = "is missing") -> ValueError:
        return ValueError(f"{source} is not a prunebound results file: key {key!r} {problem}")

    if not isinstance(results, Mapping):
        raise ValueError(f"{source} is not a prunebound results file: not a JSON object")
    config = results.get("config")
    if not isinstance(config, Mapping):
        raise bad("config", "is missing" if config is None else "is not an object")
    schedule = config.get("schedule")
    if not isinstance(schedule, Mapping):
        raise bad("config.schedule", "is missing" if schedule is None else "is not an object")
    for key in ("kind", "method"):
        if key not in schedule:
            raise bad(f"config.schedule.{key}")
    rounds = results.get("rounds")
    if not isinstance(rounds, list):
        raise bad("rounds", "is missing" if rounds is None else "is not a list")
    if not rounds:
        raise bad("rounds", "is empty")
    for i, r in enumerate(rounds):
        if not isinstance(r, Mapping):
            raise bad(f"rounds[{i}]", "is not an object")
        for key in ROUND_KEYS:
            if key not in r:
                raise bad(f"rounds[{i}].{key}")
        if not isinstance(r["layers"], Mapping):
            raise bad(f"rounds[{i}].layers", "is not an object")
    final = results.get("final_sparsity")
    if not final:
        return
    if not isinstance(final, Mapping):
        raise bad("final_sparsity", "is not an object")
    layers = final.get("layers", [])
    if not isinstance(layers, list):
        raise bad("final_sparsity.layers", "is not a list")
    for i, ls in enumerate(layers):
        for key in FINAL_LAYER_KEYS:
            if not isinstance(ls, Mapping) or key not in ls:
                raise bad(f"final_sparsity.layers[{i}].{key}")
    for key in FINAL_KEYS if layers else ():
        if key not in final:
            raise bad(f"final_sparsity.{key}")


PERCENT_WORDS = ("sparsity", "acc", "rate", "fraction")
#: `Round.target_of` when a schedule's target is the sparsity of all prunable weights
ALL_WEIGHTS = "weights of all prunable layers"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of `rows` (dicts), right-aligned, columns in first-row order.

    Floats in columns whose name contains sparsity/acc/rate/fraction print as percentages;
    other floats with 4 significant digits. Missing cells are blank.
    """
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(col: str, v: Any) -> str:
        if isinstance(v, float):
            if any(w in col for w in PERCENT_WORDS):
                return f"{100 * v:.1f}%"
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(c, r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def rounds_table(results: Mapping[str, Any]) -> str:
    """One row per round of a run: sparsity, compression, accuracy, loss, FLOPs."""
    keys = ("round", "sparsity", "compression", "accuracy", "loss")
    rows = [
        {**{k: r[k] for k in keys}, "MFLOPs": (r["sparse_flops"] or 0) / 1e6}
        for r in results["rounds"]
    ]
    what = {r.get("target_of") for r in results["rounds"]} - {None, ALL_WEIGHTS}
    if len(what) != 1:  # the target is on all prunable weights (or older results): as sparsity
        return format_table(rows)
    for row, r in zip(rows, results["rounds"], strict=True):
        row["target sparsity"], row["achieved sparsity"] = r["target"], r["achieved"]
    return f"{format_table(rows)}\ntarget / achieved: share of the {what.pop()} pruned"


def sparsity_table(sparsity: Mapping[str, Any], *, shapes: bool = True) -> str:
    """Per-layer sparsity and an "all" row from a `SparsityReport.to_dict()`."""
    rows: list[dict[str, Any]] = [
        {
            "layer": ls["name"],
            **({"shape": "x".join(str(n) for n in ls["shape"])} if shapes else {}),
            "total": ls["total"],
            "zeros": ls["zeros"],
            "sparsity": ls["sparsity"],
        }
        for ls in sparsity.get("layers", [])
    ]
    if rows:
        rows.append(
            {
                "layer": "all",
                **({"shape": ""} if shapes else {}),
                "total": sparsity["total"],
                "zeros": sparsity["zeros"],
                "sparsity": sparsity["sparsity"],
            }
        )
    return format_table(rows)


def layers_table(results: Mapping[str, Any]) -> str:
    """Per-layer sparsity of the final model (results.json "final_sparsity")."""
    return sparsity_table(results.get("final_sparsity") or {})


def round_line(r: Mapping[str, Any]) -> str:
    """One line of a run's progress: a `Round.to_dict()`."""
    line = (
        f"round {r['round']}: sparsity {r['sparsity']:6.1%}  "
        f"accuracy {r['accuracy']:6.1%}  loss {r['loss']:.3f}"
    )
    if r.get("target_of") and r["target_of"] != ALL_WEIGHTS:
        line += f"  ({r['achieved']:.1%} of the {r['target_of']}; target {r['target']:.1%})"
    return line


def comparison_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per run ({label: results}): dense and final accuracy, sparsity, time."""
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
    return format_table(rows)


def demo_summary(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The demo's verdict: magnitude against random pruning (the control) at the final round."""
    mag, rnd = runs["magnitude"]["rounds"][-1], runs["random"]["rounds"][-1]
    return (
        f"summary: at {mag['sparsity']:.1%} sparsity magnitude pruning keeps "
        f"{mag['accuracy']:.1%} test accuracy, random pruning (the control) {rnd['accuracy']:.1%} "
        f"(dense {runs['magnitude']['rounds'][0]['accuracy']:.1%})"
    )


def run_notes(results: Mapping[str, Any]) -> list[str]:
    """The distributed and export lines of a run's results (none if it has neither)."""
    lines = []
    if "distributed" in results:
        dd = results["distributed"]
        lines.append(
            f"distributed: {dd['world_size']} ranks ({dd['backend']}), largest difference "
            f"between the ranks' final models {dd['max_rank_divergence']:.3g}"
        )
    ex = results.get("export", {})
    if ex.get("bytes"):
        lines.append(
            f"export (csr): {ex['bytes'] / 1024:.0f} KiB on disk ({100 * ex['size_ratio']:.1f}% of "
            f"dense), {ex['speedup']:.2f}x faster at batch 1 than dense (measured)"
            + (f"; FLAGGED: {ex['speedup_flag']}" if ex.get("speedup_flag") else "")
        )
    return lines


def export_table(export: Mapping[str, Any]) -> str:
    """What each layer became in an export, and why: an `ExportReport.to_dict()`."""
    rows = [
        {
            "layer": r["name"],
            **{k: r[k] for k in ("type", "sparsity", "kernel")},
            "speedup": "" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            "reason": r["reason"],
        }
        for r in export["layers"]
    ]
    return format_table(rows)
