"""Helpers for Hugging Face `transformers` models (optional extra `prunebound[hf]`).

Nothing here imports `transformers`: the core already prunes its models. `nn.Linear` layers
(BERT-style) and GPT-2-style `Conv1D` layers, whose weight is stored transposed as (in, out),
are both Linear to prunebound (`prunebound.methods.TRANSPOSED_LINEAR`); for `Conv1D` a
"neuron" is an output unit, a column of its weight. Embeddings and tied weights (an LM head
tied to the input embedding) are left alone unless named; see `prunebound.prunable_layers`.

Glob patterns select by name (`layers=["*.attn.*"]`: GPT-2 attention), but a glob's `*` also
matches dots, so BERT's MLP output (`encoder.layer.0.output.dense`) cannot be told from its
attention output (`encoder.layer.0.attention.output.dense`) by one pattern. `block_layers`
selects by structure instead.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from prunebound._masks import prunable_layers

Part = Literal["attention", "mlp"]


def _classify(path: list[nn.Module]) -> Part | None:
    """Part of the block a layer sits in, from its ancestors (outermost first), or None."""
    if any("attention" in type(m).__name__.lower() for m in path):
        return "attention"
    in_block = any(isinstance(m, nn.ModuleList) for m in path)
    return "mlp" if in_block else None


def block_layers(model: nn.Module, part: Part) -> tuple[str, ...]:
    """Names of the default-prunable layers in the attention or MLP parts of transformer blocks.

    A layer is "attention" if an enclosing module's class name contains "Attention"
    (GPT2Attention, BertAttention, LlamaAttention, ...); it is "mlp" if it sits in a repeated
    block (an element of an `nn.ModuleList`: `transformer.h`, `encoder.layer`) and is not
    attention. Heads, poolers and embeddings outside the blocks are neither.

    Example: `pb.prune(bert, "magnitude", 0.5, layers=block_layers(bert, "mlp"))`.

    Raises:
        ValueError: `part` is not "attention" or "mlp", or no layer matches.
    """
    if part not in ("attention", "mlp"):
        raise ValueError(f"part must be 'attention' or 'mlp', got {part!r}")
    modules = dict(model.named_modules())
    out = []
    for name in prunable_layers(model):
        parts = name.split(".")
        path = [modules[".".join(parts[:i])] for i in range(1, len(parts))]
        if _classify(path) == part:
            out.append(name)
    if not out:
        raise ValueError(f"model {type(model).__name__} has no prunable {part} layer in blocks")
    return tuple(out)
