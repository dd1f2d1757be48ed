"""Contract test over every registered method (scikit-learn's parametrize_with_checks idea)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_cnn, make_mlp
from torch import nn

import prunebound as pb
from prunebound.methods import Method, get_method
from prunebound.outputs import leave_outputs, output_layers


def _model_for(method: Method) -> nn.Module:
    return make_cnn() if method.layer_types[0] is nn.Conv1d else make_mlp()


def _layers_for(model: nn.Module, method: Method) -> dict[str, nn.Module]:
    """The layers `prune` selects by default: structured methods leave the output layer alone."""
    layers = pb.prunable_layers(model, types=method.layer_types)
    return leave_outputs(model, layers, None)[0] if method.unit == "row" else layers


#: methods for any model; "head" (HF attention heads only) has its contract in tests/test_heads.py,
#: the coupled-only group norms theirs in tests/test_group_norm.py
GENERIC = sorted(n for n, m in pb.METHODS.items() if n != "head" and not m.coupled)


def _calibration(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shape = (40, 1, 7, 7) if isinstance(model[0], nn.Conv2d) else (40, model[0].in_features)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (40,), generator=g)


def _prune(model: nn.Module, name: str, *args: object, **kw: object) -> nn.Module:
    """`pb.prune`, with calibration data for the methods that need it."""
    if pb.METHODS[name].needs:
        kw["data"] = _calibration(model)
    return pb.prune(model, name, *args, **kw)  # type: ignore[arg-type]


def _pruned_counts(model: nn.Module) -> dict[str, int]:
    return {k: int((~v).sum()) for k, v in pb.masks(model).items()}


@pytest.mark.parametrize("name", GENERIC)
def test_mask_is_bool_weight_shaped_and_forward_is_masked(name: str) -> None:
    method = pb.METHODS[name]
    model = _model_for(method)
    _prune(model, name, 0.4, seed=0)
    layers = _layers_for(model, method)
    assert set(pb.masks(model)) == set(layers)
    if method.unit == "row":  # the output layer is left alone (issue 10 item 1)
        assert output_layers(model)[0] not in pb.masks(model)
    for lname, m in layers.items():
        keep = pb.masks(model)[lname]
        assert keep.dtype == torch.bool
        assert keep.shape == m.weight.shape
        assert torch.equal(m.weight, pb.original_weight(m) * keep)


@pytest.mark.parametrize("name", [n for n in GENERIC if pb.METHODS[n].mask is None])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_counts(name: str, scope: str) -> None:
    method = pb.METHODS[name]
    model = _model_for(method)
    layers = _layers_for(model, method)
    _prune(model, name, 0.3, scope=scope, seed=1)
    counts = _pruned_counts(model)
    if method.unit == "row":
        rows = {n: int((~pb.masks(model)[n]).flatten(1).all(1).sum()) for n in layers}
        units = {n: m.weight.shape[0] for n, m in layers.items()}
        pruned = rows
    else:
        units = {n: m.weight.numel() for n, m in layers.items()}
        pruned = counts
    if scope == "layer":
        assert pruned == {n: round(0.3 * u) for n, u in units.items()}
    else:
        assert sum(pruned.values()) == round(0.3 * sum(units.values()))


@pytest.mark.parametrize("name", GENERIC)
def test_masks_only_shrink_and_prune_among_survivors(name: str) -> None:
    method = pb.METHODS[name]
    model = _model_for(method)
    _prune(model, name, 0.3, seed=2)
    before = {k: v.clone() for k, v in pb.masks(model).items()}
    _prune(model, name, 0.5, seed=3)
    for k, after in pb.masks(model).items():
        assert not (after & ~before[k]).any(), "a pruned weight was revived"
    if method.mask is None and method.unit == "weight":
        for k, after in pb.masks(model).items():
            alive = int(before[k].sum())
            assert int(after.sum()) == alive - round(0.5 * alive)


@pytest.mark.parametrize("name", GENERIC)
def test_same_generator_seed_same_mask(name: str) -> None:
    method = pb.METHODS[name]
    a, b = _model_for(method), _model_for(method)
    _prune(a, name, 0.5, seed=torch.Generator().manual_seed(7))
    _prune(b, name, 0.5, seed=7)
    for k, v in pb.masks(a).items():
        assert torch.equal(v, pb.masks(b)[k])


@pytest.mark.parametrize("name", GENERIC)
def test_bad_amount_leaves_model_unchanged(name: str) -> None:
    model = _model_for(pb.METHODS[name])
    _prune(model, name, 0.2, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="amount must be in"):
            _prune(model, name, bad)
    with pytest.raises(TypeError, match="amount must be a float"):
        _prune(model, name, 1)  # type: ignore[arg-type]
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in state.items())


def test_random_is_uniform_over_positions() -> None:
    # Each of 20 positions pruned with prob 1/4 by "random" exact-count 5 of 20: frequency check.
    hits = torch.zeros(20)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        lin = nn.Linear(20, 1)
        pb.prune(lin, "random", 0.25, seed=g)
        hits += (~pb.masks(lin)[""]).flatten().float()
    freq = hits / 2000
    assert torch.all((freq - 0.25).abs() < 0.04), freq  # 4.1 sigma of a binomial(2000, .25) freq


def test_bernoulli_count_is_binomial() -> None:
    lin = nn.Linear(100, 100)
    pb.prune(lin, "bernoulli", 0.3, seed=0)
    pruned = int((~pb.masks(lin)[""]).sum())
    assert abs(pruned - 3000) < 4 * (10000 * 0.3 * 0.7) ** 0.5


def test_structured_neuron_l1_vs_l2_and_rows() -> None:
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        # rows: L1 norms 3, 2.9, 10, 4 ; L2 norms 1.73, 2.9, 10, 2.31
        lin.weight.copy_(torch.tensor([[1.0, 1, 1], [2.9, 0, 0], [10, 0, 0], [0, 2, 2]]))
    a = pb.prune(_copy(lin), pb.methods.neuron(norm=1), 0.25)
    b = pb.prune(_copy(lin), "neuron", 0.25)
    assert (~pb.masks(a)[""]).all(1).tolist() == [False, True, False, False]
    assert (~pb.masks(b)[""]).all(1).tolist() == [True, False, False, False]
    # the same through the `norm` argument and the registry keys
    for m in (
        pb.prune(_copy(lin), "neuron", 0.25, norm=1),
        pb.prune(_copy(lin), "neuron_l1", 0.25),
    ):
        assert torch.equal(pb.masks(m)[""], pb.masks(a)[""])
    assert torch.equal(pb.masks(pb.prune(_copy(lin), "neuron", 0.25, norm=2))[""], pb.masks(b)[""])
    before = _copy(lin)
    with pytest.raises(ValueError, match="norm applies to the structured methods"):
        pb.prune(before, "magnitude", 0.25, norm=1)
    with pytest.raises(ValueError, match="norm must be 1 or 2, got 3"):
        pb.prune(before, "neuron", 0.25, norm=3)
    assert pb.masks(before) == {}


def test_filter_l1_prunes_the_filter_of_smallest_l1_norm() -> None:
    conv = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():
        # filters: L1 norms 4, 3.5, 8 ; L2 norms 2, 3.5, 4
        conv.weight.copy_(
            torch.tensor([[1.0, 1, 1, 1], [3.5, 0, 0, 0], [2, 2, 2, 2]]).view(3, 1, 2, 2)
        )
    c1, c2 = nn.Conv2d(1, 3, 2, bias=False), nn.Conv2d(1, 3, 2, bias=False)
    c1.load_state_dict(conv.state_dict())
    c2.load_state_dict(conv.state_dict())
    pruned_l1 = (~pb.masks(pb.prune(c1, "filter", 1 / 3, norm=1))[""]).flatten(1).all(1)
    pruned_l2 = (~pb.masks(pb.prune(c2, "filter", 1 / 3))[""]).flatten(1).all(1)
    assert pruned_l1.tolist() == [False, True, False]
    assert pruned_l2.tolist() == [True, False, False]


def test_score_function_of_the_weight_alone() -> None:
    lin = nn.Linear(4, 2)
    pb.prune(lin, Method("neg_abs", scores=lambda w: -w.abs()), 0.25)  # largest |w| first
    top = lin.parametrizations.weight.original.detach().abs().flatten().topk(2).indices
    assert sorted((~pb.masks(lin)[""]).flatten().nonzero().flatten().tolist()) == sorted(
        top.tolist()
    )
    with pytest.raises(
        TypeError,
        match=r"expected scores\(weight\[, generator\[, layer\]\]\), got a function taking 4",
    ):
        Method("bad", scores=lambda w, g, x, y: w)
    with pytest.raises(TypeError, match=r"expected mask\(weight, amount, generator\)"):
        Method("bad", mask=lambda w: w > 0)


def _copy(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features)
    out.load_state_dict(lin.state_dict())
    return out


def test_register_custom_method_one_function_one_line() -> None:
    def last_column_first(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return -torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)

    pb.register_method(Method("reverse_order", scores=last_column_first), overwrite=True)
    try:
        lin = nn.Linear(4, 2)
        pb.prune(lin, "reverse_order", 0.25)
        assert (~pb.masks(lin)[""]).flatten().tolist() == [False] * 6 + [True] * 2
        with pytest.raises(ValueError, match="already registered"):
            pb.register_method(Method("reverse_order", scores=last_column_first))
    finally:
        del pb.METHODS["reverse_order"]


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("smallest")


def test_method_definition_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Method("x")
    with pytest.raises(ValueError, match="norm must be 1 or 2"):
        pb.methods.neuron(3)
