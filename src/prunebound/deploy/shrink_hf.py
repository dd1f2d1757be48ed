"""`shrink` for Hugging Face GPT-2 and BERT: remove attention heads and MLP neurons.

The residual stream of a transformer (LayerNorms, embeddings, every block's output) keeps its
width; what goes is what only served a pruned unit, decided from the baked (mask-free) weights:

- a head goes if its v weights are zero (the head then outputs its v bias, whatever q and k:
  attention rows sum to 1; that constant is folded into the output projection's bias) or its
  output-projection input columns are zero. Its q, k, v units and bias entries and its output
  columns are removed and `num_heads`/`split_size` (GPT-2) or `num_attention_heads`/
  `all_head_size` (BERT) updated. `prune(model, "head", ...)` masks heads so that they go;
- an MLP neuron (GPT-2 `mlp.c_fc` output column -> act -> `mlp.c_proj` input row; BERT
  `intermediate.dense` row -> `output.dense` column) goes if its producer weights are zero (it
  then sends the constant act(bias), folded into the consumer's bias) or its consumer weights
  are zero. Plain `prune(model, "neuron", ...)` on the MLP input layers is enough.

Layers are narrowed in place on a copy (transformers 5 has no `prune_heads` or
`prune_conv1d_layer` any more, and transformers is never imported: classes are found by name).
Other masked weights stay, baked, as zeros. The result is checked against the masked model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunebound.coupling import baked_eval_copy
from prunebound.heads import HEAD_SIZES, Attention, attention_layouts, in_axis, is_hf
from prunebound.layer_types import is_transposed_linear, output_axis

Act = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Mlp:
    """One transformer MLP: `producer` output units -> `act` -> `consumer` input units."""

    producer: str
    consumer: str
    act: Act


def mlp_layouts(model: nn.Module) -> list[Mlp]:
    """The MLP of every GPT-2 block (`GPT2MLP`) and BERT layer (`BertLayer`) of `model`."""
    out = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if is_hf(m, "GPT2MLP"):
            out.append(Mlp(f"{p}c_fc", f"{p}c_proj", m.act))
        elif is_hf(m, "BertLayer"):
            out.append(
                Mlp(
                    f"{p}intermediate.dense", f"{p}output.dense", m.intermediate.intermediate_act_fn
                )
            )
    return out


def is_transformer(model: nn.Module) -> bool:
    """Whether `model` holds GPT-2 / BERT attention or MLP blocks that `shrink_hf` shrinks."""
    return bool(attention_layouts(model) or mlp_layouts(model))


def _units(m: nn.Module, axis: int) -> torch.Tensor:
    """The 2-d weight of `m` with the units along `axis` on dim 0."""
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w.detach().movedim(axis, 0)


def _zero(m: nn.Module, axis: int) -> torch.Tensor:
    """Flags of the units along `axis` whose weights are all zero."""
    return (_units(m, axis) == 0).all(1)


def _bias(m: nn.Module) -> torch.Tensor:
    b = getattr(m, "bias", None)
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return b.detach() if isinstance(b, torch.Tensor) else w.new_zeros(w.shape[output_axis(m)])


def _fold(consumer: nn.Module, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Add the contribution of constant inputs `values` at input units `idx` to the bias."""
    if not bool((values != 0).any()):
        return
    shift = values @ _units(consumer, in_axis(consumer))[idx]
    with torch.no_grad():
        bias = getattr(consumer, "bias", None)
        if bias is None:
            consumer.bias = nn.Parameter(shift.clone())
        else:
            bias += shift


def narrow(m: nn.Module, keep: torch.Tensor, *, inputs: bool) -> None:
    """Keep only units `keep` of `m` (a Linear or a GPT-2 Conv1D): input units if `inputs`, else
    output units with their bias entries; sizes updated, in place."""
    w = m.weight
    assert isinstance(w, torch.Tensor)
    axis = in_axis(m) if inputs else output_axis(m)
    keep = keep.to(w.device)
    with torch.no_grad():
        m.weight = nn.Parameter(w.detach().index_select(axis, keep).clone())
        b = getattr(m, "bias", None)
        if not inputs and isinstance(b, torch.Tensor):
            m.bias = nn.Parameter(b.detach()[keep].clone())
    attr = ("nx" if inputs else "nf") if is_transposed_linear(m) else None
    attr = attr or ("in_features" if inputs else "out_features")
    setattr(m, attr, len(keep))


