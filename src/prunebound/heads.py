"""Attention heads of Hugging Face GPT-2 and BERT: where they sit, and pruning them whole.

A head of `GPT2Attention` is `head_dim` output units in each of the q, k and v blocks of its
packed `c_attn` (a transposed-linear `Conv1D`: q | k | v side by side) and the matching input
units of `c_proj`; a head of `BertSelfAttention` is `attention_head_size` output units of each of
`query`, `key` and `value` (Linear) and the matching input columns of the `BertSelfOutput.dense`
beside it. `attention_layouts` finds them by class name (transformers is never imported).

`prune_heads` (what `prune(model, "head", amount)` runs) scores each head by the L2 norm of all
its weights: its q, k and v weight units and its input columns of the output projection, that is
sqrt of the summed squared unit scores of the "head" method's `row_norm(2)`. Biases are not
scored (they do not scale with the head's contribution). Then it masks the lowest-scored heads
WHOLE: the weight units and bias entries of q, k and v, and the output projection's input
columns. With v = 0 the head's output is exactly 0, so the masked model computes what the model
without that head computes, and `prunebound.shrink` removes the head (`num_heads` updated).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunebound._check import Seed, as_generator, check_choice
from prunebound._masks import LayerSelector, mask_module, original_weight, set_mask, unit_view
from prunebound.coupling import mask_entries
from prunebound.layer_types import output_axis
from prunebound.methods import Method

#: the method name `prune` hands to `prune_heads`
HEAD = "head"
#: attention classes (by name, module "transformers...") -> (head-count attribute, width
#: attribute = heads * head_dim): the attributes a shrink updates and a shrunk file records
HEAD_SIZES: dict[str, tuple[str, str]] = {
    "GPT2Attention": ("num_heads", "split_size"),
    "BertSelfAttention": ("num_attention_heads", "all_head_size"),
}


def is_hf(module: nn.Module, name: str) -> bool:
    """Whether `module` is transformers' class `name` (matched by name, never imported)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__.split(".")[0] == "transformers"


@dataclass(frozen=True)
class Attention:
    """Where the heads of one attention module sit.

    Attributes:
        name: the attention module (`transformer.h.0.attn`, `encoder.layer.0.attention.self`).
        heads: its number of heads; `head_dim`: units per head.
        qkv: (layer name, offset of the block in the layer's output units) for q, k and v.
        out: the output projection, whose input units are the heads' outputs.
    """

    name: str
    heads: int
    head_dim: int
    qkv: tuple[tuple[str, int], tuple[str, int], tuple[str, int]]
    out: str

    def units(self, heads: Sequence[int], block: int) -> torch.Tensor:
        """Output units of q (block 0), k (1) or v (2) of `heads`, in their layer."""
        offset = self.qkv[block][1]
        d = self.head_dim
        idx = [offset + h * d + i for h in heads for i in range(d)]
        return torch.tensor(idx, dtype=torch.long)

    def columns(self, heads: Sequence[int]) -> torch.Tensor:
        """Input units of the output projection carrying `heads`."""
        d = self.head_dim
        return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)


def attention_layouts(model: nn.Module) -> list[Attention]:
    """The `Attention` of every GPT-2 / BERT self-attention module of `model`, in module order.

    Cross-attention (GPT-2 with `q_attn`, BERT's `BertCrossAttention`) is not listed.
    """
    out: list[Attention] = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if is_hf(m, "GPT2Attention") and not getattr(m, "is_cross_attention", False):
            e = int(m.split_size)
            c = f"{p}c_attn"
            out.append(
                Attention(
                    name,
                    int(m.num_heads),
                    int(m.head_dim),
                    ((c, 0), (c, e), (c, 2 * e)),
                    f"{p}c_proj",
                )
            )
        elif is_hf(m, "BertAttention") and is_hf(getattr(m, "self", m), "BertSelfAttention"):
            s = m.self
            qkv = ((f"{p}self.query", 0), (f"{p}self.key", 0), (f"{p}self.value", 0))
            out.append(
                Attention(
                    f"{p}self",
                    int(s.num_attention_heads),
                    int(s.attention_head_size),
                    qkv,
                    f"{p}output.dense",
                )
            )
    return out


def in_axis(module: nn.Module) -> int:
    """Axis of a 2-d weight indexing input units (0 for a transposed linear, else 1)."""
    return 1 - output_axis(module)


def _selected(model: nn.Module, layers: Sequence[LayerSelector] | None) -> list[Attention]:
    found = attention_layouts(model)
    if not found:
        raise ValueError(
            f"method 'head': model {type(model).__name__} has no Hugging Face GPT-2 or BERT "
            "self-attention module (transformers' GPT2Attention, or BertAttention holding a "
            "BertSelfAttention); 'head' prunes the attention heads of those models"
        )
    if layers is None:
        return found
    if isinstance(layers, str | type):
        layers = [layers]
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for sel in layers:
        if isinstance(sel, type):
            hits = {a.name for a in found if isinstance(modules[a.name], sel)}
        elif isinstance(sel, str):
            hits = {
                a.name
                for a in found
                if any(fnmatch.fnmatchcase(n, sel) for n in (a.name, a.out, *(q for q, _ in a.qkv)))
            }
        else:
            raise TypeError(f"layers entries must be names, glob patterns or types, got {sel!r}")
        if not hits:
            raise ValueError(
                f"method 'head': layers entry {sel!r} matches no attention module; "
                f"they are {[a.name for a in found]}"
            )
        chosen |= hits
    return [a for a in found if a.name in chosen]


