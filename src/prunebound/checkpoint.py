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

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunebound.masks import (
    _maskable,
    mask_module,
    original_weight,
    prunable_layers,
    reset,
    set_mask,
)

MASK_PREFIX = "__mask__."
STATE_PREFIX = "__state__."
_DIGEST = "sha256"
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


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of `tensors` (detects corrupt files)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    meta = {"format": "prunebound", **(metadata or {}), _DIGEST: _digest(tensors)}
    write_atomic(tensors, path, meta)
    return path


def write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync'd, then
    renamed over `path` (`os.replace`); a killed writer leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_file(
    path: str | Path, what: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the raw metadata of a safetensors file (no code runs); a missing file is
    a FileNotFoundError, an unreadable one a ValueError naming `what` it should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt or truncated {what} ({e})") from None
    return tensors, meta


def _open(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a checkpoint, checked against its digest."""
    tensors, meta = read_file(path)
    if _DIGEST in meta and meta[_DIGEST] != _digest(tensors):
        raise ValueError(f"{path}: corrupt checkpoint (its tensors do not match their SHA-256)")
    return tensors, meta


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, masks) of a checkpoint; masks keyed by layer name. Never executes code."""
    tensors, _ = _open(path)
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
    tensors, meta = _open(path)
    extra = {k[len(STATE_PREFIX) :]: t for k, t in tensors.items() if k.startswith(STATE_PREFIX)}
    return extra, meta


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (e.g. `optimizer.state_dict()`) into JSON and tensors, no pickle.

    Returns `(skeleton, tensors)`: the skeleton is JSON-serialisable, with each tensor replaced by
    `{"__tensor__": key}` (key: `prefix` + its dotted path), each tuple by `{"__tuple__": [...]}`
    and each dict with non-string keys (optimizer state is keyed by parameter index) by
    `{"__items__": [[key, value], ...]}`. `unflatten_state` inverts it exactly. The tensors are
    the state's own, not copies: write them out before the state changes.
    Raises TypeError on anything else (an object that would need pickle).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[prefix + path] = x.detach()
            return {"__tensor__": prefix + path}
        if x is None or isinstance(x, bool | int | float | str):
            return x
        sub = f"{path}." if path else ""
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{sub}{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{sub}{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{sub}{k}") for k, v in x.items()}
            if all(isinstance(k, int | str) and not isinstance(k, bool) for k in x):
                return {"__items__": [[k, walk(v, f"{sub}{k}")] for k, v in x.items()]}
        raise TypeError(f"state at {path or 'root'!r}: cannot store {type(x).__name__} safely")

    return walk(state, ""), tensors


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild a state split by `flatten_state`; ValueError if a tensor is missing."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        key = skeleton["__tensor__"]
        if key not in tensors:
            raise ValueError(f"state: tensor {key!r} is missing from the checkpoint")
        return tensors[key]
    if "__tuple__" in skeleton:
        return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    if "__items__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
    return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}


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
    layers = _maskable(model)  # masks may sit on embeddings and tied layers too
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
