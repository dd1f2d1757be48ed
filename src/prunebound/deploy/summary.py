"""The export line of a run report: what the pruned model is worth where it runs.

`export_summary` exports a model (format "csr"), writes the export file, and measures its size
and its speed-up over the dense model; `training.experiment.run` adds it to `results.json`.
The speed-up is the ratio of medians over several interleaved rounds (more while they disagree);
one above the FLOP limit (dense / nonzero multiply-adds of the Linear/Conv layers) cannot be
real, so it is re-measured and, if it persists, flagged (`speedup_flag`).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from prunebound._files import tied_keys, unshared
from prunebound._masks import remove
from prunebound.deploy.export import export, export_report
from prunebound.deploy.export_file import save_export
from prunebound.sparsity_stats import sparsity
from prunebound.timing import measure_rounds

logger = logging.getLogger(__name__)


def export_summary(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    path: str | Path | None = None,
) -> dict[str, Any]:
    """Export `model` (format "csr"), and measure the file size and the speed-up it gives.

    For a run report. Writes the export to `path` (a temporary file if None). Returns a dict:
    `bytes` (export file), `dense_bytes` (safetensors of the dense weights), `size_ratio`,
    `latency_ms` {"dense", "exported"} at `batch_size` (medians, interleaved), `speedup`,
    `flop_limit`, `speedup_flag` (None, or why the speed-up cannot be trusted), `threads`,
    `kernels` {layer: kernel}; or {"exported": False, "reason": ...} if the model
    cannot be exported (not pruned).
    """
    try:
        exported = export(model, "csr", batch_size=batch_size, input_shape=input_shape)
    except ValueError as e:
        return {"exported": False, "reason": str(e)}
    dense = remove(copy.deepcopy(model)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(path) if path is not None else Path(tmp) / "export.safetensors"
        save_export(exported, target)
        dense_file = Path(tmp) / "dense.safetensors"
        live = dense.state_dict(keep_vars=True)
        tied = tied_keys(live)  # stored once, as in the export
        safetensors.torch.save_file(
            unshared({k: t for k, t in live.items() if k not in tied}), dense_file
        )
        size, dense_size = target.stat().st_size, dense_file.stat().st_size
    p = next(dense.parameters())
    x = torch.randn(
        (batch_size, *input_shape), generator=torch.Generator().manual_seed(0), dtype=p.dtype
    )
    t0 = time.perf_counter()
    flops = sparsity(model, input_shape)
    limit = (flops.dense_flops or 0) / flops.sparse_flops if flops.sparse_flops else math.inf
    fns = {"dense": lambda: dense(x), "exported": lambda: exported(x)}
    with torch.no_grad():
        ms = measure_rounds(fns)
        if ms["dense"] / ms["exported"] > limit:  # not possible: load hit the dense runs
            ms = measure_rounds(fns, rounds=5)
    speedup = ms["dense"] / ms["exported"]
    flag = None
    if speedup > limit:
        flag = f"measured {speedup:.3g}x exceeds the FLOP limit {limit:.3g}x: a timing artefact"
        logger.warning("export summary: %s", flag)
    report = export_report(exported)
    return {
        "exported": True,
        "bytes": size,
        "dense_bytes": dense_size,
        "size_ratio": size / dense_size,
        "batch_size": batch_size,
        "latency_ms": dict(ms),
        "latency_rounds_ms": ms.rounds,
        "speedup": speedup,
        "flop_limit": limit,
        "speedup_flag": flag,
        "threads": report.threads,
        "kernels": {r.name: r.kernel for r in report.layers},
        "seconds": time.perf_counter() - t0,
    }
