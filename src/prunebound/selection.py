"""The one selection routine of `prune`: exact-count pruning of the lowest scores.

Find the k-th smallest score among the surviving units without materialising all scores at once,
then prune every unit below it and, among ties, the first ones in (layer, flat index) order.
Deterministic, exact-count, and lean: a 100M-weight global magnitude prune holds one block of
scores at a time. `nm_keep` is the N:M variant (N kept of every M consecutive input weights).
Scores are checked as they come: a wrong shape or a NaN is a ValueError naming method and layer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from prunebound._masks import alive_units, count_units, mask_module, original_weight, unit_view
from prunebound.methods import Method, ScoreContext

_BLOCK = 1 << 21  # elements scored at once (8 MB of float32 scores)
_SAMPLE = 1 << 18  # scores sampled to bracket the k-th smallest


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: look it up once
    return ctypes.CDLL(name) if name else None


def _libc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Streaming over blocks frees the same few MB again and again; glibc keeps such chunks in the
    heap, so without this the resident size grows by hundreds of MB on a 100M-weight model.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def checked_scores(
    method: Method,
    weight: torch.Tensor,
    g: torch.Generator,
    layer: ScoreContext,
    want: tuple[int, ...],
) -> torch.Tensor:
    """`method`'s scores of `weight` as float32, after checking their shape and for NaN."""
    assert method.scores is not None
    s = method.scores(weight, g, layer)
    where = f"method {method.name!r}, layer {layer.name!r}"
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{where}: scores must be a tensor, got {type(s).__name__}")
    if tuple(s.shape) != want:
        raise ValueError(
            f"{where}: scores have shape {tuple(s.shape)}, expected {want} "
            + ("(one per output row)" if method.unit == "row" else "(the weight's shape)")
        )
    s = s.detach().float()
    if torch.isnan(s).any():
        raise ValueError(f"{where}: scores contain NaN")
    return s


