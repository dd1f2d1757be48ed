"""Property-based tests (hypothesis) over shapes, dtypes, weight patterns, amounts and methods.

Shapes include 1x1 and 1xn layers and conv kernels 1..7; weights may be quantised (many ties),
all equal, or have all-zero rows (rows that end up empty); dtypes float32/float64/bfloat16/
float16; requests are amounts (0, 1, tiny, near 1, any) or exact counts. Each property runs
`EXAMPLES` examples (`PROPERTIES` lists them; benchmarks/reliability.py reports the product).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunebound as pb

EXAMPLES = 200
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
PATTERNS = ["gaussian", "quantised", "constant", "zero_rows"]
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
RANKING = sorted(k for k, m in pb.METHODS.items() if m.mask is None and not m.coupled)
# in-memory file system where there is one: 200 fsyncs to disk would dominate the run time
_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None


@st.composite
def layers(draw: st.DrawFn, patterns: list[str] = PATTERNS) -> nn.Module:
    """A Linear / Conv1d / Conv2d layer with drawn shape, weight pattern and dtype."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    out_f, in_f = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    if kind == "linear":
        layer: nn.Module = nn.Linear(in_f, out_f)
    elif kind == "conv1d":
        layer = nn.Conv1d(in_f, out_f, draw(st.integers(1, 7)))
    else:
        layer = nn.Conv2d(in_f, out_f, (draw(st.integers(1, 7)), draw(st.integers(1, 7))))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pattern = draw(st.sampled_from(patterns))
    with torch.no_grad():
        w = pb.original_weight(layer)
        if pattern == "gaussian":
            w.copy_(torch.randn(w.shape, generator=g))
        elif pattern == "constant":  # every |w| equal, random signs
            w.copy_(torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1)
        else:  # small integers: ties everywhere, and exact row norms in every dtype
            w.copy_(torch.randint(-3, 4, w.shape, generator=g).float())
            if pattern == "zero_rows":
                w[torch.rand(w.shape[0], generator=g) < 0.5] = 0
    return layer.to(draw(st.sampled_from(DTYPES)))


def _methods_for(layer: nn.Module, names: list[str]) -> list[str]:
    return [
        m
        for m in names
        if isinstance(layer, pb.METHODS[m].layer_types) and not pb.METHODS[m].coupled
    ]


def _units(keep: torch.Tensor, unit: str) -> torch.Tensor:
    """Alive flags per unit: per weight, or per output row."""
    return keep.flatten(1).any(1) if unit == "row" else keep.flatten()


amounts = st.one_of(st.sampled_from([0.0, 1.0, 1e-9, 1 - 1e-9]), st.floats(0.0, 1.0))


def _calibration(layer: nn.Module) -> torch.Tensor:
    """Inputs for the data-aware methods: a few examples in the layer's dtype."""
    w = pb.original_weight(layer)
    spatial = [k + 1 for k in w.shape[2:]]
    x = torch.randn(6, w.shape[1], *spatial, generator=torch.Generator().manual_seed(1))
    return x.to(w.dtype)


def _prune_drawn(data: st.DataObject, layer: nn.Module, method: str, seed: int) -> int | None:
    """Prune by a drawn amount or count; returns the expected number of units pruned (None for
    sampling methods, which are not count-exact)."""
    meth = pb.METHODS[method]
    keep = pb.masks(layer).get("", torch.ones_like(pb.original_weight(layer), dtype=torch.bool))
    alive = int(_units(keep, meth.unit).sum())
    kw = {"data": _calibration(layer)} if meth.needs else {}
    if meth.mask is None and data.draw(st.booleans(), label="by count"):
        k = data.draw(st.integers(0, alive), label="count")
        pb.prune(layer, method, counts={"": k}, seed=seed, **kw)
        return k
    a = data.draw(amounts, label="amount")
    pb.prune(layer, method, a, seed=seed, **kw)
    return round(a * alive) if meth.mask is None else None


@SETTINGS
@given(layer=layers(), data=st.data())
def test_exact_counts_and_masks_only_shrink(layer: nn.Module, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(_methods_for(layer, sorted(pb.METHODS))), label="method")
    unit = pb.METHODS[method].unit
    n = int(_units(torch.ones_like(pb.original_weight(layer), dtype=torch.bool), unit).sum())
    alive = n
    previous = torch.ones_like(pb.original_weight(layer), dtype=torch.bool)
    for call in range(2):
        k = _prune_drawn(data, layer, method, seed=call)
        keep = pb.masks(layer)[""]
        assert keep.shape == previous.shape and keep.dtype == torch.bool
        assert not (keep & ~previous).any(), "a pruned weight came back"
        now = int(_units(keep, unit).sum())
        if k is not None:
            assert alive - now == k, f"{method}: pruned {alive - now} units, asked {k}"
        if unit == "row":  # whole rows go: each row is all kept or all pruned
            rows = keep.flatten(1)
            assert bool((rows.all(1) | ~rows.any(1)).all())
        alive, previous = now, keep.clone()
    assert 0 <= alive <= n


