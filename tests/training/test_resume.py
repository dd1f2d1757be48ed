"""Interrupted runs resume: at every checkpoint boundary, after SIGKILL, never from a bad file."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import run_keeping_checkpoints, tiny_experiment

import prunebound as pb
from prunebound._files import flatten_state, unflatten_state
from prunebound.cli import main
from prunebound.training.config import Experiment
from prunebound.training.experiment import RunResult, run
from prunebound.training.loop import TrainConfig, make_optimizer
from prunebound.training.resume import CHECKPOINT, read_checkpoint


def _experiment(out: Path, **schedule: Any) -> Experiment:
    return tiny_experiment(out, seed=7, **{"method": "random", "retrain_epochs": 2, **schedule})


def _outcome(res: RunResult) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every round's metrics (not timings) and the final model file's tensors."""
    rounds = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in res.rounds]
    return rounds, safetensors.torch.load_file(res.out_dir / "model.safetensors")


def _assert_same(a: RunResult, b: RunResult) -> None:
    (ra, ta), (rb, tb) = _outcome(a), _outcome(b)
    assert ra == rb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize(
    "schedule",
    [
        {},  # random pruning (draws from the generator), SGD momentum buffers
        {"kind": "lottery", "method": "magnitude", "rewind_epoch": 1, "retrain_lr": "restart"},
        {"kind": "lottery", "method": "random", "rewind_epoch": 0, "scope": "global"},
        {"kind": "lottery", "method": "magnitude", "rewind_step": 3},
    ],
    ids=[
        "iterative-random-sgd",
        "lottery-rewind1-adam",
        "lottery-rewind0-global-adam",
        "lottery-step3-adam",
    ],
)
def test_resume_at_every_boundary_matches_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schedule: dict[str, Any]
) -> None:
    """A copy of each checkpoint the full run writes, resumed, ends exactly like the full run."""
    exp = _experiment(tmp_path / "full", **schedule)
    if schedule:
        exp = replace(exp, train=replace(exp.train, optimizer="adam", lr=0.01))
    full, copies = run_keeping_checkpoints(exp, tmp_path, monkeypatch)
    # dense: 2 epoch ends + round end; each of 2 rounds: 2 epoch ends + round end
    assert len(copies) == 9
    kinds = set()
    for i, saved in enumerate(copies):
        out = tmp_path / f"resumed{i}"
        out.mkdir()
        shutil.copy(saved, out / CHECKPOINT)
        progress, _ = read_checkpoint(out / CHECKPOINT, pb.models.mlp((64, 16, 10)), exp)
        kinds.add((progress.round, progress.epoch, progress.round_done))
        if not progress.round_done:  # optimizer moments / momentum buffers came back
            assert progress.train is not None and progress.train.optimizer["state"]
            assert progress.train.scheduler["last_epoch"] == progress.epoch
        _assert_same(run(replace(exp, out_dir=str(out)), write_plots=False, resume=True), full)
    epoch_ends = {(r, e, False) for r in range(3) for e in (1, 2)}
    assert kinds == epoch_ends | {(r, 2, True) for r in range(3)}


def test_same_seed_twice_is_bit_for_bit(tmp_path: Path) -> None:
    a = run(_experiment(tmp_path / "a"), write_plots=False)
    b = run(_experiment(tmp_path / "b"), write_plots=False)
    _assert_same(a, b)
    c = run(replace(_experiment(tmp_path / "c"), seed=8), write_plots=False)
    assert _outcome(a)[0] != _outcome(c)[0]


