"""Distributed retraining: 2 CPU processes (gloo, file rendezvous) against a 1-process run.

Process start-up dominates the cost (each rank imports torch), so one launch serves several
tests: the ranks run a lottery schedule, then a training in which rank 1 dies. Worker functions
live at module level: `launch` spawns fresh interpreters that import them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch import nn

import prunebound as pb
from prunebound._masks import mask_module
from prunebound.checkpoint import read
from prunebound.data import Dataset, load_digits
from prunebound.training.config import Experiment
from prunebound.training.distributed import DistContext, check_world_size, env_ranks
from prunebound.training.launch import launch
from prunebound.training.loop import TrainConfig, train
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule

# 251 training samples, batch 32: 7 full batches and a last one of 27, split 14 / 13 over two
# ranks, so the scaling of uneven slices is exercised too.
N_TRAIN, BATCH = 251, 32
DENSE = TrainConfig(epochs=2, batch_size=BATCH, optimizer="sgd", lr=0.1, momentum=0.9)
LOTTERY = Schedule(
    kind="lottery", method="magnitude", steps=(0.5, 0.75), retrain_epochs=1, rewind_epoch=1
)
# The same run as DENSE + LOTTERY on _model() and _data(), as a config file.
CONFIG = """
seed = 0
[model]
name = "mlp"
args = { widths = [64, 32, 10] }
[data]
name = "digits"
max_train = 251
max_test = 200
[train]
epochs = 2
batch_size = BATCH
optimizer = "sgd"
lr = 0.1
momentum = 0.9
[schedule]
kind = "lottery"
method = "magnitude"
steps = [0.5, 0.75]
retrain_epochs = 1
rewind_epoch = 1
"""


def _data() -> Dataset:
    return load_digits(seed=0).subsample(N_TRAIN, 200, seed=0)


def _model() -> nn.Module:
    return pb.models.build_model("mlp", seed=0, widths=(64, 32, 10))


def _worker(ctx: DistContext, out: str, data: Dataset) -> None:
    """Every rank runs the lottery schedule and writes its model and metrics; then, in a new
    training, rank 0 checkpoints every epoch and rank 1 dies (exit code 3) after epoch 2."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    rounds = run_schedule(model, data, DENSE, LOTTERY, seed=g, dist=ctx)
    pb.save(model, Path(out) / f"rank{ctx.rank}.safetensors")
    Path(out, f"rank{ctx.rank}.json").write_text(json.dumps([r.to_dict() for r in rounds]))
    # a mask that differs on rank 1 is replaced by rank 0's
    copy = pb.load(_model(), Path(out) / f"rank{ctx.rank}.safetensors")
    if ctx.rank == 1:
        mm = mask_module(copy.get_submodule("1"))
        assert mm is not None
        mm.mask[0, :3] = ~mm.mask[0, :3]
    changed = ctx.broadcast_masks(copy)
    Path(out, f"rank{ctx.rank}.changed").write_text(str(changed))
    # iterative random pruning: the ranks' generators stay in step, rank 0's masks broadcast
    rand = _model()
    it = Schedule(kind="iterative", method="random", steps=(0.3, 0.6), retrain_epochs=1)
    run_schedule(rand, data, DENSE, it, seed=torch.Generator().manual_seed(1), dist=ctx)
    pb.save(rand, Path(out) / f"iterative{ctx.rank}.safetensors")
    # BatchNorm: running statistics averaged at epoch ends keep the ranks identical
    bn = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    pb.prune(bn, "magnitude", 0.5)
    train(bn, data, TrainConfig(epochs=1, batch_size=BATCH), dist=ctx)
    pb.save(bn, Path(out) / f"bn{ctx.rank}.safetensors")

    def after(epoch: int, m: nn.Module) -> None:
        if ctx.rank == 0:
            pb.save(m, Path(out) / "last.safetensors")
        elif epoch == 2:
            os._exit(3)

    Path(out, f"rank{ctx.rank}.started").touch()
    train(model, data, TrainConfig(epochs=50, batch_size=BATCH), callback=after, dist=ctx)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """(directory the ranks wrote to, the launcher's error, seconds of the failing phase)."""
    out = tmp_path_factory.mktemp("ddp")
    with pytest.raises(RuntimeError) as err:
        launch(_worker, 2, (str(out), _data()), timeout=60)
    started = min((out / f"rank{r}.started").stat().st_mtime for r in range(2))
    return out, str(err.value), time.time() - started


