"""Sparse matmul kernels, `KERNELS`: each maps the CSR buffers of a weight W to an operand once
and computes W @ X + b with it; `prunebound.deploy.sparse` layers call them.

- `torch_csr`: `torch.addmm` on a `torch.sparse_csr_tensor` (MKL, uses torch's threads);
- `scipy_csr` / `scipy_csc`: `scipy.sparse` row- or column-compressed matmul through zero-copy
  numpy views of the tensors (single-threaded, but little per-call overhead and no thread sync);
- `scipy_csr_mt` / `scipy_csc_mt`: the same on row blocks of equal nonzero count, one per torch
  thread, run on a small thread pool (scipy releases the GIL);
- `numba_csr` (only where numba is installed): parallel numba CSR kernels with 16-bit column
  indices (`prunebound.deploy._numba_kernels`); its (out, N) output, seen transposed by the next
  SparseLinear, is already the contiguous (in, N) input that kernel wants;
- `numba_csr_1t`: the same kernels on one thread (at batch 1 the hand-off to a second thread
  can cost as much as it saves).

Which one is fastest depends on the shape, the density, the batch and the machine, so `export`
measures them per layer.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import torch

__all__ = ["KERNELS", "Kernel", "available_kernels", "csr_tensor"]


@dataclass(frozen=True)
class Kernel:
    """A sparse matmul: `prepare(crow, col, values, shape)` builds the operand once,
    `matmul(operand, xt, bias)` maps xt (in, N) to W @ xt + bias[:, None], shape (out, N)."""

    name: str
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]], Any]
    matmul: Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _torch_prepare(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    # shares memory with the buffers (no copy)
    return csr_tensor(crow, col, values, shape)


def _torch_matmul(op: torch.Tensor, xt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y: torch.Tensor = (
        torch.sparse.mm(op, xt) if bias is None else torch.addmm(bias[:, None], op, xt)
    )
    return y


def _scipy_csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> scipy.sparse.csr_matrix:
    # numpy views of the buffers: no copy
    return scipy.sparse.csr_matrix((values.numpy(), col.numpy(), crow.numpy()), shape=shape)


def _scipy_csc(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> scipy.sparse.csc_matrix:
    # a column-compressed copy (one more copy of the nonzeros, in memory only)
    return _scipy_csr(crow, col, values, shape).tocsc()


def _scipy_matmul(op: Any, xt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = np.asarray(op @ xt.detach().numpy())  # (out, N)
    if bias is not None:
        y += bias.numpy()[:, None]
    return torch.from_numpy(y)


class _RowBlocks:
    """A scipy matrix cut into row blocks of equal nonzero count, multiplied on a thread pool
    (scipy's sparse kernels release the GIL, so the blocks run in parallel)."""

    def __init__(self, m: Any, threads: int) -> None:
        rows = m.shape[0]
        per_row = np.diff(m.indptr) if m.format == "csr" else np.bincount(m.indices, minlength=rows)
        cum = np.concatenate([[0], np.cumsum(per_row)])
        targets = np.linspace(0, cum[-1], threads + 1)[1:-1]
        cuts = [0, *np.searchsorted(cum, targets).tolist(), rows]
        self.bounds = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
        self.blocks = [m[a:b] for a, b in self.bounds]
        self.shape = m.shape
        self.pool = ThreadPoolExecutor(len(self.blocks) - 1) if len(self.blocks) > 1 else None

    def __matmul__(self, xt: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        xt = np.ascontiguousarray(xt)
        y = np.empty((self.shape[0], xt.shape[1]), dtype=np.result_type(self.blocks[0], xt))

        def work(i: int) -> None:
            a, b = self.bounds[i]
            y[a:b] = self.blocks[i] @ xt

        futures = (
            [self.pool.submit(work, i) for i in range(1, len(self.blocks))] if self.pool else []
        )
        work(0)
        for f in futures:
            f.result()
        return y


def _threaded(
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]], Any],
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]], _RowBlocks]:
    def build(
        crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
    ) -> _RowBlocks:
        # as many row blocks as torch uses threads, so that `torch.set_num_threads` rules both
        return _RowBlocks(prepare(crow, col, values, shape), torch.get_num_threads())

    return build


