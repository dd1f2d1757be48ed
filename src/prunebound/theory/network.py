"""The theory's view of a feed-forward model (docs/theory.md §7.3).

A chain of steps, each an affine prunable layer (Linear, Conv1d, Conv2d) or a map phi with
||phi(x) - phi(y)|| <= L ||x - y|| and ||phi(0)|| = c (activations, pooling, eval BatchNorm,
Flatten, Dropout). Anything else, residual graphs included, is refused naming the module.
Derived for prunebound in the setting of Qian & Klabjan (2021).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

from prunebound._masks import Mask, effective_weight, original_tensor, original_weight, reset
from prunebound.layer_types import NORMS
from prunebound.theory.lipschitz import (
    ELEMENTWISE_1,
    POOLS,
    batchnorm_gap,
    step_lipschitz,
    unsupported,
)
from prunebound.theory.oracles import out_positions
from prunebound.theory.values import LayerKind, LayerSpec

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: the tensors a prunebound mask may sit on and the theory still models (docs §7.3)
_MASKABLE = frozenset({"weight", "bias"})


@dataclass(frozen=True)
class Step:
    """One step of the chain.

    Prunable layers have `spec` set. For the others, `lipschitz` L and `offset` c = ||phi(0)||
    give ||phi(x) - phi(y)|| <= L ||x - y|| and ||phi(x)|| <= L ||x|| + c for the reference F.
    `module` is the pruned network f's module; F's is `reference` when given (another model of
    the same shapes, e.g. the one a shrunk model came from), else `module` with its masks
    removed. `pruned_map` is set for a BatchNorm that f and F compute differently (masked
    entries): `lipschitz.batchnorm_gap`'s (L~, c~, max |s - s~|, ||t - t~|| sqrt(positions)).
    """

    name: str
    module: nn.Module
    spec: LayerSpec | None = None
    lipschitz: float = 1.0
    offset: float = 0.0
    in_shape: tuple[int, ...] = ()
    reference: nn.Module | None = None
    pruned_map: tuple[float, float, float, float] | None = None

    @property
    def target(self) -> nn.Module:
        """F's module: `reference`, or `module` (read through its masks)."""
        return self.module if self.reference is None else self.reference

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, W~): F's unmasked weight and f's weight as it computes (equal if unpruned)."""
        if self.spec is None:
            raise ValueError(f"step {self.name!r} is not a prunable layer")
        return original_weight(self.target).detach(), effective_weight(self.module).detach()

    def biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(b, b~): F's unmasked bias and f's bias as it computes (None where absent)."""
        has_bias = isinstance(getattr(self.target, "bias", None), torch.Tensor)
        b = original_tensor(self.target, "bias") if has_bias else None
        bt = getattr(self.module, "bias", None)
        return (
            None if b is None else b.detach(),
            bt.detach() if isinstance(bt, torch.Tensor) else None,
        )

    def bias_norms(self) -> tuple[float, float, float]:
        """(||b||, ||b~||, ||b - b~||) as seen in the output (a bias repeats at every output
        position): F's unmasked bias, f's bias as it computes (masked entries 0), their gap."""
        b, bt = self.biases()
        assert self.spec is not None
        reps = math.sqrt(out_positions(self.spec)) * (1 + 1e-12)
        zero = torch.zeros(self.spec.shape[0], dtype=torch.float64)
        b64 = zero if b is None else b.double()
        bt64 = zero if bt is None else bt.double()
        norm_b, norm_bt, norm_gap = (
            float(torch.linalg.vector_norm(v)) * reps for v in (b64, bt64, b64 - bt64)
        )
        return norm_b, norm_bt, norm_gap


@dataclass(frozen=True)
class Network:
    """A model as a chain of steps, with the sample shape it was traced on."""

    steps: tuple[Step, ...]
    input_shape: tuple[int, ...]

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        """LayerSpecs of the prunable layers, in order."""
        return tuple(s.spec for s in self.steps if s.spec is not None)

    @property
    def lipschitz(self) -> tuple[float, ...]:
        """Per prunable layer: the product of the Lipschitz constants of the maps after it and
        before the next prunable layer (the `lipschitz` argument of `propagate`)."""
        out: list[float] = []
        for s in self.steps:
            if s.spec is not None:
                out.append(1.0)
            elif out:
                out[-1] *= s.lipschitz
        return tuple(out)

    @property
    def offsets(self) -> tuple[float, ...]:
        """||phi(0)|| of each non-prunable step, in order (nonzero for Sigmoid, BatchNorm)."""
        return tuple(s.offset for s in self.steps if s.spec is None)


# What a leaf's class may define on top of the torch class the theory models: nothing that
# changes what it computes (a subclass adding, say, `reset_parameters` is still that class).
_INERT = frozenset(
    {
        "__init__",
        "reset_parameters",
        "extra_repr",
        "__module__",
        "__qualname__",
        "__doc__",
        "__annotations__",
        "__dict__",
        "__weakref__",
        "__firstlineno__",
        "__static_attributes__",
    }
)