def _without_seconds(rounds: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


def test_ranks_hold_identical_masks_and_weights(two_ranks: tuple[Path, str, float]) -> None:
    out = two_ranks[0]
    w0, m0 = read(out / "rank0.safetensors")
    w1, m1 = read(out / "rank1.safetensors")
    assert sorted(m0) == sorted(m1) == ["1", "3"]
    for k in m0:
        assert torch.equal(m0[k], m1[k]), f"mask {k} differs between ranks"
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert _without_seconds(r0) == _without_seconds(r1)
    assert [(out / f"rank{r}.changed").read_text() for r in range(2)] == ["0", "3"]
    i0, im0 = read(out / "iterative0.safetensors")
    i1, im1 = read(out / "iterative1.safetensors")
    assert sorted(im0) == ["1", "3"]
    assert all(torch.equal(im0[k], im1[k]) for k in im0), "iterative random masks differ"
    assert all(torch.equal(i0[k], i1[k]) for k in i0), "iterative weights differ"
    single = _model()
    it = Schedule(kind="iterative", method="random", steps=(0.3, 0.6), retrain_epochs=1)
    run_schedule(single, _data(), DENSE, it, seed=torch.Generator().manual_seed(1))
    assert all(torch.equal(pb.masks(single)[k], im0[k]) for k in im0)  # = one process
    b0, _ = read(out / "bn0.safetensors")
    b1, _ = read(out / "bn1.safetensors")
    assert "1.running_mean" in b0
    for k in b0:
        assert torch.equal(b0[k], b1[k]), f"BatchNorm model: {k} differs between ranks"


def test_two_ranks_match_one_process_with_the_same_global_batch(
    two_ranks: tuple[Path, str, float],
) -> None:
    out = two_ranks[0]
    model, data = _model(), _data()
    rounds = run_schedule(model, data, DENSE, LOTTERY, seed=torch.Generator().manual_seed(0))
    ddp = pb.load(_model(), out / "rank0.safetensors")
    masks, ddp_masks = pb.masks(model), pb.masks(ddp)
    assert masks.keys() == ddp_masks.keys() == {"1", "3"}
    for k, keep in masks.items():
        assert torch.equal(keep, ddp_masks[k]), f"mask {k} differs from the 1-process run"
        assert int((~keep).sum()) == round(0.75 * keep.numel())
        # pruned weights are exactly zero after all the all-reduced steps
        assert torch.count_nonzero(ddp.get_submodule(k).weight[~keep]) == 0
    single, dist = pb.snapshot(model), pb.snapshot(ddp)
    for k in single:
        torch.testing.assert_close(dist[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    metrics = json.loads((out / "rank0.json").read_text())
    assert [r["sparsity"] for r in metrics] == [r.sparsity for r in rounds]
    assert [r["accuracy"] for r in metrics] == [r.accuracy for r in rounds]
    for got, want in zip(metrics, rounds, strict=True):
        assert got["loss"] == pytest.approx(want.loss, rel=1e-5)


def test_a_dead_rank_stops_the_run_and_keeps_the_checkpoint(
    two_ranks: tuple[Path, str, float],
) -> None:
    out, message, seconds = two_ranks
    assert message.startswith("distributed run failed: rank 1 of 2 exited with code 3")
    assert "all ranks were stopped" in message
    assert seconds < 30, f"{seconds:.1f} s: stopped by the 60 s timeout, not the watcher"
    model = pb.load(_model(), out / "last.safetensors")
    assert pb.sparsity(model).sparsity == pytest.approx(0.75, abs=1e-3)
    assert not list(out.glob(".*.tmp"))  # no half-written checkpoint left behind


def test_cli_nproc_2_writes_results_once_and_reproduces_the_library_run(
    two_ranks: tuple[Path, str, float], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prunebound.cli import main  # here: spawned ranks import this module, not the CLI

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG.replace("BATCH", str(BATCH)))
    exp = Experiment.from_toml(cfg)
    assert (exp.train, exp.schedule) == (DENSE, LOTTERY)
    rc = main(["run", str(cfg), "--nproc", "2", "--quiet", "--out", str(tmp_path / "ddp")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "distributed: 2 ranks (gloo), largest difference between the ranks' final" in printed
    d = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert d["distributed"] == {"world_size": 2, "backend": "gloo", "max_rank_divergence": 0.0}
    # the export line, measured by the launcher once the ranks are gone
    assert d["export"]["bytes"] > 0 and d["export"]["speedup"] > 0
    assert "export (csr): " in printed
    # written once, by rank 0: one checkpoint, one model, no temporary or per-rank files
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert [f for f in files if "checkpoint" in f] == ["checkpoint.safetensors"]
    assert not [f for f in files if f.endswith(".tmp") or "rank" in f]
    assert d["config_hash"] == exp.hash()  # the same config as a 1-process run
    # bit for bit the run of the library test (which matches one process within tolerance)
    library = json.loads((two_ranks[0] / "rank0.json").read_text())
    assert _without_seconds(d["rounds"]) == _without_seconds(library)
    w_cli, m_cli = read(tmp_path / "ddp" / "model.safetensors")
    w_lib, m_lib = read(two_ranks[0] / "rank0.safetensors")
    assert m_cli.keys() == m_lib.keys() and all(torch.equal(m_cli[k], m_lib[k]) for k in m_lib)
    assert w_cli.keys() == w_lib.keys() and all(torch.equal(w_cli[k], w_lib[k]) for k in w_lib)


def test_cli_batch_not_divisible_by_nproc_fails_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import prunebound.training.launch as pbd
    from prunebound.cli import main

    def no_launch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(pbd, "launch", no_launch)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG.replace("BATCH", "33"))
    rc = main(["run", str(cfg), "--nproc", "2", "--out", str(tmp_path / "out")])
    assert rc == 1  # refused before any process was started
    err = capsys.readouterr().err
    assert "train.batch_size=33 is not divisible by the world size 2" in err
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_non_dividing_batch_before_touching_the_model() -> None:
    model, data = _model(), _data()
    before = pb.snapshot(model)
    # No process group is needed: the check comes before any collective.
    with pytest.raises(ValueError, match=r"batch_size=33 is not divisible by the world size 2"):
        train(model, data, TrainConfig(epochs=1, batch_size=33), dist=DistContext(0, 2))
    for k, v in pb.snapshot(model).items():
        assert torch.equal(v, before[k])
    check_world_size(32, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        check_world_size(32, 0)


def test_launch_and_context_validate_arguments() -> None:
    with pytest.raises(ValueError, match="nproc must be an int >= 1, got 0"):
        launch(_worker, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        launch(_worker, 2, backend="mpi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        launch(_worker, 2, timeout=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        DistContext(2, 2)


def test_shard_and_loss_reproduce_the_global_mean() -> None:
    idx = torch.arange(27)
    parts = [DistContext(r, 2).shard(idx) for r in range(2)]
    assert [p.numel() for p in parts] == [14, 13]
    assert torch.equal(torch.cat(parts), idx)
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(27, 5, generator=g), torch.randint(0, 5, (27,), generator=g)
    # DDP averages the ranks' gradients: the mean of the scaled losses is the global mean
    scaled = [DistContext(r, 2).loss(logits[p], y[p], 27) for r, p in enumerate(parts)]
    torch.testing.assert_close((scaled[0] + scaled[1]) / 2, nn.functional.cross_entropy(logits, y))


def test_env_ranks_reads_torchrun_variables() -> None:
    assert env_ranks({}) is None
    r = env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert r is not None and (r.rank, r.world_size, r.local_rank) == (3, 4, 1)
    with pytest.raises(ValueError, match=r"RANK=4 must be in \[0, WORLD_SIZE=4\)"):
        env_ranks({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be ints"):
        env_ranks({"RANK": "a", "WORLD_SIZE": "4"})


def _abort_in_teardown(ctx: DistContext, out: str) -> None:
    """Write this rank's result; on rank 1 make the group's teardown abort (SIGABRT), as gloo's
    C++ threads occasionally do after the last collective."""
    Path(out, f"result{ctx.rank}").write_text(str(ctx.rank))
    if ctx.rank == 1:
        tdist.destroy_process_group = os.abort


def _abort_in_work(ctx: DistContext, out: str) -> None:
    if ctx.rank == 1:
        os.abort()


def test_a_rank_that_aborts_after_finishing_does_not_fail_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="prunebound.training.launch"):
        launch(_abort_in_teardown, 2, (str(tmp_path),), timeout=30)
    assert [(tmp_path / f"result{r}").read_text() for r in range(2)] == ["0", "1"]
    assert "rank 1 finished its work, then ended with signal 6 in teardown" in caplog.text
    # the same abort before the work is done is a failure
    with pytest.raises(RuntimeError, match="rank 1 of 2 was killed by signal 6"):
        launch(_abort_in_work, 2, (str(tmp_path),), timeout=30)
