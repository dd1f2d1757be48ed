"""What torch's parametrizations lack for pruning masks: pickling and an inference cache.

`torch.save(model)` / `pickle` of a parametrized module raises ("Serialization of parametrized
modules is only supported through state_dict()"): torch gives the module a class made on the
fly, which pickle cannot name. `make_picklable` gives that class a `__reduce_ex__` that stores
the plain class, the module's state and its parametrizations, and `rebuild` re-registers them
on load, so a pickled pruned model comes back pruned (same masks, same underlying weights, and
tied parameters stay tied). `copy.deepcopy` keeps torch's own path.

`masked_product` is the forward of a mask parametrization: `weight * mask`, computed once and
reused while neither tensor changes when autograd is off (eval under `torch.no_grad()` or
`torch.inference_mode()`); with autograd on, or while a graph is captured (`torch.onnx.export`,
`torch.compile`), it is recomputed every call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

_CACHE_ATTR = "_prunebound_cache"


def _key(t: torch.Tensor) -> tuple[int, int, int]:
    """What changes when a tensor's values may have: its object, storage and version counter."""
    return id(t), t.data_ptr(), t._version


def _capturing() -> bool:
    """A graph is being captured (tracing, `torch.export`, `torch.compile`): no caching, so
    the graph computes the product and no traced or fake tensor is kept."""
    tracing: bool = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
    return tracing or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def masked_product(holder: nn.Module, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`weight * mask`, cached on `holder` while autograd is off and neither tensor changed.

    The cache keeps references to both tensors, so their ids cannot be reused while it lives;
    an in-place update (an optimizer step, `copy_`, `load_state_dict`) bumps the version counter,
    a `.data` swap changes the storage, and a new mask is a new tensor: each invalidates it.
    """
    if torch.is_grad_enabled() or _capturing():
        holder.__dict__.pop(_CACHE_ATTR, None)
        return weight * mask
    key = (_key(weight), _key(mask))
    hit = holder.__dict__.get(_CACHE_ATTR)
    if hit is not None and hit[0] == key:
        cached: torch.Tensor = hit[3]
        return cached
    out = weight * mask
    holder.__dict__[_CACHE_ATTR] = (key, weight, mask, out)
    return out


def drop_cache(state: dict[str, Any]) -> dict[str, Any]:
    """`state` (a module's `__dict__`) without the inference cache, for pickling."""
    return {k: v for k, v in state.items() if k != _CACHE_ATTR}


def rebuild(
    cls: type[nn.Module],
    state: dict[str, Any],
    parametrizations: dict[str, tuple[torch.Tensor, list[nn.Module]]],
) -> nn.Module:
    """Inverse of the `__reduce_ex__` installed by `make_picklable`."""
    module = cls.__new__(cls)
    module.__dict__.update(state)
    for name, (original, plist) in parametrizations.items():
        module._parameters[name] = original  # type: ignore[assignment]
        for p in plist:
            parametrize.register_parametrization(module, name, p, unsafe=True)
    make_picklable(module)
    return module


def _reduce_ex(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
    owner: Any = self
    plists: dict[str, Any] = dict(owner.parametrizations.items())
    stored: dict[str, tuple[torch.Tensor, list[nn.Module]]] = {}
    for name, plist in plists.items():
        parts = list(plist)
        if not plist.is_tensor or any(hasattr(p, "right_inverse") for p in parts):
            raise RuntimeError(
                f"cannot pickle {type(self).__name__}: its parametrization of {name!r} is not a "
                "prunebound mask; save its state_dict() instead"
            )
        stored[name] = (plist.original, parts)
    state = dict(self.__dict__)
    state["_modules"] = {k: v for k, v in self._modules.items() if k != "parametrizations"}
    base = type(self).__bases__[0]
    return rebuild, (base, state, stored)


def _cached_getter(name: str, torch_get: Any) -> Any:
    """A getter for the parametrized `name` that returns the cached product straight away
    (a few dict look-ups) when autograd is off and the cache is valid; else torch's getter.
    torch's path costs ~7 us per access (two module calls), a lot next to a small layer."""

    def get(module: nn.Module) -> torch.Tensor:
        if not torch.is_grad_enabled() and not _capturing():
            plist: Any = module._modules["parametrizations"]._modules[name]  # type: ignore[union-attr]
            if len(plist._modules) == 1:  # a mask alone (its product is the weight)
                mm: Any = plist._modules["0"]
                hit = mm.__dict__.get(_CACHE_ATTR)
                if hit is not None and hit[0] == (
                    _key(plist._parameters["original"]),
                    _key(mm._buffers["mask"]),
                ):
                    out: torch.Tensor = hit[3]
                    return out
        result: torch.Tensor = torch_get(module)
        return result

    return get


def make_picklable(module: nn.Module) -> None:
    """Let `pickle` / `torch.save` store a module that `register_parametrization` has changed,
    and give its masked tensors the fast cached getter (`_cached_getter`)."""
    cls = type(module)
    if not parametrize.is_parametrized(module):
        return
    if "__reduce_ex__" not in vars(cls):
        cls.__reduce_ex__ = _reduce_ex  # type: ignore[method-assign,assignment]
    owner: Any = module
    for name in owner.parametrizations:
        prop = vars(cls).get(name)
        if isinstance(prop, property) and not getattr(prop.fget, "_prunebound", False):
            getter = _cached_getter(name, prop.fget)
            getter._prunebound = True
            setattr(cls, name, property(getter, prop.fset))
