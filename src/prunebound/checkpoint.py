"""Checkpoints (safetensors, never pickle), weight snapshots for rewinding, and interop with
`torch.nn.utils.prune`.

File layout (format "prunebound", layout 2): the dense `state_dict` keys of the model, each
holding the weight *as the model computes with it*: a pruned layer's `X.weight` is its masked
weight (zeros where pruned), so any safetensors loader (`model.load_state_dict(
safetensors.torch.load_file(p), strict=False)`) gets the sparse model. Beside them:

- `__mask__.X.weight`: the bool keep-mask of each masked layer (True = kept);
- `__pruned__.X.weight`: the underlying values at the pruned positions (1-D, row-major order),
  only where some are nonzero: `reset` and lottery-ticket rewinding need them, and `load`
  restores them, so a round trip is exact;
- `__state__.*`: training checkpoints' extra tensors (optimizer moments, RNG states;
  `read_state`), which `load` ignores.

The metadata holds `layout` and a SHA-256 of all tensors, so a corrupt file is refused, not
loaded. Files of layout 1 (no `layout` key: the underlying, unmasked values under the plain
keys) still load. Keys saved from a `torch.compile`d (`_orig_mod.`) or DataParallel/DDP
(`module.`) model load into the plain model: the prefix is stripped, with a warning.
"""

from __future__ import annotations

import logging
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
PRUNED_PREFIX = "__pruned__."
STATE_PREFIX = "__state__."
LAYOUT = "2"  # 2: masked weights under the plain keys; 1 (no "layout" key): unmasked
#: key prefixes of wrapped models' state_dicts: torch.compile, DataParallel / DDP
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_SPECIAL = (MASK_PREFIX, PRUNED_PREFIX, STATE_PREFIX)
logger = logging.getLogger(__name__)
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


def file_tensors(model: nn.Module, *, pruned_values: bool = True) -> dict[str, torch.Tensor]:
    """The tensors `save` writes (no `extra`): masked weights under the plain keys (a tied
    weight once, under its first key), `__mask__.*` and (with `pruned_values`) `__pruned__.*`
    beside them."""
    live = _live_tensors(model)
    first = {id(t): k for k, t in reversed(live.items())}
    # a tied weight is stored once, under its first key (safetensors refuses shared tensors)
    tensors = {k: t.detach().contiguous() for k, t in live.items() if first[id(t)] == k}
    for name, m in prunable_layers(model).items():
        mm = mask_module(m)
        if mm is None:
            continue
        own = f"{name}.weight" if name else "weight"
        tensors[MASK_PREFIX + own] = mm.mask.contiguous()
        weight = original_weight(m)
        key = first[id(weight)]  # a tied weight is stored under its first key (a holder too)
        if key != own:
            continue
        tensors[key] = (weight.detach() * mm.mask).contiguous()
        behind = weight.detach()[~mm.mask]
        if pruned_values and bool(behind.any()):
            tensors[PRUNED_PREFIX + key] = behind.contiguous()
    return tensors


