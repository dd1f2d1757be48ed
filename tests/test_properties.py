"""Property-based tests (hypothesis) over shapes, dtypes, amounts and methods."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunebound as pb

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers(draw: st.DrawFn) -> nn.Module:
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    out_f, in_f = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    if kind == "linear":
        layer: nn.Module = nn.Linear(in_f, out_f)
    elif kind == "conv1d":
        layer = nn.Conv1d(in_f, out_f, draw(st.integers(1, 7)))
    else:
        layer = nn.Conv2d(in_f, out_f, (draw(st.integers(1, 7)), draw(st.integers(1, 7))))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        w = pb.original_weight(layer)
        if draw(st.booleans()):  # quantised weights: many ties
            w.copy_(torch.randint(-3, 4, w.shape, generator=g).float())
        else:
            w.copy_(torch.randn(w.shape, generator=g))
    return layer.to(draw(st.sampled_from(DTYPES)))


amounts = st.one_of(st.sampled_from([0.0, 1.0, 1e-9, 1 - 1e-9]), st.floats(0.0, 1.0))


@SETTINGS
@given(layer=layers(), a1=amounts, a2=amounts, method=st.sampled_from(["magnitude", "random"]))
def test_exact_counts_and_masks_only_shrink(
    layer: nn.Module, a1: float, a2: float, method: str
) -> None:
    n = pb.original_weight(layer).numel()
    pb.prune(layer, method, a1, seed=0)
    first = pb.masks(layer)[""].clone()
    assert int((~first).sum()) == round(a1 * n)
    pb.prune(layer, method, a2, seed=1)
    second = pb.masks(layer)[""]
    alive = int(first.sum())
    assert int(second.sum()) == alive - round(a2 * alive)
    assert not (second & ~first).any()


@SETTINGS
@given(layer=layers(), amount=amounts, method=st.sampled_from(sorted(pb.METHODS)))
def test_masked_layer_equals_plain_layer_with_zeroed_weights(
    layer: nn.Module, amount: float, method: str
) -> None:
    if not isinstance(layer, pb.METHODS[method].layer_types):
        return
    dtype = pb.original_weight(layer).dtype
    shape_in = pb.original_weight(layer).shape[1]
    x = torch.randn(2, shape_in, *([9] * (pb.original_weight(layer).dim() - 2))).to(dtype)
    pb.prune(layer, method, amount, seed=3)
    keep = pb.masks(layer)[""]
    w_zeroed = pb.original_weight(layer).detach() * keep
    assert torch.equal(layer.weight, w_zeroed)
    if isinstance(layer, nn.Linear):
        ref = nn.functional.linear(x, w_zeroed, layer.bias)
    elif isinstance(layer, nn.Conv1d):
        ref = nn.functional.conv1d(x, w_zeroed, layer.bias)
    else:
        ref = nn.functional.conv2d(x, w_zeroed, layer.bias)
    assert torch.equal(layer(x), ref)


@SETTINGS
@given(layer=layers(), amount=amounts)
def test_save_load_identity(layer: nn.Module, amount: float) -> None:
    twin = copy.deepcopy(layer)  # same architecture, dense
    with torch.no_grad():
        pb.original_weight(twin).add_(1)
    pb.prune(layer, "magnitude", amount)
    with tempfile.TemporaryDirectory() as d:
        pb.load(twin, pb.save(layer, Path(d) / "m.safetensors"))
    assert torch.equal(pb.masks(twin)[""], pb.masks(layer)[""])
    assert torch.equal(pb.original_weight(twin), pb.original_weight(layer))
    assert torch.equal(twin.weight, layer.weight)
