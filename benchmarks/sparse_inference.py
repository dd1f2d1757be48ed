"""Sparse inference: dense vs `pb.export(model, "csr")` latency at 80/90/95/98% sparsity.

Models: a stack of Linear(4096, 4096) layers, LeNet-300-100 (784 inputs) and a VGG-style conv
net (prunebound.models.vgg_small on 1x28x28), each magnitude-pruned per layer to the sparsity,
at batch 1 and 64, dense and exported timed in the same run (calls interleaved, median of
repeats). Reported per case: latencies, speed-up, the FLOP-limit speed-up 1 / (1 - sparsity)
and the fraction of it reached, the kernel each layer got (with every candidate's timing), and
the export file size against the dense safetensors file. The machine is shared, so the load
average is recorded before and after. JSON on stdout, progress on stderr.

    python benchmarks/sparse_inference.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

import prunebound as pb
from prunebound.deploy.export import export, export_report
from prunebound.deploy.export_file import save_export
from prunebound.timing import machine_state, measure_ms


def linear_stack(width: int, depth: int) -> nn.Sequential:
    """`depth` Linear(width, width) layers with ReLU between."""
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width, width))
    return nn.Sequential(*layers)


def file_sizes(dense: nn.Module, exported: nn.Module, tmp: Path) -> dict[str, int]:
    """Bytes of the dense safetensors file and of the export file."""
    safetensors.torch.save_file(
        {k: t.contiguous() for k, t in dense.state_dict().items()}, tmp / "dense.safetensors"
    )
    save_export(exported, tmp / "export.safetensors")
    return {
        "dense_bytes": (tmp / "dense.safetensors").stat().st_size,
        "export_bytes": (tmp / "export.safetensors").stat().st_size,
    }


def run_case(
    name: str,
    build: Any,
    input_shape: tuple[int, ...],
    sparsity: float,
    batches: list[int],
    budget_s: float,
) -> list[dict[str, Any]]:
    """Prune one model to `sparsity`, export it per batch size, and time dense vs exported."""
    model = build()
    pb.prune(model, "magnitude", sparsity, scope="layer")
    dense = pb.remove(copy.deepcopy(model)).eval()
    rows = []
    for batch in batches:
        t0 = time.perf_counter()
        exported = export(model, "csr", batch_size=batch, input_shape=input_shape)
        export_s = time.perf_counter() - t0
        x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref, out = dense(x), exported(x)
            max_err = float((ref - out).abs().max())
            fns = {"dense": partial(dense, x), "exported": partial(exported, x)}
            kw: dict[str, Any] = {"budget_s": budget_s, "min_repeats": 7, "max_repeats": 50}
            ms = measure_ms(fns, **kw)
            best = measure_ms(fns, **kw, statistic="min")
        with tempfile.TemporaryDirectory() as tmp:
            sizes = file_sizes(dense, exported, Path(tmp))
        report = export_report(exported)
        speedup = ms["dense"] / ms["exported"]
        limit = 1.0 / (1.0 - sparsity)
        row = {
            "model": name,
            "sparsity": sparsity,
            "batch": batch,
            "dense_ms": ms["dense"],
            "exported_ms": ms["exported"],
            "speedup": speedup,
            "dense_min_ms": best["dense"],
            "exported_min_ms": best["exported"],
            "speedup_of_min": best["dense"] / best["exported"],
            "sparse_chosen": bool(report.sparse_layers),
            "flop_limit": limit,
            "fraction_of_limit": speedup / limit,
            "allclose": bool(torch.allclose(ref, out, rtol=1e-4, atol=1e-5)),
            "max_abs_err": max_err,
            "export_seconds": export_s,
            **sizes,
            "size_ratio": sizes["export_bytes"] / sizes["dense_bytes"],
            "layers": [
                {
                    "name": r.name,
                    "shape": list(r.shape),
                    "sparsity": r.sparsity,
                    "kernel": r.kernel,
                    "speedup": r.speedup,
                    "timings_ms": dict(r.timings_ms),
                }
                for r in report.layers
            ],
        }
        print(
            f"{name:>14} s={sparsity:.2f} batch={batch:>3}: dense {ms['dense']:8.3f} ms, "
            f"exported {ms['exported']:8.3f} ms, {speedup:5.2f}x of {limit:4.0f}x "
            f"({speedup / limit:4.0%}); kernels {[r.kernel for r in report.layers]}; "
            f"load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--width", type=int, default=4096, help="Linear stack width (default 4096)")
    p.add_argument("--depth", type=int, default=3, help="Linear stack depth (default 3)")
    p.add_argument("--budget-s", type=float, default=1.0, help="timing budget per case")
    p.add_argument("--quick", action="store_true", help="smoke test: small, one sparsity")
    args = p.parse_args()
    if args.quick:
        args.sparsities, args.width, args.depth, args.budget_s = [0.95], 1024, 2, 0.2
    torch.set_num_threads(args.threads)
    models = {
        f"linear{args.width}x{args.depth}": (
            lambda: pb.models.build_model("mlp", seed=0, widths=[args.width] * (args.depth + 1)),
            (args.width,),
        ),
        "lenet_300_100": (lambda: pb.models.build_model("lenet_300_100", seed=0), (784,)),
        "vgg_small": (lambda: pb.models.build_model("vgg_small", seed=0), (1, 28, 28)),
    }
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for name, (build, shape) in models.items():
        for s in args.sparsities:
            results += run_case(name, build, shape, s, args.batches, args.budget_s)
    chosen = [r["speedup"] for r in results if r["sparse_chosen"]]
    out = {
        "benchmark": "sparse_inference",
        # where the chooser picked a sparse layer, the exported model should not be slower
        "check_min_speedup_where_sparse": min(chosen, default=None),
        "check_ok": all(v >= 0.9 for v in chosen),
        **machine_state(args.threads, load_start),
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
