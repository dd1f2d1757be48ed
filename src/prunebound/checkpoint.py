"""Checkpoints (safetensors, never pickle), weight snapshots for rewinding, and interop with
`torch.nn.utils.prune`.

File layout (format "prunebound", layout 2): the dense `state_dict` keys of the model, each
holding the weight *as the model computes with it*: a pruned layer's `X.weight` is its masked
weight (zeros where pruned), so any safetensors loader (`model.load_state_dict(
safetensors.torch.load_file(p), strict=False)`) gets the sparse model. Beside them:

- `__mask__.X.weight`: the bool keep-mask of each masked layer (True = kept); likewise
  `__mask__.X.bias`, `__mask__.N.weight` and `__mask__.N.bias` for the other tensors a mask
  sits on (the bias and BatchNorm entries of whole units pruned with `coupled=True`);
- `__pruned__.X.weight` (`.bias`, ...): the underlying values at the pruned positions (1-D,
  row-major order), only where some are nonzero: `reset` and lottery-ticket rewinding need
  them, and `load` restores them, so a round trip is exact;
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
    drop_masks,
    mask_module,
    maskable_layers,
    masked_tensors,
    original_tensor,
    set_mask,
    tensor_masks,
)
from prunebound.layer_types import NORMS

MASK_PREFIX = "__mask__."
PRUNED_PREFIX = "__pruned__."
STATE_PREFIX = "__state__."
LAYOUT = "2"  # 2: masked weights under the plain keys; 1 (no "layout" key): unmasked
#: key prefixes of wrapped models' state_dicts: torch.compile, DataParallel / DDP
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_SPECIAL = (MASK_PREFIX, PRUNED_PREFIX, STATE_PREFIX)
logger = logging.getLogger(__name__)
_PARAM = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(original|0\.mask)$")


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense state_dict key -> the live tensor behind it (the underlying tensor where masked)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        m = _PARAM.match(key)
        if m is None:
            if ".parametrizations." in f".{key}":
                raise ValueError(f"{key}: only prunebound masks are supported as parametrizations")
            out[key] = t
        elif m.group(3) == "original":
            out[f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)] = t
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
    """The tensors `save` writes (no `extra`): masked tensors (weights; biases and BatchNorm
    entries of whole units) under the plain keys (a tied weight once, under its first key),
    `__mask__.*` and (with `pruned_values`) `__pruned__.*` beside them."""
    live = _live_tensors(model)
    first = {id(t): k for k, t in reversed(live.items())}
    # a tied weight is stored once, under its first key (safetensors refuses shared tensors)
    tensors = {k: t.detach().contiguous() for k, t in live.items() if first[id(t)] == k}
    for own, (m, tensor, mm) in tensor_masks(model).items():
        tensors[MASK_PREFIX + own] = mm.mask.contiguous()
        original = original_tensor(m, tensor)
        key = first[id(original)]  # a tied weight is stored under its first key (a holder too)
        if key != own:
            continue
        tensors[key] = (original.detach() * mm.mask).contiguous()
        behind = original.detach()[~mm.mask]
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


def _underlying(
    weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: str | Path
) -> dict[str, torch.Tensor]:
    """Layout 2: the masked tensors under the plain keys, with the pruned values put back."""
    out = dict(weights)
    for k, behind in tensors.items():
        if not k.startswith(PRUNED_PREFIX):
            continue
        key = k[len(PRUNED_PREFIX) :]
        keep = tensors.get(MASK_PREFIX + key)
        if key not in weights or keep is None or keep.dtype != torch.bool:
            raise ValueError(f"{path}: {k} has no tensor and bool mask beside it")
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
    path: str | Path, expected: set[str] | None = None, *, all_masks: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, masks) of a checkpoint. Never executes code.

    The weights are the model's underlying values (for a masked tensor: the unmasked values,
    whatever the file's layout). The masks are the weight masks keyed by layer name (as
    `prunebound.masks`), or with `all_masks` every mask keyed by its tensor's state_dict key
    (`"0.weight"`, and for whole units `"0.bias"`, `"1.weight"`, `"1.bias"`). With `expected`
    (a model's state_dict keys), keys saved from a `torch.compile`d or DataParallel/DDP model
    lose their prefix (`_orig_mod.`, `module.`).
    """
    tensors, meta = read_checked(path)
    if expected is not None:
        tensors = _strip_wrappers(tensors, expected, path)
    weights, file_masks = _split(tensors, meta, path)
    if all_masks:
        return weights, file_masks
    names = {k: k.removesuffix("weight").removesuffix(".") for k in file_masks}
    return weights, {names[k]: t for k, t in file_masks.items() if k.rpartition(".")[2] == "weight"}


