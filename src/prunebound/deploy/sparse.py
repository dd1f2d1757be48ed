"""Sparse inference layers: `SparseLinear` and `SparseConv2d` hold a weight as compressed sparse
rows (`crow_indices`, `col_indices`, `values` buffers, 32-bit indices where they fit) and compute
`W @ X` with one of the kernels in `prunebound.deploy.kernels.KERNELS`, chosen per layer by
`export`. These layers are for inference only: outputs carry no gradient.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from prunebound._masks import effective_weight
from prunebound.deploy.kernels import KERNELS

__all__ = ["SparseConv2d", "SparseLinear", "check_csr", "sparse_layer", "sparse_path", "to_csr"]

_INT32_MAX = 2**31 - 1


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


def _tracing(layer: nn.Module) -> bool:
    """True while a graph is captured (`torch.onnx.export`, `torch.export`, `torch.compile`,
    `torch.jit.trace`): the sparse kernels run outside torch and would be captured as a
    constant (a graph with no input), so the layers then compute densely from `dense_weight`.

    Raises ValueError under the legacy TorchScript-based `torch.onnx.export(..., dynamo=False)`,
    whose constant folding gets the scatter-add of `dense_weight` wrong.
    """
    tracing: bool = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
    if torch.onnx.is_in_onnx_export() and tracing:
        raise ValueError(
            f"{type(layer).__name__} (a CSR layer of pb.export) cannot be exported by "
            "torch.onnx.export(..., dynamo=False): use the default dynamo=True exporter, or "
            "export the dense model (pb.export(model, 'dense') or pb.remove(model))"
        )
    return tracing or torch.compiler.is_compiling() or torch.compiler.is_exporting()


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

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor of `weight_shape`, built from the CSR buffers by torch
        ops (so that tracing, `torch.export` and `torch.onnx.export` see where it comes from)."""
        rows = self.weight_shape[0]
        cols = int(np.prod(self.weight_shape[1:]))
        crow, col = self.crow_indices.long(), self.col_indices.long()
        # the row of each value: how many rows end at or before it (scatter-add, cumsum: ops
        # every exporter knows, unlike repeat_interleave or diff)
        ends = crow.new_zeros(self.nnz + 1).index_put(
            (crow[1:],), torch.ones_like(crow[1:]), accumulate=True
        )
        row = ends.cumsum(0)[: self.nnz]
        dense = self.values.new_zeros(rows * cols).index_put((row * cols + col,), self.values)
        out: torch.Tensor = dense.reshape(self.weight_shape)
        return out

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
        if _tracing(self):
            return F.linear(x, self.dense_weight(), self.bias)
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
        if _tracing(self):
            weight = self.dense_weight()
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        out_c, _, kh, kw = self.weight_shape
        n, _, h, w = x.shape
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, (kh, kw), self.dilation, self.padding, self.stride)  # (N, CKK, L)
        xt = cols[0] if n == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = self._mm(xt)  # (out, N*L)
        return y.reshape(out_c, n, h_out * w_out).transpose(0, 1).reshape(n, out_c, h_out, w_out)


def sparse_path(module: nn.Module) -> str | None:
    """Why `module` cannot become a sparse layer, or None if it can."""
    if not isinstance(module, nn.Linear | nn.Conv2d):
        return f"no sparse path for {type(module).__name__} (only Linear and Conv2d)"
    w = effective_weight(module)
    if w.device.type != "cpu":
        return f"sparse kernels run on CPU only, weight is on {w.device}"
    if w.dtype not in (torch.float32, torch.float64):
        return f"sparse kernels need float32/float64 weights, got {w.dtype}"
    if isinstance(module, nn.Conv2d):
        why = SparseConv2d.unsupported(module)
        return None if why is None else f"no sparse path for this Conv2d: {why}"
    return None


def sparse_layer(m: nn.Module, kernel: str) -> SparseLinear | SparseConv2d:
    """The sparse form of a Linear or Conv2d (callers check `sparse_path` first)."""
    if isinstance(m, nn.Linear):
        return SparseLinear.from_dense(m, kernel)
    assert isinstance(m, nn.Conv2d)  # callers checked sparse_path
    return SparseConv2d.from_dense(m, kernel)
