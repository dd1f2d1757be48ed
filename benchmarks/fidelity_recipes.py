"""How closely can an iteratively pruned, distilled LeNet follow its dense model? (issue 13)

Exploration behind the README's "what stands in the way" table: prune the dense Fashion-MNIST
model step by step (global magnitude or obs), distill after each step towards the dense model
(KL at temperature T, Adam with a cosine LR per step, all 60,000 training images), and print
per step the share of test and training predictions that differ from the dense model's
("flips"; the full 10,000-image test set, so these are measurements, not certificates). Extras
change the distillation: mixup (pairs blended), augment (flips and +-2 pixel shifts), hflip
(every image also mirrored), near (images the dense model nearly ties on weigh up to 5x),
near-calib (obs calibrates on the training images with the smallest dense margins), rigl
(the masks move: every 50 steps each layer drops its smallest survivors and regrows as many
pruned weights with the largest gradients, 5% of its survivors decaying to 0 by 3/4 of the
step), ema (weights averaged, decay 0.998), jacobian (output differences on noisy inputs
matched), hinge (the dense model's class kept ahead by half its margin), keep-output (last
layer dense),
refit (`pb.refit` towards the dense model's layer outputs after each prune, before distilling),
polish (after each distillation, `pb.refit` of the output layer alone towards the dense logits,
least squares on all training images), boundary (each batch also gets, for each image paired
with one the dense model puts in another class, the blend of the two where the dense model's
two logits tie, found by 6 bisection steps: samples on its decision boundary, where flips are).

    python benchmarks/fidelity_recipes.py --method obs [--steps 0.5,0.6,0.7,0.75,0.8,0.9]
        [--epochs 6 --final-epochs 60 --lr 1e-3 --calibration 8192 --temperature 2
         --loss kl|mse --extras mixup,ema --allocation 0.085,0.2,0.63 --dense-epochs 5]

Prints one JSON line per step, with where the flips are: the dense model's top-2 logit margin
at the median flipped test image and at the median image, and the share of flips among the 5%
of images with the smallest margins.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import prunebound as pb
from prunebound._masks import set_mask
from prunebound.data import load_dataset
from prunebound.models import build_model
from prunebound.training.loop import TrainConfig, distill_loss, evaluate, train

EXTRAS = ("mixup", "augment", "hflip", "near", "near-calib", "rigl", "ema", "jacobian", "hinge",
          "keep-output", "refit", "polish", "boundary")  # fmt: skip


def where_flips_are(model: nn.Module, x: torch.Tensor, dense_out: torch.Tensor) -> dict[str, float]:
    """The dense model's top-2 logit margin on the flipped images against all images: medians,
    and the share of flips among the images with the 5% smallest margins."""
    model.eval()
    with torch.no_grad():
        flipped = model(x).argmax(1) != dense_out.argmax(1)
    top = dense_out.topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    low = margin <= margin.quantile(0.05)
    return {
        "flip_margin_median": round(float(margin[flipped].median()), 3) if flipped.any() else 0.0,
        "margin_median": round(float(margin.median()), 3),
        "flips_in_lowest_5pct": round(float((flipped & low).sum() / max(int(flipped.sum()), 1)), 3),
    }


def flip_rate(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) != ref).double().mean())


def batch_inputs(x: torch.Tensor, extras: set[str], g: torch.Generator) -> torch.Tensor:
    if "mixup" in extras:
        lam = torch.rand(x.shape[0], *[1] * (x.dim() - 1), generator=g)
        x = torch.cat([x, lam * x + (1 - lam) * x[torch.randperm(x.shape[0], generator=g)]])
    if "hflip" in extras:  # mirrored clothes stay (nearly) in distribution
        img = x.reshape(x.shape[0], 28, 28) if x.dim() == 2 else x
        x = torch.cat([x, img.flip(-1).reshape(x.shape)])
    if "augment" in extras:
        img = x.reshape(x.shape[0], 28, 28) if x.dim() == 2 else x
        flip = (torch.rand(x.shape[0], generator=g) < 0.5).view(-1, *[1] * (img.dim() - 1))
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        a = torch.roll(torch.where(flip, img.flip(-1), img), shifts=(dy, dx), dims=(-2, -1))
        x = torch.cat([x, a.reshape(x.shape)])
    return x


def boundary_inputs(x: torch.Tensor, dense: nn.Module, g: torch.Generator) -> torch.Tensor:
    """Blends of x with a shuffled partner where the dense model's logits of their two classes
    tie (pairs of one class are dropped)."""
    other = x[torch.randperm(x.shape[0], generator=g)]
    with torch.no_grad():
        a, b = dense(x).argmax(1), dense(other).argmax(1)
        keep = a != b
        x, other, a, b = x[keep], other[keep], a[keep], b[keep]
        lo = torch.zeros(x.shape[0], *[1] * (x.dim() - 1))
        hi = torch.ones_like(lo)
        for _ in range(6):
            mid = (lo + hi) / 2
            out = dense((1 - mid) * x + mid * other)
            ahead = (out.gather(1, a[:, None]) > out.gather(1, b[:, None])).view_as(mid)
            lo, hi = torch.where(ahead, mid, lo), torch.where(ahead, hi, mid)
        mid = (lo + hi) / 2
    return (1 - mid) * x + mid * other


def objective(out: torch.Tensor, tl: torch.Tensor, a: argparse.Namespace) -> torch.Tensor:
    """The distillation loss per image: KL at temperature T (images the dense model nearly ties
    on weighted up to 5x with `near`), or the squared logit error (`--loss mse`)."""
    t = a.temperature
    if a.loss == "mse":
        return ((out - tl) ** 2).sum(1).mean()
    if "near" in a.extras:
        top = tl.topk(2, dim=1).values
        w = 1 + 4 * torch.exp(-(top[:, 0] - top[:, 1]))
        p, q = F.log_softmax(out / t, 1), F.log_softmax(tl / t, 1)
        kl = F.kl_div(p, q, log_target=True, reduction="none").sum(1) * t * t
        return (w * kl).sum() / w.sum()
    return distill_loss(out, tl, tl.argmax(1), temperature=t, weight=1.0) / out.shape[0]


def move_masks(keep: dict[str, torch.Tensor], mods: dict[str, nn.Module], frac: float) -> None:
    """RigL: each layer drops its `frac` smallest survivors and regrows as many pruned weights
    with the largest gradient (at zero)."""
    with torch.no_grad():
        for name, k in keep.items():
            w = mods[name].weight
            move = int(frac * int(k.sum()))
            if move == 0 or w.grad is None:
                continue
            alive = torch.where(k, w.abs(), torch.inf).flatten()
            dead = torch.where(k, -torch.inf, w.grad.abs()).flatten()
            grow, drop = dead.topk(move).indices, (-alive).topk(move).indices
            k.view(-1)[drop] = False
            k.view(-1)[grow] = True
            w.view(-1)[grow] = 0.0


def distill(m: nn.Module, dense: nn.Module, xs: torch.Tensor, a: argparse.Namespace,
            g: torch.Generator, epochs: int, report=None) -> None:  # fmt: skip
    opt = torch.optim.Adam(m.parameters(), lr=a.lr)
    n, bs = xs.shape[0], 128
    total = epochs * math.ceil(n / bs)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / total))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    ema = [p.detach().clone() for p in m.parameters()] if "ema" in a.extras else None
    keep = {}
    if "rigl" in a.extras:  # masks baked; the dense gradient then reaches the pruned weights
        keep = {n: k.clone() for n, k in pb.masks(m).items()}
        pb.remove(m)
        mods = dict(m.named_modules())
        opt = torch.optim.Adam(m.parameters(), lr=a.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    step = 0
    m.train()
    for epoch in range(epochs):
        if report is not None and epoch and epoch % 10 == 0:
            report(epoch)
            m.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            x = batch_inputs(xs[order[i : i + bs]], a.extras, g)
            if "boundary" in a.extras:
                x = torch.cat([x, boundary_inputs(x, dense, g)])
            with torch.no_grad():
                tl = dense(x)
            out = m(x)
            loss = objective(out, tl, a)
            if "jacobian" in a.extras:
                d = 0.1 * torch.randn(x.shape, generator=g)
                with torch.no_grad():
                    td = dense(x + d) - tl
                loss = loss + 0.02 * ((m(x + d) - out - td) ** 2).sum(1).mean()
            if "hinge" in a.extras:
                top = tl.topk(2, dim=1).values
                cls = tl.argmax(1)
                own = F.one_hot(cls, out.shape[1]).bool()
                other = out.masked_fill(own, -math.inf).max(1).values
                margin = out.gather(1, cls[:, None])[:, 0] - other
                loss = loss + F.relu((top[:, 0] - top[:, 1]).clamp(max=2.0) - margin).mean()
            opt.zero_grad()
            loss.backward()
            if keep and step % 50 == 0 and step < 0.75 * total:
                move_masks(keep, mods, 0.05 * cosine(step * 4 / 3))
            opt.step()
            sched.step()
            step += 1
            if keep:
                with torch.no_grad():
                    for ln, k in keep.items():
                        mods[ln].weight.mul_(k)
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema, m.parameters(), strict=True):
                        e.mul_(0.998).add_(p.detach(), alpha=0.002)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, m.parameters(), strict=True):
                p.copy_(e)
    for ln, k in keep.items():
        set_mask(mods[ln], k)
    m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet_300_100")
    ap.add_argument("--method", default="obs", choices=("obs", "magnitude"))
    ap.add_argument("--steps", default="0.5,0.6,0.7,0.75,0.8,0.83,0.86,0.88,0.9")
    ap.add_argument("--epochs", type=int, default=6, help="distillation epochs per step")
    ap.add_argument("--final-epochs", type=int, default=0, help="at the last step (0: --epochs)")
    ap.add_argument("--loss", default="kl", choices=("kl", "mse"), help="mse: logits matched")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calibration", type=int, default=8192, help="obs calibration images")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--extras", default="", help=f"comma-separated: {', '.join(EXTRAS)}")
    ap.add_argument("--dense-epochs", type=int, default=5, help="training of the dense model")
    ap.add_argument(
        "--allocation",
        default="",
        help="final density per layer (d1,d2,...): "
        "each step prunes every layer to its share of the way, instead of global",
    )
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    a.extras = {e for e in a.extras.split(",") if e}
    if a.extras - set(EXTRAS):
        ap.error(f"unknown extras {sorted(a.extras - set(EXTRAS))}; known: {EXTRAS}")
    torch.set_num_threads(a.threads)
    raw = load_dataset("fashion-mnist")
    data = raw.image() if a.model == "lenet5" else raw.flat()
    kw = {"in_features": 784} if a.model == "lenet_300_100" else {}
    dense = build_model(a.model, seed=0, **kw)
    train(dense, data, TrainConfig(epochs=a.dense_epochs, batch_size=128, lr=1e-3), seed=0)
    dense.eval()
    xs, ys, xt = data.x_train, data.y_train, data.x_test
    with torch.no_grad():
        dense_test = dense(xt)
        ref_test, ref_train = dense_test.argmax(1), dense(xs[:10000]).argmax(1)
    print(json.dumps({"dense_accuracy": evaluate(dense, data).accuracy, "args": vars(a) | {
        "extras": sorted(a.extras)}}), flush=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # training images by the dense model's top-2 margin, nearest ties first
        top = dense(xs).topk(2, dim=1).values
        near = (top[:, 0] - top[:, 1]).argsort()
    m, done = copy.deepcopy(dense), 0.0
    layers = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear | nn.Conv2d)]
    mods = dict(m.named_modules())
    steps = [float(v) for v in a.steps.split(",")]
    for s in steps:
        t1 = time.perf_counter()
        amount = 1 - (1 - s) / (1 - done)
        kwargs: dict[str, object] = {}
        if a.method == "obs":
            calib = near[: a.calibration] if "near-calib" in a.extras else slice(a.calibration)
            kwargs["data"] = (xs[calib], ys[calib])
        if "keep-output" in a.extras:  # the same total sparsity from the other layers
            w = {n: mods[n].weight for n in layers}
            total, last = sum(v.numel() for v in w.values()), w[layers[-1]].numel()
            alive = sum(int((w[n] != 0).sum()) for n in layers[:-1])
            amount = (alive - (total * (1 - s) - last)) / alive
            kwargs["layers"] = layers[:-1]
        if a.allocation:
            final = [1 - float(d) for d in a.allocation.split(",")]
            w = [mods[n].weight for n in layers]
            kwargs["counts"] = {n: round(f * s / steps[-1] * v.numel()) - int((v == 0).sum())
                                for n, f, v in zip(layers, final, w, strict=True)}  # fmt: skip
            pb.prune(m, a.method, **kwargs)
        else:
            pb.prune(m, a.method, amount, scope="global", **kwargs)
        if "refit" in a.extras:
            pb.refit(m, dense, xs[: a.calibration])
        one_shot = flip_rate(m, xt, ref_test)

        def report(epoch: int) -> None:  # the long last step's progress, every 10 epochs
            row = {"epoch": epoch, "flips": flip_rate(m, xt, ref_test),
                   "train_flips": flip_rate(m, xs[:10000], ref_train)}  # fmt: skip
            print(json.dumps(row), flush=True)

        last = bool(s == steps[-1] and a.final_epochs)
        distill(m, dense, xs, a, g, a.final_epochs if last else a.epochs, report if last else None)
        if "polish" in a.extras:
            pb.refit(m, dense, xs, layers=[layers[-1]])
        done = s
        row = {"sparsity": s, "one_shot_flips": one_shot, "flips": flip_rate(m, xt, ref_test),
               "train_flips": flip_rate(m, xs[:10000], ref_train),
               "accuracy": evaluate(m, data).accuracy,
               "seconds": round(time.perf_counter() - t1, 1)}  # fmt: skip
        print(json.dumps(row | where_flips_are(m, xt, dense_test)), flush=True)


if __name__ == "__main__":
    main()