def _split(
    tensors: dict[str, torch.Tensor], meta: Mapping[str, str], path: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = {k: t for k, t in tensors.items() if not k.startswith(_SPECIAL)}
    if meta.get("layout", "1") != "1":
        weights = _underlying(weights, tensors, path)
    masks = {k[len(MASK_PREFIX) :]: t for k, t in tensors.items() if k.startswith(MASK_PREFIX)}
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
    weights, file_masks = read(path, expected=set(live), all_masks=True)
    return _install(model, live, weights, file_masks, path)


def load_masks(model: nn.Module, path: str | Path) -> nn.Module:
    """Install the masks of a `save_masks` file on a model holding the masked weights (as
    `from_pretrained` loads them), restoring the values behind them: the model is then as
    `save_masks` saw it."""
    tensors, meta = read_checked(path)
    if meta.get("format") != "prunebound-masks":
        raise ValueError(f"{path}: not a prunebound masks file (format {meta.get('format')!r})")
    live = _live_tensors(model)
    if tensor_masks(model):
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
    modules = dict(model.named_modules())
    layers = maskable_layers(model)  # masks may sit on embeddings and tied layers too
    for key, keep in file_masks.items():
        owner, _, tensor = key.rpartition(".")
        m = modules.get(owner)
        if m is None or not _maskable(m, tensor, owner in layers):
            raise ValueError(
                f"checkpoint {path}: mask for {key!r}, which is not the weight or bias of a "
                "prunable layer (nor a BatchNorm entry) of the model"
            )
        if keep.dtype != torch.bool or keep.shape != original_tensor(m, tensor).shape:
            raise ValueError(
                f"checkpoint {path}: mask {key!r} must be bool with the shape of its tensor"
            )
    with torch.no_grad():
        for k, t in weights.items():
            live[k].copy_(t)
    for owner, m in modules.items():
        prefix = f"{owner}." if owner else ""
        wanted = [t for t in ("weight", "bias") if prefix + t in file_masks]
        drop_masks(m, bake=False, tensors=[t for t in masked_tensors(m) if t not in wanted])
        for part in wanted:  # weight before bias, as `prune` masks them: the parameter order
            set_mask(m, file_masks[prefix + part], tensor=part)  # (optimizer states) is the run's
    return model


def _maskable(module: nn.Module, tensor: str, layer: bool) -> bool:
    """Whether a checkpoint may put a mask on `module.<tensor>`: the weight or bias of a
    maskable layer, or a BatchNorm entry (whole units)."""
    if tensor not in ("weight", "bias") or not (layer or isinstance(module, NORMS)):
        return False
    return isinstance(getattr(module, tensor, None), torch.Tensor)


def import_torch_prune(model: nn.Module) -> nn.Module:
    """Convert `torch.nn.utils.prune` masks (`weight_orig`/`weight_mask`, and `bias_orig`/
    `bias_mask`) into prunebound masks on the same tensors."""
    for m in model.modules():
        for t in ("weight", "bias"):
            orig, keep = getattr(m, f"{t}_orig", None), getattr(m, f"{t}_mask", None)
            if isinstance(orig, torch.Tensor) and isinstance(keep, torch.Tensor):
                orig, keep = orig.detach().clone(), keep.detach().to(torch.bool)
                torch_prune.remove(m, t)  # type: ignore[no-untyped-call]
                with torch.no_grad():
                    original_tensor(m, t).copy_(orig)
                set_mask(m, keep, tensor=t)
    return model


def export_torch_prune(model: nn.Module) -> nn.Module:
    """Convert prunebound masks into `torch.nn.utils.prune`'s `weight_orig`/`weight_mask` form
    (`bias_orig`/`bias_mask`, ... for the bias and BatchNorm masks of whole units)."""
    for m in model.modules():
        names = masked_tensors(m)
        keeps = {t: mm.mask.clone() for t in names if (mm := mask_module(m, t)) is not None}
        drop_masks(m, bake=False)
        for t, keep in keeps.items():
            torch_prune.custom_from_mask(m, t, keep)  # type: ignore[no-untyped-call]
    return model
