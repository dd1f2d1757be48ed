"""Masked inference: eval forward of a masked model (cached M*W) vs dense, uncached masks and
torch.nn.utils.prune, all timed in the same run.

Variants, each in eval mode under `torch.no_grad()`:
  dense       the model with the masks baked in (`pb.remove`), the floor;
  masked      `pb.prune`'s parametrized model: the masked weight is cached while autograd is off;
  uncached    the same parametrization recomputing `weight * mask` on every forward (the
              behaviour before the cache);
  torch_prune `torch.nn.utils.prune` float masks (a forward pre-hook multiplies every forward).
Models: a stack of Linear(4096, 4096) (3 layers) and LeNet-300-100, magnitude-pruned to 90%, at
batch 1 and 64. Calls are interleaved and repeated (medians), over several rounds whose
medians are reported with their spread. Ratios are against dense; the target is masked <= 1.1x.
JSON on stdout, progress on stderr.

    python benchmarks/masked_inference.py [--threads 2] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

import prunebound as pb
from prunebound.timing import machine_state, measure_ms


class UncachedMask(nn.Module):
    """The mask parametrization without the cache (prunebound before the fix)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """The four forms of one masked model (all in eval mode)."""
    keep = pb.masks(model)
    dense = pb.remove(copy.deepcopy(model)).eval()
    uncached = copy.deepcopy(dense)
    tp = copy.deepcopy(dense)
    for name, k in keep.items():
        parametrize.register_parametrization(
            uncached.get_submodule(name), "weight", UncachedMask(k), unsafe=True
        )
        torch_prune.custom_from_mask(tp.get_submodule(name), "weight", k)  # type: ignore[no-untyped-call]
    return {"dense": dense, "masked": model.eval(), "uncached": uncached, "torch_prune": tp}


def run_case(name: str, build: Any, width: int, batch: int, args: argparse.Namespace) -> dict:
    model = build()
    pb.prune(model, "magnitude", 0.9, scope="layer")
    forms = variants(model)
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
    rounds: dict[str, list[float]] = {k: [] for k in forms}
    with torch.no_grad():
        ref = forms["dense"](x)
        equal = {k: bool(torch.equal(m(x), ref)) for k, m in forms.items()}
        fns = {k: partial(m, x) for k, m in forms.items()}
        for _ in range(args.rounds):
            ms = measure_ms(fns, budget_s=args.budget_s, min_repeats=7, max_repeats=200)
            for k, v in ms.items():
                rounds[k].append(v)
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    row = {
        "model": name,
        "batch": batch,
        "ms": med,
        "ms_rounds": rounds,
        "ratio_vs_dense": {k: med[k] / med["dense"] for k in forms},
        "masked_vs_uncached": med["masked"] / med["uncached"],
        "masked_vs_torch_prune": med["masked"] / med["torch_prune"],
        "outputs_equal_dense": equal,
    }
    print(
        f"{name:>16} batch={batch:>3}: "
        + ", ".join(f"{k} {v:.3f} ms ({v / med['dense']:.2f}x)" for k, v in med.items())
        + f"; load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--width", type=int, default=4096, help="Linear stack width (default 4096)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (medians of medians)")
    p.add_argument("--budget-s", type=float, default=0.5, help="timing budget per round")
    p.add_argument("--quick", action="store_true", help="smoke test: width 512, one round")
    args = p.parse_args()
    if args.quick:
        args.width, args.rounds, args.budget_s = 512, 1, 0.1
    torch.set_num_threads(args.threads)
    models = {
        f"linear{args.width}x3": (
            lambda: pb.models.build_model("mlp", seed=0, widths=[args.width] * 4),
            args.width,
        ),
        "lenet_300_100": (lambda: pb.models.build_model("lenet_300_100", seed=0), 784),
    }
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results = [
        run_case(name, build, width, batch, args)
        for name, (build, width) in models.items()
        for batch in (1, 64)
    ]
    worst = max(r["ratio_vs_dense"]["masked"] for r in results)
    out = {
        "benchmark": "masked_inference",
        "target": "masked eval forward <= 1.1x dense",
        "worst_masked_vs_dense": worst,
        "check_ok": worst <= 1.1,
        **machine_state(args.threads, load_start),
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
