"""Structured pruning that shrinks: prunebound's coupled filter prune + `shrink` vs Torch-Pruning.

For vgg_small (BatchNorm), resnet_small and LeNet-5 on 28x28 inputs, at each channel ratio:
the dense model, prunebound's masked model (`prune(..., "filter", r, coupled=True)` then
`"neuron"` on LeNet's hidden Linear layers), its `shrink`, and Torch-Pruning's
`MagnitudePruner` (L2 group magnitude, same ratio, output layer ignored). Parameters, MACs
(Torch-Pruning's counter), latency at batch 64 (and batch 1) with 2 threads, eval mode, no
grad, all four timed interleaved in one `measure_ms` call (minimum over repeats: on a shared
machine interference only adds time), and ratios against the dense model
measured in the same run. `max_abs_diff`: shrunk vs masked outputs. Untrained weights with
randomised BatchNorm statistics (speed does not depend on training).

GPT-2 rows: a 4-layer Hugging Face `GPT2Model` config (no download), `prune(..., "head", r)` on
every attention block and `"neuron"` at the same ratio on every MLP `c_fc`, then `shrink`
(heads and MLP neurons removed, `num_heads`/`split_size` updated); batch 1 and 64 of 32 tokens.
Torch-Pruning is tried on the same model; where it cannot trace it, the row says why.

`--accuracy`: Fashion-MNIST accuracy after the same retraining, over several seeds. For each
seed, vgg_small (BN) and resnet_small are trained dense, then at each ratio pruned one-shot by
prunebound and by Torch-Pruning's `MagnitudePruner` (L2). prunebound's columns (`--criteria`):
the coupled group norm `filter_group` (Torch-Pruning's criterion: the same channels), the same
followed by `pb.refit` towards the dense model on `--calib` training images, and optionally
that refit on the convs only, the row norms `filter`/`filter_l1` and the group Taylor
`filter_taylor`; `--models` picks vgg_small and/or resnet_small. prunebound removes
from every coupled group exactly the channels Torch-Pruning removes (it keeps int(n(1 - r));
prunebound's plain amount removes round(r n)): equal parameter counts. The prunebound models
are shrunk, then all are retrained with the same `TrainConfig` and seed (retraining the shrunk
model equals retraining the masked one: pruned units get no gradient). Per-seed rows go to
stderr as they finish; stdout gets JSON with a summary (mean, std over seeds of the accuracy
one-shot and after retraining; wins = seeds where the column >= Torch-Pruning).

    python benchmarks/structured.py [--ratios 0.3,0.5,0.7] [--budget 2.0]
    python benchmarks/structured.py --accuracy [--epochs 3 --retrain-epochs 2 --seeds 0,1,2]
        [--threads 1 --criteria prunebound_group,prunebound_group_refit,torch_pruning]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch
import torch_pruning as tp
from torch import nn

import prunebound as pb
from prunebound.coupled_prune import prune_coupled
from prunebound.coupling import unit_groups
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


def _gpt2() -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=8, n_positions=128)
    return transformers.GPT2Model(cfg).eval()


def _tp_gpt2(model: nn.Module, ids: torch.Tensor, ratio: float) -> nn.Module:
    out = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        out, ids, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        num_heads={b.attn.c_attn: b.attn.num_heads for b in out.h}, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=ratio, ignored_layers=[out.wte, out.wpe],
        output_transform=lambda o: o[0],
    )  # fmt: skip
    pruner.step()
    return out


def _gpt2_row(ratio: float, budget: float) -> dict[str, object]:
    torch.manual_seed(0)
    dense = _gpt2()
    ids = torch.randint(0, dense.config.vocab_size, (64, 32), generator=torch.Generator())
    masked = copy.deepcopy(dense)
    pb.prune(masked, "head", ratio)
    pb.prune(masked, "neuron", ratio, layers=["*mlp.c_fc"])
    shrunk = pb.shrink(masked, ids)
    models = {"dense": dense, "masked": masked, "shrunk": shrunk}
    out: dict[str, object] = {"model": "gpt2 (4 layers, 256 wide, 8 heads)", "ratio": ratio}
    try:
        models["torch_pruning"] = _tp_gpt2(dense, ids[:2], ratio)
    except Exception as e:  # the peer's limits are a result, not a crash
        out["torch_pruning_error"] = f"{type(e).__name__}: {e}"
    out["heads"] = {k: sum(b.attn.num_heads for b in m.h) for k, m in models.items()}
    out["mlp"] = {k: sum(b.mlp.c_fc.nf for b in m.h) for k, m in models.items()}
    with torch.no_grad():
        out["max_abs_diff"] = float(
            (shrunk(ids).last_hidden_state - masked(ids).last_hidden_state).abs().max()
        )
        for batch in (64, 1):
            xb = ids[:batch]
            ms = measure_ms(
                {k: (lambda m=m, xb=xb: m(xb)) for k, m in models.items()},
                budget_s=budget, max_repeats=200, statistic="min",
            )  # fmt: skip
            out[f"ms_b{batch}"] = {k: round(v, 4) for k, v in ms.items()}
            out[f"speedup_b{batch}"] = {k: round(ms["dense"] / v, 3) for k, v in ms.items()}
    params = {k: sum(p.numel() for p in m.h.parameters()) for k, m in models.items()}
    out["block_params"] = params  # the embeddings (12.9 M) are not pruned
    out["params_ratio"] = {k: round(params["dense"] / v, 3) for k, v in params.items()}
    return out


def _tp_counts(model: nn.Module, x: torch.Tensor, ratio: float) -> dict[str, int]:
    """Channels Torch-Pruning removes from each coupled conv group (keyed by a producer): it
    keeps int(n * (1 - ratio)) of a group of n; prunebound's `amount` removes round(ratio * n)."""
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    groups = [g for g in unit_groups(model, x) if set(g.producers) <= convs]
    return {min(g.producers): g.size - int(g.size * (1 - ratio)) for g in groups}