class _NumbaCSR:
    """Operand of "numba_csr": numpy views of the CSR arrays (column indices narrowed to uint16
    where they fit) and row blocks of equal nonzero count, one per torch thread, run on a small
    thread pool (the compiled kernels release the GIL)."""

    def __init__(
        self,
        crow: torch.Tensor,
        col: torch.Tensor,
        values: torch.Tensor,
        shape: tuple[int, int],
        threads: int | None = None,
    ) -> None:
        self.kernels = _numba_kernels()
        self.indptr = crow.numpy()
        cols = col.numpy()
        narrow = shape[1] <= 2**16
        self.indices = cols.astype(np.uint16) if narrow else cols.astype(np.int32, copy=False)
        self.data = values.numpy()
        self.rows = shape[0]
        threads = max(1, torch.get_num_threads()) if threads is None else threads
        targets = np.linspace(0, int(self.indptr[-1]), threads + 1)[1:-1]
        cuts = [0, *np.searchsorted(self.indptr, targets).tolist(), shape[0]]
        self.bounds = [(int(a), int(b)) for a, b in itertools.pairwise(cuts) if b > a]
        self.pool = ThreadPoolExecutor(len(self.bounds) - 1) if len(self.bounds) > 1 else None

    def matmul(self, xt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """W @ xt + bias[:, None], (out, N); xt (in, N)."""
        x = xt.detach().numpy()
        b = self.data[:0] if bias is None else bias.numpy()
        dtype = self.data.dtype
        y = np.empty((self.rows, x.shape[1]), dtype=dtype)
        fn: Callable[..., None]
        if x.shape[1] == 1:  # W @ x, on the (in,) vector and an (out,) view of y
            fn, x, out = self.kernels.spmv, np.ascontiguousarray(x[:, 0], dtype), y[:, 0]
        else:  # no copy when xt is the output of another numba layer (transposed by the model)
            fn, x, out = self.kernels.spmm, np.ascontiguousarray(x, dtype), y

        def work(r0: int, r1: int) -> None:
            fn(self.indptr, self.indices, self.data, r0, r1, b, x, out)

        futures = [self.pool.submit(work, *rr) for rr in self.bounds[1:]] if self.pool else []
        work(*self.bounds[0])
        for f in futures:
            f.result()
        return torch.from_numpy(y)


@functools.cache
def _numba_kernels() -> Any:
    """The numba kernels module, loaded on first use: numba is an optional dependency, and
    loading it (and its compiled-kernel cache) costs about a second that only users of the
    "numba_csr" kernels should pay."""
    from prunebound.deploy import _numba_kernels  # allowed in tests/test_architecture.py

    return _numba_kernels


def _numba_matmul(op: _NumbaCSR, xt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return op.matmul(xt, bias)


def available_kernels() -> dict[str, Kernel]:
    """Every kernel this machine can run (the numba ones only where numba is installed)."""
    kernels = [
        Kernel("torch_csr", _torch_prepare, _torch_matmul),
        Kernel("scipy_csr", _scipy_csr, _scipy_matmul),
        Kernel("scipy_csc", _scipy_csc, _scipy_matmul),
        Kernel("scipy_csr_mt", _threaded(_scipy_csr), _scipy_matmul),
        Kernel("scipy_csc_mt", _threaded(_scipy_csc), _scipy_matmul),
    ]
    if importlib.util.find_spec("numba") is not None:  # optional: unavailable without numba
        kernels.append(Kernel("numba_csr", _NumbaCSR, _numba_matmul))
        # one thread: no hand-off to a second thread, which at batch 1 can cost what it saves
        kernels.append(
            Kernel("numba_csr_1t", functools.partial(_NumbaCSR, threads=1), _numba_matmul)
        )
    return {k.name: k for k in kernels}


KERNELS: dict[str, Kernel] = available_kernels()


def csr_tensor(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """`torch.sparse_csr_tensor` sharing the given buffers; callers validate with `check_csr`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)
