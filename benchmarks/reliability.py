"""Reliability: property examples run, kill-and-resume trials, bad inputs tried. Prints JSON.

1. Runs every hypothesis property of tests/test_properties.py and counts the examples each ran.
2. Kill and resume: a `prunebound run` subprocess (MLP on digits, iterative random pruning, Adam)
   is SIGKILLed a random fraction of an epoch after a random checkpoint, resumed in-process with
   `prunebound run --resume`, and its masks, weights and metrics are compared bit for bit with
   an uninterrupted run of the same config (the baseline, run first in this process). Also times
   the checkpoint writes against the baseline's run time.
3. Bad inputs: configs, pruning arguments, weights, checkpoints and theory inputs that must be
   refused with a clear error, the model left untouched.

    python benchmarks/reliability.py [--trials 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

import prunebound as pb
import prunebound.training.experiment as ex
from prunebound.cli import main
from prunebound.training.config import Experiment
from prunebound.training.loop import NonFiniteError
from prunebound.training.resume import CHECKPOINT, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """seed = 11
out_dir = "{out}"
quiet = true
[model]
name = "mlp"
args = {{ widths = [64, 32, 10] }}
[data]
max_train = 600
[train]
epochs = 4
batch_size = 16
optimizer = "adam"
lr = 0.003
[schedule]
kind = "iterative"
method = "random"
target_sparsity = 0.8
rounds = 2
retrain_epochs = 2
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def properties() -> dict[str, Any]:
    """Run each property of tests/test_properties.py, counting the examples it really ran."""
    spec = importlib.util.spec_from_file_location("props", ROOT / "tests" / "test_properties.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for fn in mod.PROPERTIES:
        n = 0
        inner = fn.hypothesis.inner_test

        def counted(*args: Any, _inner: Callable[..., None] = inner, **kwargs: Any) -> None:
            nonlocal n
            n += 1
            _inner(*args, **kwargs)

        fn.hypothesis.inner_test = counted
        fn()  # raises if a property fails
        counts[fn.__name__] = n
        log(f"property {fn.__name__}: {n} examples")
    return {
        "properties": len(counts),
        "examples_per_property": counts,
        "examples_total": sum(counts.values()),
        "min_examples": min(counts.values()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _outcome(out: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    metrics = [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]
    return metrics, safetensors.torch.load_file(out / "model.safetensors")


def _cli(argv: list[str]) -> None:
    """`prunebound ARGV` in this process, its tables sent to stderr (stdout is the JSON)."""
    with contextlib.redirect_stdout(sys.stderr):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"prunebound {' '.join(argv)} exited with {code}")


def kill_resume(trials: int, seed: int, work: Path) -> dict[str, Any]:
    """Baseline run, then `trials` runs killed with SIGKILL at random moments and resumed."""
    torch.set_num_threads(1)
    cfg = work / "base.toml"
    cfg.write_text(CONFIG.format(out=work / "baseline"))
    writes: list[float] = []
    first_at: list[float] = []
    write = ex.write_checkpoint

    def timed(*args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        first_at.append(t - t0)
        write(*args, **kwargs)
        writes.append(time.perf_counter() - t)

    ex.write_checkpoint = timed  # type: ignore[assignment]
    t0 = time.perf_counter()
    _cli(["--threads", "1", "run", str(cfg), "--quiet"])
    base_s = time.perf_counter() - t0
    epoch_s = (first_at[-1] - first_at[0]) / (len(first_at) - 1)  # between checkpoints
    ex.write_checkpoint = write
    want_metrics, want_tensors = _outcome(work / "baseline")
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        out = work / f"trial{i}"
        tcfg = work / f"trial{i}.toml"
        tcfg.write_text(CONFIG.format(out=out))
        cmd = [sys.executable, "-m", "prunebound.cli", "--threads", "1", "run", str(tcfg)]
        proc = subprocess.Popen([*cmd, "--quiet"], stdout=subprocess.DEVNULL)
        # kill after the j-th checkpoint write (each is a new inode: os.replace), a random
        # fraction of an epoch later: most kills land mid-epoch, in every phase of the run
        j = rng.randint(1, len(writes) - 1)
        seen, last = 0, None
        while seen < j and proc.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(out / CHECKPOINT)
                if (st.st_ino, st.st_mtime_ns) != last:
                    seen, last = seen + 1, (st.st_ino, st.st_mtime_ns)
            time.sleep(0.0005)
        delay = rng.uniform(0, 0.9 * epoch_s)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "results.json").exists():
            results.append({"trial": i, "killed": False})
            log(f"trial {i}: finished before the kill")
            continue
        model = pb.models.mlp((64, 32, 10))
        exp = replace(Experiment.from_toml(tcfg), quiet=True)
        progress, _ = read_checkpoint(out / CHECKPOINT, model, exp)
        stray = [p.name for p in out.glob(".*.tmp")]  # a write cut short, never renamed
        _cli(["--threads", "1", "run", str(tcfg), "--quiet", "--resume"])
        metrics, tensors = _outcome(out)
        same = metrics == want_metrics and tensors.keys() == want_tensors.keys()
        same = same and all(torch.equal(tensors[k], want_tensors[k]) for k in want_tensors)
        at = {"round": progress.round, "epoch": progress.epoch, "round_end": progress.round_done}
        results.append({"trial": i, "killed": True, "resumed_from": at, "identical": same})
        results[-1]["stray_temp_files"] = stray
        log(f"trial {i}: killed {delay:.3f} s after checkpoint {j}, resumed from {at}: {same}")
    killed = [r for r in results if r["killed"]]
    return {
        "trials": trials,
        "killed_mid_run": len(killed),
        "identical_to_uninterrupted": sum(r["identical"] for r in killed),
        "resume_points": sorted({tuple(r["resumed_from"].values()) for r in killed}),
        "baseline_seconds": round(base_s, 3),
        "checkpoints_per_run": len(writes),
        "checkpoint_write_ms_median": round(1e3 * sorted(writes)[len(writes) // 2], 2),
        "checkpoint_share_of_run": round(sum(writes) / base_s, 4),
        "details": results,
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaNs included."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _refused(fn: Callable[[], object], model: nn.Module | None = None) -> dict[str, Any]:
    """Call `fn`; a clean refusal raises ValueError/TypeError/FileNotFoundError/NonFiniteError
    and leaves `model` (if given) exactly as it was."""
    before = pb.snapshot(model) if model is not None else {}
    masks = {k: v.clone() for k, v in pb.masks(model).items()} if model is not None else {}
    try:
        fn()
    except (ValueError, TypeError, FileNotFoundError, NonFiniteError) as e:
        outcome = {"refused": True, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    else:
        outcome = {"refused": False, "error": None}
    if model is not None:
        now = pb.snapshot(model)
        same = all(_same(now[k], v) for k, v in before.items())
        same = same and pb.masks(model).keys() == masks.keys()
        outcome["model_unchanged"] = same and all(
            torch.equal(pb.masks(model)[k], v) for k, v in masks.items()
        )
    return outcome


def bad_inputs(work: Path) -> dict[str, Any]:
    """Inputs that must be refused; each with its outcome."""
    from prunebound.theory import certify, plan

    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pb.prune(net, "magnitude", 0.3)
    nan_net = copy.deepcopy(net)
    with torch.no_grad():
        pb.original_weight(nan_net[0])[0, 0] = math.nan
    good = work / "good.safetensors"
    pb.save(net, good)
    data = good.read_bytes()
    (work / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-2] ^= 0x10
    (work / "flip.safetensors").write_bytes(bytes(flipped))
    (work / "junk.safetensors").write_bytes(b"\x80\x04pickle? no")
    pb.save(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)), work / "other.safetensors")
    configs = {
        "unknown top-level key": "colour = 1\n",
        "unknown nested key": "[train]\nepochz = 3\n",
        "wrong type (string for int)": '[schedule]\nrounds = "five"\n',
        "wrong type (float seed)": "seed = 1.5\n",
        "out-of-range epochs": "[train]\nepochs = -1\n",
        "NaN learning rate": "[train]\nlr = nan\n",
        "unknown choice": '[schedule]\nretrain_lr = "warm"\n',
        "non-increasing steps": "[schedule]\nsteps = [0.5, 0.4]\n",
        "invalid TOML": "seed = = 1\n",
    }
    cases: dict[str, dict[str, Any]] = {}
    for name, text in configs.items():
        f = work / "bad.toml"
        f.write_text(text)
        cases[f"config: {name}"] = _refused(lambda f=f: Experiment.from_toml(f))
    m = net
    prune_cases: dict[str, Callable[[], object]] = {
        "amount > 1": lambda: pb.prune(m, "magnitude", 1.5),
        "amount NaN": lambda: pb.prune(m, "magnitude", math.nan),
        "amount as int": lambda: pb.prune(m, "magnitude", 1),  # type: ignore[arg-type]
        "unknown method": lambda: pb.prune(m, "magnitud", 0.5),
        "count above survivors": lambda: pb.prune(m, "magnitude", counts={"0": 10_000}),
        "negative count": lambda: pb.prune(m, "magnitude", counts={"0": -1}),
        "unknown layer": lambda: pb.prune(m, "magnitude", counts={"7": 1}),
        "amount and counts": lambda: pb.prune(m, "magnitude", 0.5, counts={"0": 1}),
        "bad seed": lambda: pb.prune(m, "random", 0.5, seed="x"),  # type: ignore[arg-type]
    }
    for name, fn in prune_cases.items():
        cases[f"prune: {name}"] = _refused(fn, net)
    cases["prune: NaN weight"] = _refused(lambda: pb.prune(nan_net, "magnitude", 0.5), nan_net)
    for name, path in [
        ("truncated", work / "trunc.safetensors"),
        ("one byte flipped", work / "flip.safetensors"),
        ("not safetensors", work / "junk.safetensors"),
        ("other architecture", work / "other.safetensors"),
        ("missing", work / "none.safetensors"),
    ]:
        cases[f"checkpoint: {name}"] = _refused(lambda p=path: pb.load(net, p), net)
    cases["certify: NaN radius"] = _refused(lambda: certify(net, radius=math.nan), net)
    cases["certify: NaN weight"] = _refused(lambda: certify(nan_net, radius=1.0), nan_net)
    for key, value in [("eps", math.nan), ("eps", math.inf), ("delta", math.nan)]:
        args = {"eps": 0.1, "delta": 0.01, key: value}
        cases[f"plan: {key}={value}"] = _refused(lambda a=args: plan([8, 6, 3], **a))
    # resuming: another config, and a diverging run that must keep its last good checkpoint
    cfg = work / "r.toml"
    cfg.write_text(CONFIG.format(out=work / "resume").replace("epochs = 4", "epochs = 1"))
    exp = replace(Experiment.from_toml(cfg), quiet=True)
    ex.run(exp, write_plots=False)
    other = replace(exp, train=replace(exp.train, lr=0.01))
    cases["resume: another config"] = _refused(lambda: ex.run(other, resume=True))
    boom = replace(
        exp, out_dir=str(work / "boom"), schedule=replace(exp.schedule, retrain_lr_scale=1e30)
    )
    cases["train: diverging (lr x 1e30)"] = _refused(lambda: ex.run(boom, write_plots=False))
    kept = work / "boom" / CHECKPOINT
    progress, _ = read_checkpoint(kept, pb.models.mlp((64, 32, 10)), boom)
    cases["train: diverging (lr x 1e30)"]["kept_checkpoint_at"] = {
        "round": progress.round,
        "epoch": progress.epoch,
    }
    clean = [c for c in cases.values() if c["refused"] and c.get("model_unchanged", True)]
    return {"tried": len(cases), "refused_cleanly": len(clean), "cases": cases}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="kill-and-resume trials")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill times")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prunebound-reliability-"))
    try:
        result = {
            "torch": torch.__version__,
            "prunebound": pb.__version__,
            "properties": properties(),
            "kill_resume": kill_resume(args.trials, args.seed, work),
            "bad_inputs": bad_inputs(work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main_()
