"""The export line of a run report: what the pruned model is worth where it runs.

`export_summary` exports a model (format "csr"), writes the export file, and measures its size
and its speed-up over the dense model; `training.experiment.run` adds it to `results.json`.
"""

from __future__ import annotations

import copy
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
from prunebound.timing import measure_ms


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
    `threads`, `kernels` {layer: kernel}; or {"exported": False, "reason": ...} if the model
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
    with torch.no_grad():
        ms = measure_ms({"dense": lambda: dense(x), "exported": lambda: exported(x)})
    report = export_report(exported)
    return {
        "exported": True,
        "bytes": size,
        "dense_bytes": dense_size,
        "size_ratio": size / dense_size,
        "batch_size": batch_size,
        "latency_ms": ms,
        "speedup": ms["dense"] / ms["exported"],
        "threads": report.threads,
        "kernels": {r.name: r.kernel for r in report.layers},
        "seconds": time.perf_counter() - t0,
    }
