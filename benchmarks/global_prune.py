"""Global magnitude pruning at scale: prunebound vs torch.nn.utils.prune.global_unstructured.

6 x Linear(4096, 4096) (~100M weights, 403 MB), 90% global magnitude pruning. Each method runs in
its own fresh subprocess on an identically seeded model, so peak RSS is measured cleanly:
extra = peak RSS during pruning - RSS after building the model. Prints JSON.

    python benchmarks/global_prune.py [--layers 6] [--width 4096] [--amount 0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def build(layers: int, width: int):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)
    return model


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(which: str, layers: int, width: int, amount: float, out: str) -> None:
    import torch
    from torch.nn.utils import prune as tp

    import prunebound as pb

    model = build(layers, width)
    base = _rss_mb()
    t0 = time.perf_counter()
    if which == "torch":
        tp.global_unstructured(
            [(m, "weight") for m in model], pruning_method=tp.L1Unstructured, amount=amount
        )
        keep = [m.weight_mask.bool() for m in model]
    else:
        pb.prune(model, "magnitude", amount, scope="global")
        keep = list(pb.masks(model).values())
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(torch.stack(keep), out)  # our own file, for the equality check
    json.dump({"seconds": dt, "rss_before_mb": base, "peak_rss_mb": peak}, sys.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--amount", type=float, default=0.9)
    ap.add_argument("--child", choices=["torch", "prunebound"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.layers, args.width, args.amount, args.out)
        return

    import tempfile

    import torch

    res = {}
    with tempfile.TemporaryDirectory() as d:
        for which in ("prunebound", "torch"):
            out = os.path.join(d, f"{which}.pt")
            cmd = [
                sys.executable,
                __file__,
                "--child",
                which,
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
                "--amount",
                str(args.amount),
                "--out",
                out,
            ]
            res[which] = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            )
        a = torch.load(os.path.join(d, "prunebound.pt"), weights_only=True)
        b = torch.load(os.path.join(d, "torch.pt"), weights_only=True)
    n = args.layers * args.width * args.width
    model_mb = n * 4 / 2**20
    for r in res.values():
        r["extra_mb"] = r["peak_rss_mb"] - r["rss_before_mb"]
        r["extra_over_model"] = r["extra_mb"] / model_mb
    print(
        json.dumps(
            {
                "benchmark": "global_prune",
                "model": f"{args.layers} x Linear({args.width}, {args.width})",
                "params": n,
                "model_mb": round(model_mb, 1),
                "amount": args.amount,
                "threads": torch.get_num_threads(),
                "prunebound": res["prunebound"],
                "torch": res["torch"],
                "speedup": res["torch"]["seconds"] / res["prunebound"]["seconds"],
                "masks_differ": int((a != b).sum()),
                "same_count": int((~a).sum()) == int((~b).sum()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
