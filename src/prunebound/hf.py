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

`model.save_pretrained(d)` of a pruned model writes torch's parametrization keys
(`X.parametrizations.weight.original`), which `from_pretrained` does not know: it would
re-initialise every pruned layer. `save_pretrained(model, d)` here writes the masked weights
under the plain keys instead (so plain `from_pretrained` gets the sparse model, as zeros) and
the masks beside them in `prunebound_masks.safetensors`; `from_pretrained(cls, d)` loads both,
so the masks are back for further training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import nn

from prunebound._masks import is_pruned, prunable_layers
from prunebound.checkpoint import load_masks, masked_state_dict, save_masks

#: the masks file `save_pretrained` writes beside the model's weights
MASKS_FILE = "prunebound_masks.safetensors"

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


def save_pretrained(model: Any, directory: str | Path, **kwargs: Any) -> Path:
    """`model.save_pretrained(directory, **kwargs)` with the masked weights under the plain
    keys, plus `MASKS_FILE` (the masks and the values behind them) if the model is pruned.

    Plain `from_pretrained(directory)` then loads the sparse model (pruned weights are zeros);
    `from_pretrained` here also restores the masks.
    """
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained: state_dict is computed from the model; do not pass it")
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=masked_state_dict(model), **kwargs)
    if is_pruned(model):
        save_masks(model, directory / MASKS_FILE)
    else:
        (directory / MASKS_FILE).unlink(missing_ok=True)
    return directory


def from_pretrained(cls: Any, directory: str | Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(directory, **kwargs)`, with the masks of `MASKS_FILE` if present."""
    model = cls.from_pretrained(directory, **kwargs)
    masks_file = Path(directory) / MASKS_FILE
    if masks_file.is_file():
        load_masks(model, masks_file)
    return model
