"""Low-level safetensors files: atomic writes, checked reads, digests, and nested state as tensors.

Shared by model checkpoints (`checkpoint`), run checkpoints (`training.resume`) and export files
(`deploy.export_file`). Never pickle: a file holds tensors plus string metadata, and a nested
state (an optimizer's `state_dict()`) is split into a JSON skeleton and its tensors.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from prunebound._check import is_int

#: Metadata key of a checkpoint's SHA-256 over its tensors (`digest`).
DIGEST_KEY = "sha256"


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of `tensors` (detects corrupt files)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync'd, then
    renamed over `path` (`os.replace`); a killed writer leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0644 under the usual umask 022
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors re-creates the file 0600: every output gets one mode
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


def read_checked(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a checkpoint, checked against its digest."""
    tensors, meta = read_file(path)
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != digest(tensors):
        raise ValueError(f"{path}: corrupt checkpoint (its tensors do not match their SHA-256)")
    return tensors, meta


def tied_keys(live: dict[str, torch.Tensor]) -> dict[str, str]:
    """{key: first key} for each state_dict key whose tensor is an earlier key's (tied weights:
    the same tensor, or one with the same memory and layout)."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for key, t in live.items():
        if t.numel() == 0:
            continue
        ident = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors`, contiguous, with a copy of each one overlapping an earlier one's memory
    (safetensors refuses tensors sharing memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().contiguous()
        out[key] = t.clone() if t.numel() and t.untyped_storage().data_ptr() in seen else t
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
    return out


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
            if all(is_int(k) or isinstance(k, str) for k in x):
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