@SETTINGS
@given(layer=layers(["quantised", "constant", "zero_rows"]), data=st.data())
def test_ties_prune_the_first_in_flat_index_order(layer: nn.Module, data: st.DataObject) -> None:
    """Documented tie rule (pruning.py): below the k-th score all go, then ties in flat order."""
    method = data.draw(st.sampled_from(_methods_for(layer, ["filter", "magnitude", "neuron"])))
    meth = pb.METHODS[method]
    w = pb.original_weight(layer).detach()
    assert meth.scores is not None
    scores = meth.scores(w, torch.Generator()).double().flatten()  # exact: integer weights
    k = data.draw(st.integers(0, scores.numel()), label="count")
    twin = copy.deepcopy(layer)
    pb.prune(layer, method, counts={"": k})
    pb.prune(twin, method, counts={"": k}, seed=123)  # no randomness involved: same result
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[torch.sort(scores, stable=True).indices[:k]] = False
    got = _units(pb.masks(layer)[""], meth.unit)
    assert torch.equal(got, expected)
    assert torch.equal(pb.masks(twin)[""], pb.masks(layer)[""])


@SETTINGS
@given(
    first=layers(["quantised", "constant"]),
    second=layers(["quantised", "constant"]),
    amount=amounts,
)
def test_global_ties_follow_layer_then_flat_index_order(
    first: nn.Module, second: nn.Module, amount: float
) -> None:
    net = nn.ModuleDict({"a": first, "b": second})  # dtypes may differ
    flat = [pb.original_weight(m).detach().double().abs().flatten() for m in net.values()]
    scores = torch.cat(flat)
    k = round(amount * scores.numel())
    pb.prune(net, "magnitude", amount, scope="global")
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[torch.sort(scores, stable=True).indices[:k]] = False
    masks = pb.masks(net)
    got = torch.cat([masks[name].flatten() for name in ("a", "b")])
    assert torch.equal(got, expected)


def _forward_plain(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, w, layer.bias)
    if isinstance(layer, nn.Conv1d):
        return nn.functional.conv1d(x, w, layer.bias)
    return nn.functional.conv2d(x, w, layer.bias)


@SETTINGS
@given(layer=layers(), data=st.data())
def test_masked_layer_equals_plain_layer_with_zeroed_weights(
    layer: nn.Module, data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(_methods_for(layer, sorted(pb.METHODS))), label="method")
    w = pb.original_weight(layer)
    spatial = [k + data.draw(st.integers(0, 2)) for k in w.shape[2:]]  # small: fast half convs
    x = torch.randn(2, w.shape[1], *spatial, generator=torch.Generator().manual_seed(0))
    x = x.to(w.dtype)
    _prune_drawn(data, layer, method, seed=3)
    keep = pb.masks(layer)[""]
    w_zeroed = w.detach() * keep
    assert torch.equal(layer.weight, w_zeroed)
    out = layer(x)
    assert torch.equal(out, _forward_plain(layer, x, w_zeroed))
    empty = ~keep.flatten(1).any(1)  # rows with no weight left output their bias alone
    bias = layer.bias.detach()[empty].view(1, -1, *([1] * len(spatial)))
    assert torch.equal(out[:, empty], bias.expand_as(out[:, empty]))


@SETTINGS
@given(layer=layers(), data=st.data())
def test_save_load_identity(layer: nn.Module, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(_methods_for(layer, sorted(pb.METHODS))), label="method")
    twin = copy.deepcopy(layer)  # same architecture, other values and another mask (or none)
    with torch.no_grad():
        pb.original_weight(twin).add_(1)
    if data.draw(st.booleans(), label="twin pruned"):
        pb.prune(twin, "random", 0.5, seed=9)
    for call in range(data.draw(st.integers(1, 2), label="calls")):
        _prune_drawn(data, layer, method, seed=call)
    with tempfile.TemporaryDirectory(dir=_TMP) as d:
        pb.load(twin, pb.save(layer, Path(d) / "m.safetensors"))
    assert pb.masks(twin).keys() == pb.masks(layer).keys()
    assert torch.equal(pb.masks(twin)[""], pb.masks(layer)[""])
    assert torch.equal(pb.original_weight(twin), pb.original_weight(layer))
    assert torch.equal(twin.weight, layer.weight)
    assert pb.original_weight(twin).dtype == pb.original_weight(layer).dtype


PROPERTIES = [
    test_exact_counts_and_masks_only_shrink,
    test_ties_prune_the_first_in_flat_index_order,
    test_global_ties_follow_layer_then_flat_index_order,
    test_masked_layer_equals_plain_layer_with_zeroed_weights,
    test_save_load_identity,
]