#: accuracy columns: prunebound's coupled filter criteria (with "+refit": `pb.refit` towards the
#: dense model on the calibration images before retraining), then Torch-Pruning's magnitude pruner
CRITERIA = {"prunebound_l2": "filter", "prunebound_l1": "filter_l1",
            "prunebound_taylor": "filter_taylor", "prunebound_group": "filter_group",
            "prunebound_group_refit": "filter_group+refit",
            "prunebound_group_refit_convs": "filter_group+refit_convs",
            "torch_pruning": None}  # fmt: skip
DEFAULT = ("prunebound_group", "prunebound_group_refit", "torch_pruning")
MODELS = {"vgg_small": lambda: pb.models.vgg_small(batch_norm=True),
          "resnet_small": pb.models.resnet_small}  # fmt: skip


def _pruned(
    dense: nn.Module, label: str, ratio: float, x: torch.Tensor, calib: tuple[torch.Tensor, ...]
) -> nn.Module:
    """The shrunk (or Torch-Pruning-pruned) model of one column."""
    net = copy.deepcopy(dense).eval()
    spec = CRITERIA[label]
    if spec is None:
        return _tp_prune(net, x, ratio)
    name, _, then = spec.partition("+")
    # as pb.prune(net, name, ratio, coupled=True, ...), with Torch-Pruning's count per group
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    prune_coupled(
        net, pb.methods.get_method(name), ratio, convs, scope="layer", seed=0, example_inputs=x,
        data=calib, counts=_tp_counts(dense, x, ratio),
    )  # fmt: skip
    if then.startswith("refit"):  # refit_convs: the convs only, the output layer left as is
        pb.refit(net, dense, calib[0], layers=list(convs) if then == "refit_convs" else None)
    return pb.shrink(net, x)