def _head_rows(a: Attention, modules: dict[str, nn.Module], t: str) -> list[torch.Tensor]:
    """Per part (q, k, v, out): the (heads, head_dim, -1) view of the tensor `t` of each layer
    ("weight": the effective weight, "mask": its keep-mask, all True when unmasked)."""
    parts = []
    for block, (lname, offset) in enumerate((*a.qkv, (a.out, -1))):
        m = modules[lname]
        assert isinstance(m.weight, torch.Tensor)
        w = m.weight.detach()
        if t == "mask":
            mm = mask_module(m)
            w = mm.mask if mm is not None else torch.ones_like(w, dtype=torch.bool)
        rows = unit_view(m, w, "row") if block < 3 else w.movedim(in_axis(m), 0)
        width = a.heads * a.head_dim
        start = offset if block < 3 else 0
        parts.append(rows[start : start + width].reshape(a.heads, a.head_dim, -1))
    return parts


def head_scores(
    a: Attention, modules: dict[str, nn.Module], method: Method, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, alive flag) of each head of `a`: sqrt of the sum of squared unit scores of its q,
    k, v output units and output-projection input units (the L2 norm of its weights); a head is
    alive while any of those weights survives its mask. Dead heads score +inf."""
    assert method.scores is not None
    total = torch.zeros(a.heads, dtype=torch.float64)
    for part in _head_rows(a, modules, "weight"):
        s = method.scores(part.reshape(a.heads * a.head_dim, -1), g).detach().double()
        total += (s.reshape(a.heads, a.head_dim) ** 2).sum(1).cpu()
    alive = torch.zeros(a.heads, dtype=torch.bool)
    for part in _head_rows(a, modules, "mask"):
        alive |= part.flatten(1).any(1).cpu()
    return total.sqrt().masked_fill(~alive, math.inf), alive


def _check_finite(a: Attention, modules: dict[str, nn.Module]) -> None:
    for lname in {*(n for n, _ in a.qkv), a.out}:
        w = original_weight(modules[lname]).detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {lname!r}: weight contains NaN or Inf; refusing to prune")


def prune_heads(
    model: nn.Module,
    method: Method,
    amount: float,
    *,
    scope: str = "layer",
    layers: Sequence[LayerSelector] | None = None,
    seed: Seed = None,
) -> nn.Module:
    """Prune `round(amount * surviving heads)` heads of each selected attention module (scope
    "layer") or of all of them together ("global"), lowest `head_scores` first (ties: the first
    in (module, head) order), each masked whole. Never every head of a module. `layers`: names
    or globs of attention modules or their projections, or attention classes. Validates all
    before it changes anything; returns `model`."""
    check_choice("scope", scope, ("layer", "global"))
    chosen = _selected(model, layers)
    modules = dict(model.named_modules())
    g = as_generator(seed)  # the protocol of score functions; the built-in one ignores it
    for a in chosen:
        _check_finite(a, modules)
    scored = [head_scores(a, modules, method, g) for a in chosen]
    drops: list[torch.Tensor] = []
    if scope == "global":
        flat = torch.cat([s for s, _ in scored])
        k = round(amount * sum(int(al.sum()) for _, al in scored))
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.sort(flat, stable=True).indices[:k]] = True
        drops = list(torch.split(drop, [a.heads for a in chosen]))
    else:
        for s, al in scored:
            drop = torch.zeros(s.numel(), dtype=torch.bool)
            drop[torch.sort(s, stable=True).indices[: round(amount * int(al.sum()))]] = True
            drops.append(drop)
    for a, (_, al), drop in zip(chosen, scored, drops, strict=True):
        if bool(al.any()) and not bool((al & ~drop).any()):
            raise ValueError(
                f"method 'head': pruning {int(drop.sum())} of the {int(al.sum())} surviving heads "
                f"of {a.name!r} (amount={amount}, scope={scope!r}) would remove every head of "
                "it; keep at least one (a smaller amount, or leave it out with layers=)"
            )
    for a, drop in zip(chosen, drops, strict=True):  # all validated: now mutate
        if bool(drop.any()):
            _mask_heads(a, modules, [int(h) for h in torch.nonzero(drop).flatten()])
    return model


def _mask_heads(a: Attention, modules: dict[str, nn.Module], heads: list[int]) -> None:
    """Mask `heads` of `a` whole: q, k, v weight units and bias entries, output columns."""
    for block, (lname, _) in enumerate(a.qkv):
        m = modules[lname]
        idx = a.units(heads, block)
        _drop_units(m, idx, output_axis(m))
        bias = getattr(m, "bias", None)
        if isinstance(bias, torch.Tensor):
            keep = torch.ones(bias.shape[0], dtype=torch.bool)
            keep[idx] = False
            mask_entries(m, "bias", keep)
    o = modules[a.out]
    _drop_units(o, a.columns(heads), in_axis(o))


def _drop_units(m: nn.Module, idx: torch.Tensor, axis: int) -> None:
    """Mask the weight entries at `idx` along `axis`, composing with the mask already there."""
    mm = mask_module(m)
    w = original_weight(m)
    keep = mm.mask.clone() if mm is not None else torch.ones_like(w, dtype=torch.bool)
    keep.movedim(axis, 0)[idx.to(keep.device)] = False
    set_mask(m, keep)
