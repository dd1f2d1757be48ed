"""numba CSR kernels for `prunebound.sparse` ("numba_csr"); imported lazily, needs numba.

Each call computes output rows [r0, r1) without the GIL, so that `prunebound.sparse` can run row
blocks of equal nonzero count on a thread pool, one per torch thread (numba's OpenMP `prange`
was measured 20x slower than serial on a loaded 2-core machine: its threads spin at barriers).
No fastmath: sums run in the weight dtype in a fixed order (four interleaved partial sums per
row for W @ x, one running sum per output for W @ X), so results are deterministic and match
dense within float rounding. Column indices are uint16 where the layer has at most 65536
inputs (6 bytes per float32 nonzero), int32 otherwise.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

Array = np.ndarray[Any, Any]


@numba.njit(cache=True, nogil=True)
def spmv(
    indptr: Array, indices: Array, data: Array, r0: int, r1: int, bias: Array, x: Array, y: Array
) -> None:  # pragma: no cover - compiled
    """y[r0:r1] = (W @ x)[r0:r1] (+ bias if it is non-empty); x (in,), y (out,)."""
    zero = np.zeros(1, data.dtype)[0]
    for r in range(r0, r1):
        a0 = zero
        a1 = zero
        a2 = zero
        a3 = zero
        j = indptr[r]
        end = indptr[r + 1]
        while j + 4 <= end:  # four partial sums: independent add chains
            a0 += data[j] * x[indices[j]]
            a1 += data[j + 1] * x[indices[j + 1]]
            a2 += data[j + 2] * x[indices[j + 2]]
            a3 += data[j + 3] * x[indices[j + 3]]
            j += 4
        while j < end:
            a0 += data[j] * x[indices[j]]
            j += 1
        s = (a0 + a1) + (a2 + a3)
        y[r] = s + bias[r] if bias.shape[0] else s


@numba.njit(cache=True, nogil=True)
def spmm(
    indptr: Array, indices: Array, data: Array, r0: int, r1: int, bias: Array, xt: Array, y: Array
) -> None:  # pragma: no cover - compiled
    """y[r0:r1] = (W @ xt)[r0:r1] (+ bias[:, None]); xt (in, N) C-contiguous, y (out, N): each
    nonzero adds a scaled row of xt to a row accumulator (vectorised over N), two per pass."""
    n = xt.shape[1]
    acc = np.empty(n, data.dtype)
    for r in range(r0, r1):
        acc[:] = bias[r] if bias.shape[0] else 0
        j = indptr[r]
        end = indptr[r + 1]
        while j + 2 <= end:
            v0 = data[j]
            v1 = data[j + 1]
            x0 = xt[indices[j]]
            x1 = xt[indices[j + 1]]
            for k in range(n):
                acc[k] += v0 * x0[k] + v1 * x1[k]
            j += 2
        if j < end:
            v0 = data[j]
            x0 = xt[indices[j]]
            for k in range(n):
                acc[k] += v0 * x0[k]
        y[r] = acc
