"""Sparse inference layers (CSR weights, 32-bit indices where they fit) and their matmul kernels.

`SparseLinear` and `SparseConv2d` hold a weight as compressed sparse rows (`crow_indices`,
`col_indices`, `values` buffers) and compute `W @ X` with one of the kernels in `KERNELS`:

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
measures them per layer. These layers are for inference only: outputs carry no gradient.
"""

from __future__ import annotations

import functools
import importlib
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
from torch import nn
from torch.nn import functional as F

__all__ = ["KERNELS", "Kernel", "SparseConv2d", "SparseLinear", "check_csr", "csr_tensor", "to_csr"]

_INT32_MAX = 2**31 - 1


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
    return importlib.import_module("prunebound.deploy._numba_kernels")


def _numba_matmul(op: _NumbaCSR, xt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return op.matmul(xt, bias)


def _kernels() -> dict[str, Kernel]:
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


KERNELS: dict[str, Kernel] = _kernels()


def to_csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_indices, col_indices, values) of a weight flattened to (out, rest); int32 indices
    where the number of nonzeros and columns fit, int64 otherwise."""
    w2 = weight.detach().reshape(weight.shape[0], -1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        csr = w2.to_sparse_csr()
    index = torch.int32 if max(csr.values().numel(), w2.shape[1]) <= _INT32_MAX else torch.int64
    return (
        csr.crow_indices().to(index).contiguous(),
        csr.col_indices().to(index).contiguous(),
        csr.values().contiguous(),
    )


def csr_tensor(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """`torch.sparse_csr_tensor` sharing the given buffers; callers validate with `check_csr`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def check_csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], what: str
) -> None:
    """Raise ValueError unless the arrays form a valid CSR matrix of `shape` (so that a corrupt
    file cannot make a kernel read out of bounds)."""
    rows, cols = shape
    problems = []
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype != crow.dtype:
        problems.append(f"index dtypes {crow.dtype}/{col.dtype} (need equal int32 or int64)")
    elif not values.is_floating_point():
        problems.append(f"values dtype {values.dtype} is not floating point")
    elif crow.dim() != 1 or col.dim() != 1 or values.dim() != 1:
        problems.append("crow_indices, col_indices and values must be 1-D")
    elif crow.numel() != rows + 1 or col.numel() != values.numel():
        problems.append(
            f"{crow.numel()} row pointers for {rows} rows, {col.numel()} column indices for "
            f"{values.numel()} values"
        )
    elif int(crow[0]) != 0 or int(crow[-1]) != values.numel() or bool((crow.diff() < 0).any()):
        problems.append("row pointers are not non-decreasing from 0 to the number of values")
    elif col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols):
        problems.append(f"column indices outside [0, {cols})")
    if problems:
        raise ValueError(f"{what}: invalid sparse weight: {problems[0]}")


class _SparseBase(nn.Module):
    """CSR weight buffers plus a kernel operand built from them (not part of the state_dict)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        weight_shape: tuple[int, ...],
        bias: torch.Tensor | None,
        kernel: str,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        rows = self.weight_shape[0]
        cols = int(np.prod(self.weight_shape[1:]))
        check_csr(crow_indices, col_indices, values, (rows, cols), type(self).__name__)
        if bias is not None and tuple(bias.shape) != (rows,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({rows},)")
        self.register_buffer("crow_indices", crow_indices.detach())
        self.register_buffer("col_indices", col_indices.detach())
        self.register_buffer("values", values.detach())
        self.register_buffer("bias", None if bias is None else bias.detach().to(values.dtype))
        self.kernel = kernel
        self._cache: tuple[tuple[int, ...], Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy, pickling) rebuild the operand from their own buffers
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None  # loading copies into the buffers in place
        super()._load_from_state_dict(*args, **kwargs)

    def _operand(self) -> Any:
        """The kernel's operand, rebuilt when the buffers moved (`.to`, copies)."""
        bufs = (self.crow_indices, self.col_indices, self.values)
        key = (*(b.data_ptr() for b in bufs), id(self.values.dtype))
        if self._cache is None or self._cache[0] != key:
            if self.values.device.type != "cpu":
                raise ValueError(
                    f"{type(self).__name__} runs on CPU only, got {self.values.device}"
                )
            shape = (self.weight_shape[0], int(np.prod(self.weight_shape[1:])))
            self._cache = (key, KERNELS[self.kernel].prepare(*bufs, shape))
        return self._cache[1]

    @property
    def nnz(self) -> int:
        """Number of stored (nonzero) weights."""
        return self.values.numel()

    def _mm(self, xt: torch.Tensor) -> torch.Tensor:
        """(in, N) -> W @ xt + bias, (out, N)."""
        return KERNELS[self.kernel].matmul(self._operand(), xt, self.bias)

    def extra_repr(self) -> str:
        total = int(np.prod(self.weight_shape))
        return f"weight_shape={self.weight_shape}, nnz={self.nnz}/{total}, kernel={self.kernel}"


class SparseLinear(_SparseBase):
    """`nn.Linear` for inference with a CSR weight: (..., in) -> (..., out)."""

    @classmethod
    def from_dense(cls, linear: nn.Linear, kernel: str) -> SparseLinear:
        """Convert a Linear (its effective weight, masked if pruned); the Linear is unchanged."""
        return cls(*to_csr(linear.weight), tuple(linear.weight.shape), linear.bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out); a transposed (N, out) view for 2-D input."""
        out_f, in_f = self.weight_shape
        x2 = x.reshape(-1, in_f)
        return self._mm(x2.T).T.reshape(*x.shape[:-1], out_f)


class SparseConv2d(_SparseBase):
    """`nn.Conv2d` (groups=1, zero padding) for inference: im2col (`F.unfold`), then W @ cols."""

    def __init__(
        self,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        weight_shape: tuple[int, ...],
        bias: torch.Tensor | None,
        kernel: str,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        if len(weight_shape) != 4:
            raise ValueError(f"SparseConv2d needs a 4-D weight shape, got {weight_shape}")
        super().__init__(crow_indices, col_indices, values, weight_shape, bias, kernel)
        self.stride = tuple(int(v) for v in stride)
        self.padding = tuple(int(v) for v in padding)
        self.dilation = tuple(int(v) for v in dilation)

    @staticmethod
    def unsupported(conv: nn.Conv2d) -> str | None:
        """Why `conv` has no sparse path (None if it has one)."""
        if conv.groups != 1:
            return f"grouped conv (groups={conv.groups})"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} (string padding)"
        return None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, kernel: str) -> SparseConv2d:
        """Convert a Conv2d (its effective weight); raises ValueError if it has no sparse path."""
        why = cls.unsupported(conv)
        if why is not None:
            raise ValueError(f"Conv2d has no sparse path: {why}")
        return cls(
            *to_csr(conv.weight),
            tuple(conv.weight.shape),
            conv.bias,
            kernel,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> (N, out, H', W')."""
        out_c, _, kh, kw = self.weight_shape
        n, _, h, w = x.shape
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, (kh, kw), self.dilation, self.padding, self.stride)  # (N, CKK, L)
        xt = cols[0] if n == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = self._mm(xt)  # (out, N*L)
        return y.reshape(out_c, n, h_out * w_out).transpose(0, 1).reshape(n, out_c, h_out, w_out)