def _accuracy_rows(
    ratios: list[float],
    epochs: int,
    retrain: int,
    seeds: list[int],
    calib_n: int,
    labels: list[str],
    models: list[str],
) -> list[dict[str, object]]:
    data = pb.data.load_fashion_mnist()
    cfg = pb.TrainConfig(epochs=epochs, batch_size=128, lr=1e-3)
    again = pb.TrainConfig(epochs=retrain, batch_size=128, lr=5e-4, lr_schedule="cosine")
    x = data.x_train[:256]
    rows: list[dict[str, object]] = []
    for seed in seeds:
        pick = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
        calib = (data.x_train[pick[:calib_n]], data.y_train[pick[:calib_n]])
        for name, build in MODELS.items():
            if name not in models:
                continue
            torch.manual_seed(seed)
            dense = build()
            pb.train(dense, data, cfg, seed=seed)
            dense.eval()
            acc0 = pb.evaluate(dense, data).accuracy
            for ratio in ratios:
                row: dict[str, object] = {
                    "model": name,
                    "ratio": ratio,
                    "seed": seed,
                    "dense_acc": acc0,
                    "dense_params": _params(dense),
                }
                for label in labels:
                    small = _pruned(dense, label, ratio, x, calib)
                    before = pb.evaluate(small, data).accuracy
                    # shrunk, then retrained: the same as retraining the masked model (pruned
                    # units get zero gradients and stay zero), at the small model's cost
                    pb.train(small, data, again, seed=seed + 1)
                    small.eval()
                    row[label] = {
                        "acc_oneshot": before,
                        "params": _params(small),
                        "acc_retrained": pb.evaluate(small, data).accuracy,
                    }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _summary(rows: list[dict[str, object]], labels: list[str]) -> list[dict[str, object]]:
    """Mean and standard deviation over seeds of each (model, ratio): accuracies after
    retraining, parameter counts, and in how many seeds each prunebound column >= Torch-Pruning."""
    out = []
    for key in dict.fromkeys((r["model"], r["ratio"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["ratio"]) == key]
        acc = {lab: torch.tensor([r[lab]["acc_retrained"] for r in sel]) for lab in labels}  # type: ignore[index]
        once = {lab: torch.tensor([r[lab]["acc_oneshot"] for r in sel]) for lab in labels}  # type: ignore[index]
        dense = torch.tensor([r["dense_acc"] for r in sel])
        item: dict[str, object] = {
            "model": key[0],
            "ratio": key[1],
            "seeds": len(sel),
            "dense": _ms(dense),
            "dense_params": sel[0]["dense_params"],
        }
        for lab in labels:
            params = sorted({r[lab]["params"] for r in sel})  # type: ignore[index]
            item[lab] = {"acc": _ms(acc[lab]), "oneshot": _ms(once[lab]), "params": params}
            if lab != "torch_pruning" and "torch_pruning" in acc:
                diff = acc[lab] - acc["torch_pruning"]
                item[lab]["minus_tp"] = _ms(diff)  # type: ignore[index]
                item[lab]["wins"] = int((diff >= 0).sum())  # type: ignore[index]
        out.append(item)
    return out


def _ms(t: torch.Tensor) -> list[float]:
    std = float(t.double().std()) if t.numel() > 1 else 0.0
    return [round(float(t.double().mean()), 5), round(std, 5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size")
    ap.add_argument("--accuracy", action="store_true", help="Fashion-MNIST retraining instead")
    ap.add_argument("--epochs", type=int, default=3, help="dense training epochs (--accuracy)")
    ap.add_argument("--retrain-epochs", type=int, default=2, help="retraining epochs (--accuracy)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (--accuracy)")
    ap.add_argument("--calib", type=int, default=1024, help="calibration examples (taylor)")
    ap.add_argument(
        "--criteria", default=",".join(DEFAULT), help=f"columns (--accuracy): {list(CRITERIA)}"
    )
    ap.add_argument("--models", default=",".join(MODELS), help="models (--accuracy)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.accuracy:
        labels = args.criteria.split(",")
        if bad := sorted(set(labels) - set(CRITERIA)):
            ap.error(f"unknown criteria {bad}; choose from {list(CRITERIA)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        models = args.models.split(",")
        if bad := sorted(set(models) - set(MODELS)):
            ap.error(f"unknown models {bad}; choose from {list(MODELS)}")
        rows = _accuracy_rows(
            ratios, args.epochs, args.retrain_epochs, seeds, args.calib, labels, models
        )
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "torch_pruning": tp.__version__, "epochs": args.epochs,
                "retrain_epochs": args.retrain_epochs, "seeds": seeds, "calib": args.calib,
                "threads": args.threads, "command": " ".join(sys.argv)}  # fmt: skip
        summary = _summary(rows, labels)
        print(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1))
        return
    builders = {
        "vgg_small": lambda: pb.models.vgg_small(batch_norm=True),
        "resnet_small": pb.models.resnet_small,
        "lenet5": pb.models.lenet5,
    }
    rows = [_row(name, build(), r, args.budget) for name, build in builders.items() for r in ratios]
    rows += [_gpt2_row(r, args.budget) for r in ratios]
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
