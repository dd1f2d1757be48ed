"""Starting the ranks of a distributed run, and `run_distributed`, what `prunebound run --nproc`
does as a Python function.

`launch(fn, nproc)` spawns `nproc` local processes that meet through a file rendezvous (no
port needed) and watches them: when one fails, the others get a few seconds to stop on their own
and are then terminated, and the error names the first rank that failed. `run_distributed`
runs an experiment on local processes, as one rank of a `torchrun` job, or in this process.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing.connection
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.multiprocessing as torch_mp

from prunebound._check import check_choice, check_int
from prunebound.training.config import Experiment
from prunebound.training.distributed import (
    BACKENDS,
    Backend,
    DistContext,
    EnvRanks,
    check_timeout,
    check_world_size,
    process_group,
)
from prunebound.training.experiment import CHECKPOINT, add_export_summary, run
from prunebound.training.runner import Round

logger = logging.getLogger(__name__)

#: Seconds the launcher waits for the other ranks to stop on their own after one failed.
_GRACE_S = 5.0


def _worker(
    rank: int,
    fn: Callable[..., None],
    nproc: int,
    init_method: str,
    backend: Backend,
    timeout: float,
    threads: int,
    error_dir: str,
    args: tuple[Any, ...],
) -> None:
    """Body of each spawned process: open the group, run `fn(ctx, *args)`, record any error."""
    torch.set_num_threads(threads)
    faulthandler.enable()  # a C++ abort in a rank prints the Python stack it happened under
    try:
        with process_group(
            rank=rank,
            world_size=nproc,
            init_method=init_method,
            local_rank=rank,
            backend=backend,
            timeout=timeout,
        ) as ctx:
            fn(ctx, *args)
            Path(error_dir, f"rank{rank}.done").touch()  # the work is done and written
    except BaseException as e:
        msg = str(e).strip().splitlines()
        Path(error_dir, f"rank{rank}.txt").write_text(
            f"{type(e).__name__}: {msg[0] if msg else ''}"
        )
        raise
    exit_process(0)


def exit_process(code: int) -> NoReturn:
    """Flush stdout/stderr and end this rank's process now, skipping interpreter finalization.

    For a rank whose work is done and written: in finalization gloo's C++ threads can abort
    ("terminate called without an active exception", SIGABRT; about 1 finished run in 30 on
    torch 2.13 even after destroy_process_group), which would report a finished run as failed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(
    fn: Callable[..., None],
    nproc: int,
    args: tuple[Any, ...] = (),
    *,
    backend: Backend = "gloo",
    timeout: float = 300.0,
    threads: int | None = None,
) -> None:
    """Run `fn(ctx, *args)` in `nproc` local processes sharing a process group.

    Processes are spawned (fresh interpreters: `fn` and `args` must be picklable, `fn` defined
    at module level) and meet through a file rendezvous in a temporary directory, so no port
    is needed. The launcher watches them: when one fails, the others get `_GRACE_S` seconds to
    stop on their own (gloo notices a closed peer at once) and are then terminated.

    Args:
        fn: called as `fn(ctx, *args)` in every process, `ctx` a `DistContext`.
        nproc: number of processes (ranks 0 .. nproc-1 on this machine).
        backend: as in `process_group` ("gloo" by default: CPU).
        timeout: seconds a collective may wait (see `process_group`).
        threads: torch threads per process (default: this machine's cores / nproc).

    Raises:
        ValueError: bad nproc, backend or timeout (before anything starts).
        RuntimeError: a rank failed or died; names the first one and its error.
    """
    check_int("nproc", nproc, 1)
    check_choice("backend", backend, BACKENDS)
    check_timeout(timeout)
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // nproc)
    mp = torch_mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="prunebound-dist-") as tmpdir:
        init = Path(tmpdir, "rendezvous").as_uri()
        procs = [
            mp.Process(
                target=_worker,
                args=(r, fn, nproc, init, backend, timeout, threads, tmpdir, args),
                daemon=True,
            )
            for r in range(nproc)
        ]
        for p in procs:
            p.start()
        try:
            failed = _watch(procs, tmpdir)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join()
        if failed:
            raise RuntimeError(_failure_message(failed, procs, tmpdir))


def _finished(rank: int, proc: Any, done_dir: str) -> bool:
    """Whether a rank that exited non-zero had finished its work (its `.done` marker exists).

    Such a rank died in teardown (gloo's C++ threads can abort after the last collective), after
    everything it computed was written: the run succeeded, so this is logged, not raised.
    """
    if not Path(done_dir, f"rank{rank}.done").is_file():
        return False
    code = proc.exitcode
    how = f"exit code {code}" if code >= 0 else f"signal {-code}"
    logger.warning("rank %d finished its work, then ended with %s in teardown", rank, how)
    return True


