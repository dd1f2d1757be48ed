"""Global magnitude pruning of a GPT-2-small-sized model: prunebound vs torch.nn.utils.prune.

GPT2LMHeadModel built from a config (n_layer=12, n_embd=768, vocab 50257: ~124M parameters, no
download). Both prune the same layers: the 48 transposed-linear `Conv1D` weights of the blocks
(~85M weights); the embeddings and the LM head tied to them are left alone (prunebound's
default). Each method runs in its own fresh subprocess on an identically seeded model, so peak
RSS is clean: extra = peak RSS during the prune (VmHWM reset just before) - RSS before it.
The machine may be shared: the load average is recorded before and after. Prints JSON.

    python benchmarks/hf_prune.py [--amount 0.9] [--n-layer 12] [--n-embd 768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def child(which: str, n_layer: int, n_embd: int, amount: float, out: str) -> None:
    import torch
    import transformers
    from torch.nn.utils import prune as tp

    import prunebound as pb

    torch.manual_seed(0)  # benchmark script, not library code: same weights in both children
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64))
    model = transformers.GPT2LMHeadModel(cfg).eval()
    layers = pb.prunable_layers(model)
    types = sorted({type(m).__name__ for m in layers.values()})
    base = _status_mb("VmRSS")
    clean_peak = _reset_peak()
    t0 = time.perf_counter()
    if which == "torch":
        tp.global_unstructured(
            [(m, "weight") for m in layers.values()],
            pruning_method=tp.L1Unstructured,
            amount=amount,
        )
        keep = [m.weight_mask.bool() for m in layers.values()]
    else:
        pb.prune(model, "magnitude", amount, scope="global")
        keep = list(pb.masks(model).values())
    dt = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    flat = torch.cat([k.flatten() for k in keep])
    torch.save(flat, out)  # our own file, for the agreement check
    res = {
        "seconds": dt,
        "rss_before_mb": base,
        "peak_rss_mb": peak,
        "peak_reset": clean_peak,
        "model_params": sum(p.numel() for p in model.parameters()),
        "layers": len(layers),
        "layer_types": types,
    }
    json.dump(res, sys.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--amount", type=float, default=0.9)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--child", choices=["torch", "prunebound"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n_layer, args.n_embd, args.amount, args.out)
        return

    import torch

    load_before = os.getloadavg()
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for which in ("prunebound", "torch"):
            print(f"running {which} ...", file=sys.stderr)
            out = os.path.join(d, f"{which}.pt")
            cmd = [sys.executable, __file__, "--child", which, "--out", out]
            cmd += ["--amount", str(args.amount), "--n-layer", str(args.n_layer)]
            cmd += ["--n-embd", str(args.n_embd)]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res[which] = json.loads(proc.stdout)
        a = torch.load(os.path.join(d, "prunebound.pt"), weights_only=True)
        b = torch.load(os.path.join(d, "torch.pt"), weights_only=True)
    n = a.numel()
    weights_mb = n * 4 / 2**20
    for r in res.values():
        r["extra_mb"] = r["peak_rss_mb"] - r["rss_before_mb"]
        r["extra_over_pruned_weights"] = r["extra_mb"] / weights_mb
    differ = int((a != b).sum())
    print(
        json.dumps(
            {
                "benchmark": "hf_prune",
                "model": f"GPT2LMHeadModel(n_layer={args.n_layer}, n_embd={args.n_embd}) "
                "from config",
                "model_params": res["prunebound"]["model_params"],
                "pruned_layers": res["prunebound"]["layers"],
                "pruned_weights": n,
                "pruned_weights_mb": round(weights_mb, 1),
                "amount": args.amount,
                "threads": torch.get_num_threads(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "prunebound": res["prunebound"],
                "torch": res["torch"],
                "speedup": res["torch"]["seconds"] / res["prunebound"]["seconds"],
                "masks_differ": differ,
                "masks_agree_fraction": 1 - differ / n,
                "same_count": int((~a).sum()) == int((~b).sum()),
                "pruned": int((~a).sum()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
