"""What shrinking a pruned model is worth: parameters, MACs and measured latency, side by side.

`shrink_summary` shrinks a (structurally) pruned model, optionally writes it with
`save_shrunk`, and measures the masked and the shrunk model in one interleaved `measure_ms`
call on the same batch, so load on a shared machine hits both alike. A schedule with
`shrink = true` puts this dict into `results.json` under "shrink".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebound.coupling import baked_eval_copy
from prunebound.deploy.shrink import shrink
from prunebound.deploy.shrink_file import save_shrunk
from prunebound.timing import measure_ms

try:  # optional: the MAC counter of the `structured` extra (shrink needs it anyway)
    import torch_pruning as tp
except ImportError:  # pragma: no cover
    tp = None


def _macs(model: nn.Module, x: torch.Tensor) -> int | None:
    if tp is None:  # pragma: no cover
        return None
    macs, _ = tp.utils.count_ops_and_params(model, x[:1])
    return int(macs)


def shrink_summary(
    model: nn.Module, example_inputs: torch.Tensor, *, path: str | Path | None = None
) -> dict[str, Any]:
    """Shrink `model` (left untouched) and report both models on `example_inputs`.

    Returns a JSON-ready dict: "params", "macs" and "ms" (median wall time of one forward on the
    whole batch, no grad, eval mode) for "masked" and "shrunk", "speedup" (masked / shrunk ms),
    "params_ratio", "batch", "max_abs_diff" (shrunk vs masked outputs) and "file" when `path`.
    """
    small = shrink(model, example_inputs)
    if path is not None:
        save_shrunk(small, path)
    was = model.training
    model.eval()
    small.eval()
    try:
        with torch.no_grad():
            diff = float((small(example_inputs) - model(example_inputs)).abs().max())
            ms = measure_ms(
                {"masked": lambda: model(example_inputs), "shrunk": lambda: small(example_inputs)}
            )
            dense = baked_eval_copy(model)  # the counter does not see through parametrizations
            macs = {"masked": _macs(dense, example_inputs), "shrunk": _macs(small, example_inputs)}
    finally:
        model.train(was)
    params = {
        "masked": sum(p.numel() for p in model.parameters()),
        "shrunk": sum(p.numel() for p in small.parameters()),
    }
    out: dict[str, Any] = {
        "batch": int(example_inputs.shape[0]),
        "params": params,
        "params_ratio": params["masked"] / max(params["shrunk"], 1),
        "macs": macs,
        "ms": ms,
        "speedup": ms["masked"] / max(ms["shrunk"], 1e-9),
        "max_abs_diff": diff,
    }
    if path is not None:
        out["file"] = str(path)
    return out