def _unmodelled(name: str, m: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"layer {name!r} ({type(m).__name__}) {why}; the theory models only the plain forward of "
        "the torch classes it supports, so it refuses to certify this model"
    )


def _modelled_class(name: str, m: nn.Module, supported: tuple[type[nn.Module], ...]) -> type:
    """The torch class whose plain forward `m` computes, or ValueError naming what differs.

    Refused: forward hooks or pre-hooks (torch.nn.utils.prune recomputes `weight` in one), an
    instance-level `forward`, parametrizations other than prunebound's weight mask, and
    subclasses that define anything but inert methods (`_INERT`) on top of a supported class.
    """
    if m._forward_hooks or m._forward_pre_hooks:
        hint = (
            "; convert torch.nn.utils.prune masks first with prunebound.import_torch_prune"
            if hasattr(m, "weight_orig")
            else ""
        )
        raise _unmodelled(name, m, f"has forward hooks or pre-hooks{hint}")
    if "forward" in vars(m):
        raise _unmodelled(name, m, "has an instance-level forward")
    cls: type = type(m)
    if parametrize.is_parametrized(m):
        plists = getattr(m, "parametrizations")  # noqa: B009
        if not set(plists) <= _MASKABLE or not all(
            isinstance(p, Mask) for plist in plists.values() for p in plist
        ):
            raise _unmodelled(
                name, m, "has a parametrization other than prunebound's weight and bias masks"
            )
        cls = cls.__bases__[0]  # the class parametrize derived the module's class from
    for c in cls.__mro__:
        if c in supported:
            return c
        extra = set(vars(c)) - _INERT
        if extra:
            raise _unmodelled(name, m, f"is a subclass defining {sorted(extra)}")
    raise unsupported(name, m)


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(path, module) of every step of the chain, in order, repeated modules included (the
    chain of `Sequential.forward` calls each entry of `_modules`, even one instance twice)."""
    if isinstance(model, nn.Sequential):
        _modelled_class(prefix or "<model>", model, (nn.Sequential,))
        out: list[tuple[str, nn.Module]] = []
        for name, child in model._modules.items():
            if child is not None:
                out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or "<model>", model)]


def _spec(name: str, m: nn.Module, in_shape: tuple[int, ...]) -> LayerSpec:
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    shape = tuple(int(s) for s in weight.shape)
    has_bias = getattr(m, "bias", None) is not None
    if isinstance(m, nn.Linear):
        return LayerSpec(name, "linear", shape, in_shape, bias=has_bias)
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise unsupported(name, m, " unless groups=1 and numeric zero padding")
    kind: LayerKind = "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
    pad = tuple(int(p) for p in m.padding)
    return LayerSpec(name, kind, shape, in_shape, tuple(m.stride), pad, tuple(m.dilation), has_bias)


def extract(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    reference: nn.Module | None = None,
) -> Network:
    """The chain of steps of `model` (nn.Sequential, possibly nested, or one prunable layer).

    Input shapes come from a dry run on zeros of shape (1, *input_shape). For a model whose
    first prunable layer is a Linear (and no conv), `input_shape` defaults to (in_features,).
    `reference`: the model F to compare with (same chain, same shapes; its masks removed),
    instead of `model` with its masks removed.

    Raises:
        ValueError: an unsupported module (named by path and type), no prunable layer, a conv
            model without `input_shape`, an input_shape the model cannot run on, or a
            `reference` whose chain differs (named).
    """
    if _global_hooks():
        raise ValueError(
            "global forward hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook): the model may not compute its plain chain; "
            "remove them to certify"
        )
    leaves = _leaves(model)
    seen: dict[int, str] = {}
    for name, m in leaves:  # refuse before running anything
        _modelled_class(name, m, _SUPPORTED)
        if isinstance(m, _PRUNABLE):
            _spec(name, m, ())
            if id(m) in seen:
                raise ValueError(
                    f"layer {name!r} ({type(m).__name__}) is the same module instance as layer "
                    f"{seen[id(m)]!r}: a prunable layer applied twice shares one mask, which "
                    "the theory does not model; use two layers"
                )
            seen[id(m)] = name
        if isinstance(m, nn.MaxPool1d | nn.MaxPool2d) and m.return_indices:
            raise unsupported(name, m, " with return_indices=True")
    if not any(isinstance(m, _PRUNABLE) for _, m in leaves):
        raise ValueError("model must contain a Linear/Conv1d/Conv2d layer, got none")
    if input_shape is None:
        if any(isinstance(m, nn.Conv1d | nn.Conv2d) for _, m in leaves):
            raise ValueError("input_shape is required for convolutional models, got None")
        first = next(m for _, m in leaves if isinstance(m, nn.Linear))
        assert isinstance(first, nn.Linear)
        input_shape = (first.in_features,)
    shape_in = tuple(int(s) for s in input_shape)
    if not shape_in or any(s < 1 for s in shape_in):
        raise ValueError(f"input_shape must be positive ints, got {tuple(input_shape)}")
    p = next(model.parameters())
    x = torch.zeros((1, *shape_in), dtype=p.dtype, device=p.device)
    refs = _reference_leaves(leaves, reference, shape_in)
    steps: list[Step] = []
    with torch.no_grad():
        for (name, m), ref in zip(leaves, refs, strict=True):
            shape = tuple(int(s) for s in x.shape[1:])
            if isinstance(m, _PRUNABLE):
                spec = _spec(name, m, shape)
                if ref is not None and replace(_spec(name, ref, shape), bias=spec.bias) != spec:
                    raise _mismatch(name, m, ref)
                steps.append(Step(name, m, spec, in_shape=shape, reference=ref))
            else:
                target = m if ref is None else ref
                lip, off = step_lipschitz(name, target, shape)
                bn = isinstance(m, NORMS)
                gap = batchnorm_gap(name, m, target, shape) if bn else None
                steps.append(Step(name, m, None, lip, off, shape, ref, gap))
            try:
                x = m(x)
            except RuntimeError as err:
                msg = f"input_shape {shape_in} does not fit layer {name!r}: {err}"
                raise ValueError(msg) from err
    net = Network(tuple(steps), shape_in)
    _check_chain(model, net)
    return net


def _mismatch(name: str, m: nn.Module, ref: nn.Module) -> ValueError:
    return ValueError(
        f"layer {name!r}: the model has {m!r} where the reference has {ref!r}; a reference "
        "must be the same chain with the same shapes (expand a shrunk model first)"
    )


def _reference_leaves(
    leaves: list[tuple[str, nn.Module]], reference: nn.Module | None, shape: tuple[int, ...]
) -> list[nn.Module | None]:
    """The reference's module for each step (None without a reference), after checking that
    the reference, with its masks removed, is a chain the theory models exactly."""
    if reference is None:
        return [None] * len(leaves)
    extract(reset(copy.deepcopy(reference)), shape)  # every check of the reference itself
    ref_leaves = _leaves(reference)
    if [n for n, _ in ref_leaves] != [n for n, _ in leaves]:
        raise ValueError(
            f"the reference's layers {[n for n, _ in ref_leaves]} are not the model's "
            f"{[n for n, _ in leaves]}"
        )
    for (name, m), (_, ref) in zip(leaves, ref_leaves, strict=True):
        if _base(m) is not _base(ref) or (
            not isinstance(m, _PRUNABLE + NORMS) and repr(m) != repr(ref)
        ):
            raise _mismatch(name, m, ref)
    return [ref for _, ref in ref_leaves]


def _base(m: nn.Module) -> type:
    """The supported torch class `m` computes as (through a parametrized class)."""
    return next(c for c in type(m).__mro__ if c in _SUPPORTED or c is nn.Sequential)


_KNOWN = {
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
    nn.LeakyReLU,
    nn.ELU,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
}


_SUPPORTED: tuple[type[nn.Module], ...] = (*_PRUNABLE, *POOLS, *ELEMENTWISE_1, *_KNOWN)


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def step_forward(step: Step, x: torch.Tensor) -> torch.Tensor:
    """The step as the theory models it: the layer's functional form with its effective weight
    and bias, or the plain forward of its torch class (no hooks, no overrides)."""
    m = step.module
    if step.spec is None:
        cls = next(c for c in type(m).__mro__ if c in _SUPPORTED)
        out: torch.Tensor = cls.forward(m, x)
        return out
    w = effective_weight(m)
    b = getattr(m, "bias", None)
    spec = step.spec
    if spec.kind == "linear":
        return nnf.linear(x, w, b)
    conv = nnf.conv1d if spec.kind == "conv1d" else nnf.conv2d
    return conv(x, w, b, spec.stride, spec.padding, spec.dilation)


def _check_chain(model: nn.Module, net: Network) -> None:
    """Refuse a model whose output differs from the chain the theory models (a last line of
    defence behind the type and hook checks: anything they missed shows up here)."""
    p = next(model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((2, *net.input_shape), generator=g, dtype=torch.float64).to(p)
    with torch.no_grad():
        y = model(x)
        z = x
        for step in net.steps:
            z = step_forward(step, z)
    if not isinstance(y, torch.Tensor) or y.shape != z.shape:
        raise ValueError(
            f"model output ({type(y).__name__} {getattr(y, 'shape', '')}) differs from the chain "
            f"of its layers ({tuple(z.shape)}): the theory refuses to certify it"
        )
    tol = 1e-3 if p.dtype in (torch.float16, torch.bfloat16) else 1e-5
    scale = float(z.abs().max()) + 1.0
    if not torch.allclose(y, z, rtol=tol, atol=tol * scale):
        raise ValueError(
            "model output differs from the chain of its layers as the theory models them "
            f"(max deviation {float((y - z).abs().max()):.3g}): a custom forward, hook or "
            "override changes what it computes; the theory refuses to certify it"
        )
