"""Structured pruning that shrinks: prunebound's coupled filter prune + `shrink` vs Torch-Pruning.

For vgg_small (BatchNorm), resnet_small and LeNet-5 on 28x28 inputs, at each channel ratio:
the dense model, prunebound's masked model (`prune(..., "filter", r, coupled=True)` then
`"neuron"` on LeNet's hidden Linear layers), its `shrink`, and Torch-Pruning's
`MagnitudePruner` (L2 group magnitude, same ratio, output layer ignored). Parameters, MACs
(Torch-Pruning's counter), latency at batch 64 (and batch 1) with 2 threads, eval mode, no
grad, all four timed interleaved in one `measure_ms` call (minimum over repeats: on a shared
machine interference only adds time), and ratios against the dense model
measured in the same run. `max_abs_diff`: shrunk vs masked outputs. Untrained weights with
randomised BatchNorm statistics (speed does not depend on training). Prints JSON.

    python benchmarks/structured.py [--ratios 0.3,0.5,0.7] [--budget 2.0]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os

import torch
import torch_pruning as tp
from torch import nn

import prunebound as pb
from prunebound.timing import measure_ms


def _stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        model.train()
        model(x)
    return model.eval()


def _tp_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    out = copy.deepcopy(model)
    head = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        out, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[head],
    )  # fmt: skip
    pruner.step()
    return out


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    macs, _ = tp.utils.count_ops_and_params(model, x)
    return int(macs)


def _row(name: str, dense: nn.Module, ratio: float, budget: float) -> dict[str, object]:
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    dense = _stats(dense, x)
    masked = copy.deepcopy(dense)
    pb.prune(masked, "filter", ratio, coupled=True, example_inputs=x)
    if name == "lenet5":
        pb.prune(masked, "neuron", ratio, coupled=True, example_inputs=x)
    shrunk = pb.shrink(masked, x)
    tpm = _tp_prune(dense, x, ratio)
    models = {"dense": dense, "masked": masked, "shrunk": shrunk, "torch_pruning": tpm}
    out: dict[str, object] = {"model": name, "ratio": ratio}
    with torch.no_grad():
        out["max_abs_diff"] = float((shrunk(x) - masked(x)).abs().max())
        for batch in (64, 1):
            xb = x[:batch]
            ms = measure_ms(
                {k: (lambda m=m, xb=xb: m(xb)) for k, m in models.items()},
                budget_s=budget,
                max_repeats=200,
                statistic="min",  # on a shared machine interference only adds time
            )
            out[f"ms_b{batch}"] = {k: round(v, 4) for k, v in ms.items()}
            out[f"speedup_b{batch}"] = {k: round(ms["dense"] / v, 3) for k, v in ms.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    out["params"] = params
    out["params_ratio"] = {k: round(params["dense"] / v, 3) for k, v in params.items()}
    out["macs"] = {k: _macs(m, x[:1]) for k, m in models.items() if k != "masked"}
    out["macs"]["masked"] = out["macs"]["dense"]  # type: ignore[index]  # masks skip nothing
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    builders = {
        "vgg_small": lambda: pb.models.vgg_small(batch_norm=True),
        "resnet_small": pb.models.resnet_small,
        "lenet5": pb.models.lenet5,
    }
    rows = [
        _row(name, build(), float(r), args.budget)
        for name, build in builders.items()
        for r in args.ratios.split(",")
    ]
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "torch": torch.__version__,
                "torch_pruning": tp.__version__,
                "threads": 2,
                "loadavg": os.getloadavg(),
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