def _too_few(what: str, name: str) -> ValueError:
    return ValueError(
        f"shrink: every {what} of {name!r} is pruned (the block adds a constant); shrink would "
        "leave it zero-wide: keep at least one"
    )


def _shrink_heads(work: nn.Module, a: Attention) -> None:
    modules = dict(work.named_modules())
    vname = a.qkv[2][0]
    v, o = modules[vname], modules[a.out]
    v_units = _units(v, output_axis(v))[a.units(range(a.heads), 2)]
    v_zero = (v_units.reshape(a.heads, -1) == 0).all(1)
    o_zero = _zero(o, in_axis(o))[a.columns(range(a.heads))].reshape(a.heads, -1).all(1)
    gone = v_zero | o_zero
    if not bool(gone.any()):
        return
    if bool(gone.all()):
        raise _too_few("head", a.name)
    fold = [h for h in range(a.heads) if v_zero[h] and not o_zero[h]]
    if fold:
        _fold(o, a.columns(fold), _bias(v)[a.units(fold, 2)])
    kept = [h for h in range(a.heads) if not gone[h]]
    per_layer: dict[str, list[torch.Tensor]] = {}
    for block, (lname, _) in enumerate(a.qkv):
        per_layer.setdefault(lname, []).append(a.units(kept, block))
    for lname, parts in per_layer.items():
        narrow(modules[lname], torch.cat(parts), inputs=False)
    narrow(o, a.columns(kept), inputs=True)
    attn = modules[a.name]
    heads_attr, width_attr = HEAD_SIZES[type(attn).__name__]
    setattr(attn, heads_attr, len(kept))
    setattr(attn, width_attr, len(kept) * a.head_dim)


def _shrink_mlp(work: nn.Module, mlp: Mlp) -> None:
    prod, cons = work.get_submodule(mlp.producer), work.get_submodule(mlp.consumer)
    p_zero, c_zero = _zero(prod, output_axis(prod)), _zero(cons, in_axis(cons))
    gone = p_zero | c_zero
    if not bool(gone.any()):
        return
    if bool(gone.all()):
        raise _too_few("neuron", mlp.producer)
    fold = torch.nonzero(p_zero & ~c_zero).flatten()
    if fold.numel():
        with torch.no_grad():
            _fold(cons, fold, mlp.act(_bias(prod)[fold]))
    kept = torch.nonzero(~gone).flatten()
    narrow(prod, kept, inputs=False)
    narrow(cons, kept, inputs=True)


def _call(model: nn.Module, example_inputs: object) -> torch.Tensor:
    """The first tensor output of `model` on a tensor, tuple or dict of inputs (no grad)."""
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = {}
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(t, torch.Tensor) for t in (*args, *kwargs.values())) or not (
        args or kwargs
    ):
        raise TypeError(
            "example_inputs must be a tensor, a tuple or a dict of tensors (input_ids, ...), "
            f"got {type(example_inputs).__name__}"
        )
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    except Exception as e:
        raise ValueError(f"model cannot run on example_inputs: {type(e).__name__}: {e}") from e
    first = out if isinstance(out, torch.Tensor) else out[0]  # a ModelOutput or a tuple
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"model output {type(out).__name__} does not start with a tensor")
    return first


def check_same(reference: torch.Tensor, out: torch.Tensor) -> None:
    """Raise ValueError unless `out` is allclose to `reference` (rtol 1e-4 in float32, 1e-9 in
    float64; atol the same times 1 + max |reference|)."""
    tol = 1e-9 if out.dtype == torch.float64 else 1e-4
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    if out.shape != reference.shape or not torch.allclose(
        out, reference, rtol=tol, atol=tol * (1 + scale)
    ):
        raise ValueError(
            "shrink: the smaller model would not compute the masked model's function on "
            "example_inputs (a module in forward mixes channels?); nothing returned"
        )


def shrink_hf(model: nn.Module, example_inputs: object, *, check: bool = True) -> nn.Module:
    """A new GPT-2 / BERT model with its removable heads and MLP neurons gone (see the module
    docstring); `model` is untouched. `example_inputs`: input ids (a tensor), a tuple passed
    positionally or a dict passed by keyword. The returned model has the training mode of
    `model`; its per-layer widths differ from its config (save it with `save_shrunk`)."""
    work = baked_eval_copy(model)
    reference = _call(work, example_inputs)
    for a in attention_layouts(work):
        _shrink_heads(work, a)
    for mlp in mlp_layouts(work):
        _shrink_mlp(work, mlp)
    if check:
        check_same(reference, _call(work, example_inputs))
    return work.train(model.training)