def masked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's dense `state_dict` keys with the weights it computes with (masked weights,
    zeros where pruned), for loaders that know nothing of masks (`save_pretrained`). Tied keys
    share one tensor."""
    tensors = file_tensors(model)
    live = _live_tensors(model)
    first = {id(t): k for k, t in reversed(live.items())}
    return {k: tensors[first[id(t)]] for k, t in live.items()}


def save(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    pruned_values: bool = True,
) -> Path:
    """Write weights and masks to a safetensors file atomically (temporary file, then rename).

    The plain keys hold the masked weights, so any safetensors loader gets the sparse model
    (the layout is in the module docstring). With `pruned_values=False` the values behind the
    masks are left out (a smaller file: at 90% sparsity ~5 instead of ~8.6 bytes per weight);
    loading it gives the same model and masks, but `reset` then revives zeros. `extra`
    tensors (training state: optimizer moments, RNG states) are stored under `STATE_PREFIX`;
    `read_state` returns them, `load` ignores them. A killed writer leaves the previous file
    intact: the new one only replaces it once complete (`os.replace`).
    """
    path = Path(path)
    tensors = file_tensors(model, pruned_values=pruned_values)
    for k, t in (extra or {}).items():
        tensors[STATE_PREFIX + k] = t.detach().contiguous()
    meta = {
        "format": "prunebound",
        **(metadata or {}),
        "layout": LAYOUT,
        DIGEST_KEY: digest(tensors),
    }
    write_atomic(tensors, path, meta)
    return path


def save_masks(model: nn.Module, path: str | Path) -> Path:
    """Write only the masks and the values behind them (`__mask__.*`, `__pruned__.*`): the
    side file of a `save_pretrained` directory, whose weights file holds the masked weights."""
    tensors = {k: t for k, t in file_tensors(model).items() if k.startswith(_SPECIAL)}
    meta = {"format": "prunebound-masks", "layout": LAYOUT, DIGEST_KEY: digest(tensors)}
    write_atomic(tensors, Path(path), meta)
    return Path(path)


def _layer_name(key: str) -> str:
    return key.removesuffix("weight").removesuffix(".")


def _underlying(
    weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: str | Path
) -> dict[str, torch.Tensor]:
    """Layout 2: the masked weights under the plain keys, with the pruned values put back."""
    out = dict(weights)
    for k, behind in tensors.items():
        if not k.startswith(PRUNED_PREFIX):
            continue
        key = k[len(PRUNED_PREFIX) :]
        keep = tensors.get(MASK_PREFIX + key)
        if key not in weights or keep is None or keep.dtype != torch.bool:
            raise ValueError(f"{path}: {k} has no weight and bool mask beside it")
        if keep.shape != weights[key].shape or behind.shape != (int((~keep).sum()),):
            raise ValueError(f"{path}: {k} does not fit the pruned positions of {key}")
        w = weights[key].clone()
        w[~keep] = behind.to(w.dtype)
        out[key] = w
    return out


def _strip_wrappers(
    tensors: dict[str, torch.Tensor], expected: set[str], path: str | Path
) -> dict[str, torch.Tensor]:
    """Keys without a `torch.compile` / DataParallel prefix, if the model expects them so."""
    for prefix in WRAPPER_PREFIXES:
        plain = {k: k for k in tensors if not k.startswith(_SPECIAL)}
        if not plain or not all(k.startswith(prefix) for k in plain):
            continue
        if any(k.startswith(prefix) for k in expected):
            continue  # the model itself is wrapped
        renamed = {}
        for k, t in tensors.items():
            special = next((s for s in _SPECIAL if k.startswith(s)), "")
            rest = k[len(special) :]
            renamed[special + rest.removeprefix(prefix)] = t
        logger.warning(
            "%s: stripped the key prefix %r (a wrapped model's checkpoint)", path, prefix
        )
        tensors = renamed
    return tensors


def read(
    path: str | Path, expected: set[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, masks) of a checkpoint; masks keyed by layer name. Never executes code.

    The weights are the model's underlying values (for a masked layer: the unmasked weight,
    whatever the file's layout). With `expected` (a model's state_dict keys), keys saved from a
    `torch.compile`d or DataParallel/DDP model lose their prefix (`_orig_mod.`, `module.`).
    """
    tensors, meta = read_checked(path)
    if expected is not None:
        tensors = _strip_wrappers(tensors, expected, path)
    return _split(tensors, meta, path)


def _split(
    tensors: dict[str, torch.Tensor], meta: Mapping[str, str], path: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = {k: t for k, t in tensors.items() if not k.startswith(_SPECIAL)}
    if meta.get("layout", "1") != "1":
        weights = _underlying(weights, tensors, path)
    masks = {
        _layer_name(k[len(MASK_PREFIX) :]): t
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
    live = _live_tensors(model)
    weights, file_masks = read(path, expected=set(live))
    return _install(model, live, weights, file_masks, path)


def load_masks(model: nn.Module, path: str | Path) -> nn.Module:
    """Install the masks of a `save_masks` file on a model holding the masked weights (as
    `from_pretrained` loads them), restoring the values behind them: the model is then as
    `save_masks` saw it."""
    tensors, meta = read_checked(path)
    if meta.get("format") != "prunebound-masks":
        raise ValueError(f"{path}: not a prunebound masks file (format {meta.get('format')!r})")
    live = _live_tensors(model)
    if any(mask_module(m) is not None for m in model.modules()):
        raise ValueError("load_masks: the model already has masks (load into a dense model)")
    first = {id(t): k for k, t in reversed(live.items())}  # a tied weight once, as `save`
    plain = {k: t.detach().clone() for k, t in live.items() if first[id(t)] == k}
    weights, file_masks = _split({**plain, **tensors}, meta, path)
    return _install(model, live, weights, file_masks, path)


def _install(
    model: nn.Module,
    live: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    file_masks: dict[str, torch.Tensor],
    path: str | Path,
) -> nn.Module:
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