def _watch(procs: list[Any], done_dir: str) -> list[int]:
    """Wait for all processes; returns failed ranks in the order they exited (empty: success).

    A rank counts as failed if it exited non-zero before finishing `fn` (see `_finished`).
    After the first failure the others get `_GRACE_S` seconds before the caller stops them.
    """
    pending = {p.sentinel: r for r, p in enumerate(procs)}
    failed: list[int] = []
    deadline: float | None = None
    while pending:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(pending), timeout=wait)
        if not ready:
            break  # grace over: the caller terminates the rest
        for s in ready:
            r = pending.pop(s)
            procs[r].join()
            if procs[r].exitcode != 0 and not _finished(r, procs[r], done_dir):
                failed.append(r)
        if failed and deadline is None:
            deadline = time.monotonic() + _GRACE_S
    return failed


def _failure_message(failed: list[int], procs: list[Any], error_dir: str) -> str:
    """One line: the first rank to fail and why, then the ranks that failed after it."""

    def why(r: int) -> str:
        f = Path(error_dir, f"rank{r}.txt")
        if f.is_file():
            text = f.read_text()
            return "raised " + (text if len(text) <= 200 else text[:197] + "...")
        code = procs[r].exitcode
        return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"

    msg = f"distributed run failed: rank {failed[0]} of {len(procs)} {why(failed[0])}"
    msg += "; all ranks were stopped"
    if len(failed) > 1:
        msg += " (then " + "; ".join(f"rank {r} {why(r)}" for r in failed[1:]) + ")"
    return msg


def _run_rank(
    ctx: DistContext,
    exp: Experiment,
    resume: bool,
    log_level: int,
    on_round: Callable[[Round], None] | None,
) -> None:
    """One process of `run_distributed(exp, nproc)`, spawned by `launch`."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    run(exp, on_round=on_round, resume=resume, dist=ctx)


def run_distributed(
    exp: Experiment,
    nproc: int = 1,
    *,
    backend: Backend = "auto",
    timeout: float = 300.0,
    threads: int | None = None,
    resume: bool = False,
    ranks: EnvRanks | None = None,
    on_round: Callable[[Round], None] | None = None,
) -> dict[str, Any] | None:
    """Run an experiment as `prunebound run CONFIG --nproc N` does; returns `results.json`'s dict.

    With `nproc` > 1, `nproc` local processes train data-parallel (`launch`; `threads` torch
    threads each) and the export line of the report is measured here once they are gone. With
    `ranks` (torchrun's: `env_ranks(os.environ)`) of a world larger than 1, this process is that
    rank of a `torchrun` job: it returns None on ranks other than 0, which should then end at once
    (`exit_process(0)`, as gloo may abort in interpreter teardown). Otherwise the experiment runs
    in this process (`experiment.run`). `on_round` is called on rank 0 after every round; with
    `nproc` > 1 it must be picklable (a function defined at module level).

    Raises:
        ValueError: `nproc` > 1 under torchrun, or a world size that does not divide
            `train.batch_size` (before any process starts).
        RuntimeError: a rank failed; says so when the run's checkpoint is there to resume from.
    """
    check_int("nproc", nproc, 1)
    if nproc != 1:
        if ranks is not None:
            raise ValueError("--nproc launches its own processes: leave it at 1 under torchrun")
        check_world_size(exp.train.batch_size, nproc)  # before anything starts
        level = logging.getLogger().getEffectiveLevel()
        try:
            launch(
                _run_rank,
                nproc,
                (exp, resume, level, on_round),
                backend=backend,
                timeout=timeout,
                threads=threads,
            )
        except RuntimeError as e:
            ckpt = Path(exp.out_dir) / CHECKPOINT
            if not ckpt.is_file():
                raise
            raise RuntimeError(f"{e}. Checkpoint {ckpt} is intact: rerun with --resume") from None
        return add_export_summary(exp)  # the ranks are gone: measure here
    if ranks is not None and ranks.world_size > 1:
        check_world_size(exp.train.batch_size, ranks.world_size)
        with process_group(
            rank=ranks.rank,
            world_size=ranks.world_size,
            local_rank=ranks.local_rank,
            backend=backend,
            timeout=timeout,
        ) as ctx:
            run(exp, on_round=on_round, resume=resume, dist=ctx)
        if not ctx.is_main:
            return None
        return add_export_summary(exp)  # rank 0, the group closed: nobody waits on it now
    return run(exp, on_round=on_round, resume=resume).to_dict()