def _scored_blocks(
    layers: Sequence[ScoreContext], method: Method, g: torch.Generator
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (layer index, first row, flat scores with pruned units set to +inf), block by block."""
    assert method.scores is not None
    for i, ctx in enumerate(layers):
        m = ctx.module
        w = unit_view(m, original_weight(m).detach(), method.unit)
        mm = mask_module(m)
        alive = alive_units(m, method.unit)
        rows = w.shape[0]
        step = max(1, _BLOCK // max(1, w[0].numel())) if method.blockwise else rows
        for r0 in range(0, rows, step):
            wb = w[r0 : r0 + step]
            if mm is not None:  # score the effective weight
                wb = wb * unit_view(m, mm.mask, method.unit)[r0 : r0 + step]
            want = tuple(wb.shape) if method.unit == "weight" else (wb.shape[0],)
            layer = replace(ctx, rows=slice(r0, r0 + step)) if step < rows else ctx
            s = checked_scores(method, wb, g, layer, want).reshape(-1)
            if alive is not None:
                s = s.masked_fill(~alive[r0 : r0 + step].reshape(-1), math.inf)
            yield i, r0, s
            del s
    # once per pass, not per layer: trimming returns the freed block buffers to the OS, and
    # every block allocated after a trim page-faults its memory in again (3x slower on GPT-2)
    _libc_trim()


def _sampled_scores(
    ctx: ScoreContext, method: Method, g: torch.Generator, stride: int
) -> torch.Tensor:
    """Scores of every `stride`-th weight of a layer (flat order), pruned ones set to +inf."""
    assert method.scores is not None
    module = ctx.module
    w = original_weight(module).detach().reshape(-1)[::stride]
    mm = mask_module(module)
    keep = mm.mask.reshape(-1)[::stride] if mm is not None else None
    if keep is not None:
        w = w * keep  # score the effective weight
    s = checked_scores(method, w, g, ctx, tuple(w.shape))
    return s if keep is None else s.masked_fill(~keep, math.inf)


def _kth_smallest(
    layers: Sequence[ScoreContext], method: Method, g: torch.Generator, k: int, n: int
) -> tuple[float, int]:
    """Exact k-th smallest score (1-based) among `n` alive units, and how many score below it.

    Two streaming passes: a strided sample brackets the k-th value, then one pass counts the
    scores below the bracket and keeps only those inside it.
    """
    state = g.get_state()
    stride = max(1, n // _SAMPLE)
    if method.elementwise:  # score only the sampled weights
        parts = [_sampled_scores(m, method, g, stride) for m in layers]
    else:
        parts = [
            s[::stride].clone() for _, _, s in _scored_blocks(layers, method, g)
        ]  # no views: they pin blocks
    sample = torch.cat(parts)
    sample = sample[torch.isfinite(sample)].sort().values
    m = sample.numel()
    pos = (k - 1) / max(n - 1, 1) * (m - 1)
    margin = 6 * math.sqrt(m) + 8
    lo = sample[math.floor(pos - margin)].item() if m and pos - margin > 0 else -math.inf
    hi = sample[math.ceil(pos + margin)].item() if m and pos + margin < m - 1 else math.inf
    for _ in range(2):  # second try only if the sampled bracket missed (rare), with a wide bracket
        g.set_state(state)
        below, cands = 0, []
        for _, _, s in _scored_blocks(layers, method, g):
            below += int(torch.count_nonzero(s < lo))
            cands.append(s[(s >= lo) & (s <= hi)])
        c = torch.cat(cands)
        if below < k <= below + c.numel():
            thr = c.kthvalue(k - below).values
            return float(thr), below + int((c < thr).sum())
        lo, hi = (-math.inf, hi) if below >= k else (lo, math.inf)
    raise RuntimeError("internal error: k-th smallest score not bracketed")  # pragma: no cover


def select(
    layers: Sequence[ScoreContext], method: Method, g: torch.Generator, k: int
) -> list[torch.Tensor]:
    """New keep-masks (weight-shaped, composed with the old ones) after pruning the k
    lowest-scored alive units across `layers`; ties go first in (layer, flat index) order."""
    if k > 0:
        n = sum(count_units(c.module, method.unit)[1] for c in layers)
        state = g.get_state()
        thr, n_below = _kth_smallest(layers, method, g, k, n)
        ties = k - n_below
    keeps = []
    for c in layers:
        m = c.module
        mm = mask_module(m)
        w = original_weight(m)
        keeps.append(
            mm.mask.clone()
            if mm is not None
            else torch.ones(w.shape, dtype=torch.bool, device=w.device)
        )
    if k == 0:
        return keeps
    g.set_state(state)
    for i, r0, s in _scored_blocks(layers, method, g):
        p = s < thr
        if ties > 0:
            eq = (s == thr).nonzero().flatten()[:ties]
            p[eq] = True
            ties -= eq.numel()
        p = p.to(keeps[i].device)
        if method.unit == "row":  # p: one flag per row of the block
            unit_view(layers[i].module, keeps[i], "row")[r0 : r0 + p.numel()][p] = False
        else:  # p: flat flags of whole rows r0, r0+1, ...
            rows = p.numel() // max(1, keeps[i][0].numel())
            keeps[i][r0 : r0 + rows].view(-1).masked_fill_(p, False)
    return keeps


def parse_pattern(pattern: object) -> tuple[int, int]:
    """ "N:M" -> (N, M), with 0 < N < M."""
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(f"pattern must be 'N:M' with 0 < N < M (as '2:4'), got {pattern!r}")


def check_pattern(layer: ScoreContext, method: str, pattern: tuple[int, int]) -> None:
    """ValueError unless M divides the layer's input dimension."""
    w = original_weight(layer.module)
    width = unit_view(layer.module, w, "row")[0].numel()
    if width % pattern[1]:
        raise ValueError(
            f"method {method!r}, layer {layer.name!r}: pattern {pattern[0]}:{pattern[1]} needs "
            f"the input dimension ({width}) to be a multiple of {pattern[1]}"
        )


def nm_keep(
    layer: ScoreContext, method: Method, g: torch.Generator, pattern: tuple[int, int]
) -> torch.Tensor:
    """Keep-mask keeping the N best-scored of every M consecutive input weights of each output
    row (composed with the old mask: groups that already keep fewer stay as they are; ties:
    the lower index is pruned first)."""
    n, m = pattern
    module = layer.module
    w = original_weight(module).detach()
    mm = mask_module(module)
    keep = mm.mask.clone() if mm is not None else torch.ones_like(w, dtype=torch.bool)
    weff = w * keep if mm is not None else w
    s = checked_scores(method, weff, g, layer, tuple(w.shape)).to(keep.device)
    groups = unit_view(module, s, "row").reshape(-1, m)
    alive = unit_view(module, keep, "row").reshape(-1, m)
    order = groups.masked_fill(~alive, -math.inf).argsort(dim=1, stable=True)[:, : m - n]
    pruned = torch.zeros_like(alive).scatter_(1, order, True)
    rows = unit_view(module, keep, "row")
    rows.copy_((alive & ~pruned).reshape(rows.shape))
    return keep