def test_sigkill_mid_epoch_then_cli_resume(tmp_path: Path) -> None:
    """Kill a real `prunebound run` with SIGKILL after its first checkpoint, resume via the CLI."""
    out = tmp_path / "killed"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'seed = 5\nout_dir = "{out}"\nquiet = true\n'
        '[model]\nname = "mlp"\nargs = { widths = [64, 16, 10] }\n'
        "[data]\nmax_train = 200\nmax_test = 100\n"
        '[train]\nepochs = 6\nbatch_size = 16\noptimizer = "adam"\nlr = 0.005\n'
        '[schedule]\nkind = "iterative"\nmethod = "magnitude"\ntarget_sparsity = 0.6\n'
        "rounds = 1\nretrain_epochs = 1\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunebound.cli", "--threads", "1", "run", str(cfg), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert not (out / "results.json").exists()  # it really was cut short
    exp = replace(Experiment.from_toml(cfg), quiet=True)
    progress, _ = read_checkpoint(out / CHECKPOINT, pb.models.mlp((64, 16, 10)), exp)
    assert not progress.round_done or progress.round == 0  # (typically: dense, epoch 1 or 2)
    (out / f".{CHECKPOINT}.0123.tmp").write_bytes(b"half a write")  # as a kill mid-write leaves
    assert main(["--threads", "1", "run", str(cfg), "--quiet", "--resume"]) == 0
    assert not list(out.glob(".*.tmp"))  # the resumed run cleaned it up
    full = run(replace(exp, out_dir=str(tmp_path / "full")), write_plots=False)
    got = safetensors.torch.load_file(out / "model.safetensors")
    want = safetensors.torch.load_file(tmp_path / "full" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want) and got.keys() == want.keys()
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rounds] == _outcome(full)[0]


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    exp = _experiment(tmp_path / "a")
    run(exp, write_plots=False)
    ckpt = tmp_path / "a" / CHECKPOINT
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated checkpoint"):
        run(exp, write_plots=False, resume=True)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # one byte of tensor data
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="do not match their SHA-256"):
        run(exp, write_plots=False, resume=True)


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    exp = _experiment(tmp_path / "a")
    run(exp, write_plots=False)
    other = replace(exp, train=replace(exp.train, lr=0.1))
    with pytest.raises(
        ValueError, match=r"\(changed: train\.lr: 0\.05 -> 0\.1\); refusing to resume"
    ):
        run(other, write_plots=False, resume=True)
    # a model file is not a run checkpoint
    shutil.copy(tmp_path / "a" / "model.safetensors", tmp_path / "a" / CHECKPOINT)
    with pytest.raises(ValueError, match="not a prunebound run checkpoint"):
        run(exp, write_plots=False, resume=True)


def test_resume_without_checkpoint_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = run(_experiment(tmp_path / "a"), write_plots=False, resume=True)
    assert "starting afresh" in caplog.text
    _assert_same(a, run(_experiment(tmp_path / "b"), write_plots=False))


def test_checkpoint_holds_optimizer_rng_and_loads_as_a_model(tmp_path: Path) -> None:
    """The run checkpoint: safetensors tensors + JSON metadata; `pb.load` reads it as a model."""
    run(_experiment(tmp_path / "a"), write_plots=False)
    extra, meta = pb.checkpoint.read_state(tmp_path / "a" / CHECKPOINT)
    assert extra["generator"].dtype == torch.uint8
    assert {"config_hash", "progress", "sha256", "format"} <= meta.keys()
    model = pb.load(pb.models.mlp((64, 16, 10)), tmp_path / "a" / CHECKPOINT)
    final = pb.load(pb.models.mlp((64, 16, 10)), tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(v, pb.masks(final)[k]) for k, v in pb.masks(model).items())


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizer_state_round_trips_without_pickle(optimizer: str) -> None:
    """flatten_state -> JSON + safetensors -> unflatten_state: later steps are identical."""
    a = pb.prune(pb.models.build_model("mlp", seed=0, widths=(6, 5, 3)), "magnitude", 0.4)
    b = copy.deepcopy(a)
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.01)  # type: ignore[arg-type]
    opt_a = make_optimizer(a, cfg)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step(a, opt_a)
    b.load_state_dict(a.state_dict())
    skeleton, tensors = flatten_state(opt_a.state_dict(), "opt.")
    text = json.dumps(skeleton)  # plain JSON: no pickle anywhere
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))
    opt_b = make_optimizer(b, cfg)
    opt_b.load_state_dict(unflatten_state(json.loads(text), tensors))
    for _ in range(2):
        step(a, opt_a), step(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_flatten_state_refuses_objects_that_need_pickle() -> None:
    with pytest.raises(TypeError, match=r"state at 'param_groups\.0\.fn': cannot store function"):
        flatten_state({"param_groups": [{"fn": lambda: 0}]})
    with pytest.raises(ValueError, match="tensor 'x' is missing"):
        unflatten_state({"a": {"__tensor__": "x"}}, {})
