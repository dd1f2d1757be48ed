"""Checkpoints (safetensors, never pickle), weight snapshots for rewinding, and interop with
`torch.nn.utils.prune`.

File layout: the dense `state_dict` keys of the model (a pruned layer's `X.weight` holds its
underlying, unmasked values) plus one bool tensor `__mask__.X.weight` per masked layer. So a
checkpoint has the same weight keys as a dense one, and `load` restores the exact in-memory state
(masks and the values behind them, which `reset` or a lottery-ticket rewind may need). Training
checkpoints add `__state__.*` tensors (optimizer moments, RNG states; `read_state`), which `load`
ignores. The metadata holds a SHA-256 of all tensors, so a corrupt file is refused, not loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunebound._files import DIGEST_KEY, digest, read_checked, write_atomic
from prunebound._masks import (
    mask_module,
    maskable_layers,
    original_weight,
    prunable_layers,
    reset,
    set_mask,
)

MASK_PREFIX = "__mask__."
STATE_PREFIX = "__state__."
_PARAM = re.compile(r"^(?:(.*)\.)?parametrizations\.weight\.(original|0\.mask)$")


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense state_dict key -> the live tensor behind it (underlying weights for masked layers)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        m = _PARAM.match(key)
        if m is None:
            if ".parametrizations." in f".{key}":
                raise ValueError(f"{key}: only prunebound masks are supported as parametrizations")
            out[key] = t
        elif m.group(2) == "original":
            out[f"{m.group(1)}.weight" if m.group(1) else "weight"] = t
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every weight and buffer (underlying values of masked layers), dense keys."""
    return {k: t.detach().clone() for k, t in _live_tensors(model).items()}


def _check_compatible(
    live: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str
) -> None:
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model (another architecture?): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(live[k].shape):
            raise ValueError(
                f"{what}: {k} has shape {tuple(t.shape)}, the model expects {tuple(live[k].shape)}"
            )


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy `state` (from `snapshot`) back into the model, keeping its masks (lottery tickets)."""
    live = _live_tensors(model)
    _check_compatible(live, state, "snapshot")
    with torch.no_grad():
        for k, t in state.items():
            live[k].copy_(t)
    return model


def save(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights and masks to a safetensors file atomically (temporary file, then rename).

    `extra` tensors (training state: optimizer moments, RNG states) are stored under
    `STATE_PREFIX`; `read_state` returns them, `load` ignores them. A killed writer leaves the
    previous file intact: the new one only replaces it once complete (`os.replace`).
    """
    path = Path(path)
    live = _live_tensors(model)
    first = {id(t): k for k, t in reversed(live.items())}
    # a tied weight is stored once, under its first key (safetensors refuses shared tensors)
    tensors = {k: t.detach().contiguous() for k, t in live.items() if first[id(t)] == k}
    for name, m in prunable_layers(model).items():
        mm = mask_module(m)
        if mm is not None:
            tensors[f"{MASK_PREFIX}{name}.weight" if name else f"{MASK_PREFIX}weight"] = (
                mm.mask.contiguous()
            )
    for k, t in (extra or {}).items():
        tensors[STATE_PREFIX + k] = t.detach().contiguous()
    meta = {"format": "prunebound", **(metadata or {}), DIGEST_KEY: digest(tensors)}
    write_atomic(tensors, path, meta)
    return path


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, masks) of a checkpoint; masks keyed by layer name. Never executes code."""
    tensors, _ = read_checked(path)
    weights = {
        k: t
        for k, t in tensors.items()
        if not k.startswith(MASK_PREFIX) and not k.startswith(STATE_PREFIX)
    }
    masks = {
        k[len(MASK_PREFIX) :].removesuffix("weight").removesuffix("."): t
        for k, t in tensors.items()
        if k.startswith(MASK_PREFIX)
    }
    return weights, masks


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(extra tensors given to `save`, metadata) of a checkpoint. Never executes code."""
    tensors, meta = read_checked(path)
    extra = {k[len(STATE_PREFIX) :]: t for k, t in tensors.items() if k.startswith(STATE_PREFIX)}
    return extra, meta


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint written by `save` (or any dense safetensors state_dict) into `model`.

    The model is typically freshly built (dense); its weights and masks become the file's. Keys,
    shapes and masks are all checked before anything is changed.
    """
    weights, file_masks = read(path)
    live = _live_tensors(model)
    stored = {id(t) for k, t in live.items() if k in weights}
    # a tied weight is stored once (see `save`): its other keys may be absent from the file
    live = {k: t for k, t in live.items() if k in weights or id(t) not in stored}
    _check_compatible(live, weights, f"checkpoint {path}")
    layers = maskable_layers(model)  # masks may sit on embeddings and tied layers too
    for name, keep in file_masks.items():
        if name not in layers:
            raise ValueError(
                f"checkpoint {path}: mask for {name!r}, which is not a prunable layer of the model"
            )
        if keep.dtype != torch.bool or tuple(keep.shape) != tuple(
            original_weight(layers[name]).shape
        ):
            raise ValueError(
                f"checkpoint {path}: mask {name!r} must be bool with the weight's shape"
            )
    with torch.no_grad():
        for k, t in weights.items():
            live[k].copy_(t)
    for name, m in layers.items():
        if name in file_masks:
            set_mask(m, file_masks[name])
        elif mask_module(m) is not None:
            reset(m)
    return model


def import_torch_prune(model: nn.Module) -> nn.Module:
    """Convert `torch.nn.utils.prune` masks (`weight_orig`/`weight_mask`) into prunebound masks.

    Bias masks, which prunebound does not use, are baked into the bias.
    """
    for m in model.modules():
        if hasattr(m, "bias_mask"):
            torch_prune.remove(m, "bias")  # type: ignore[no-untyped-call]
        orig, keep = getattr(m, "weight_orig", None), getattr(m, "weight_mask", None)
        if isinstance(orig, torch.Tensor) and isinstance(keep, torch.Tensor):
            orig, keep = orig.detach().clone(), keep.detach().to(torch.bool)
            torch_prune.remove(m, "weight")  # type: ignore[no-untyped-call]
            with torch.no_grad():
                original_weight(m).copy_(orig)
            set_mask(m, keep)
    return model


def export_torch_prune(model: nn.Module) -> nn.Module:
    """Convert prunebound masks into `torch.nn.utils.prune`'s `weight_orig`/`weight_mask` form."""
    for m in model.modules():
        mm = mask_module(m)
        if mm is not None:
            keep = mm.mask.clone()
            reset(m)
            torch_prune.custom_from_mask(m, "weight", keep)  # type: ignore[no-untyped-call]
    return model
