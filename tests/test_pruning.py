"""`prune`: oracle tests against torch.nn.utils.prune, ties, selection, plans and bad input."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from helpers import make_cnn, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as tp

import prunebound as pb
from prunebound.data import load_digits
from prunebound.outputs import output_layers
from prunebound.theory import LayerSpec
from prunebound.training.loop import TrainConfig, train


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(v, now[k]) for k, v in state.items())


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_layer_magnitude_equals_torch_l1_unstructured(amount: float) -> None:
    ours, ref = make_cnn(), make_cnn()
    pb.prune(ours, "magnitude", amount)
    for name, m in pb.prunable_layers(ref).items():
        tp.l1_unstructured(m, "weight", amount=amount)
        assert torch.equal(pb.masks(ours)[name], m.weight_mask.bool()), name


@pytest.mark.parametrize("amount", [0.2, 0.75, 0.95])
def test_global_magnitude_equals_torch_global_unstructured(amount: float) -> None:
    ours, ref = make_mlp(1, (40, 30, 20, 5)), make_mlp(1, (40, 30, 20, 5))
    pb.prune(ours, "magnitude", amount, scope="global")
    params = [(m, "weight") for m in pb.prunable_layers(ref).values()]
    tp.global_unstructured(params, pruning_method=tp.L1Unstructured, amount=amount)
    for (m, _), keep in zip(params, pb.masks(ours).values(), strict=True):
        assert torch.equal(keep, m.weight_mask.bool())


def test_random_count_equals_torch_random_unstructured_count() -> None:
    ours, ref = make_mlp(), make_mlp()
    pb.prune(ours, "random", 0.35, seed=0)
    for name, m in pb.prunable_layers(ref).items():
        tp.random_unstructured(m, "weight", amount=0.35)
        assert int((~pb.masks(ours)[name]).sum()) == int((m.weight_mask == 0).sum())


def test_iterative_matches_torch_pruning_container() -> None:
    ours, ref = make_mlp(), make_mlp()
    for amount in (0.5, 0.5, 0.3):
        pb.prune(ours, "magnitude", amount)
        for m in pb.prunable_layers(ref).values():
            tp.l1_unstructured(m, "weight", amount=amount)
    for name, m in pb.prunable_layers(ref).items():
        assert torch.equal(pb.masks(ours)[name], m.weight_mask.bool())


def test_ties_pruned_in_flat_order_exact_count() -> None:
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    pb.prune(lin, "magnitude", 0.37)
    keep = pb.masks(lin)[""].flatten()
    assert int((~keep).sum()) == 37
    assert (~keep[:37]).all()
    assert keep[37:].all()


def test_global_ties_across_layers_and_large_streaming_path() -> None:
    # > 2**18 weights exercises the sampled bracket; quantised weights make heavy ties.
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(600, 500, bias=False), nn.Linear(500, 300, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.copy_(torch.randint(-8, 9, m.weight.shape, generator=g).float() / 8)
    n = 600 * 500 + 500 * 300
    pb.prune(net, "magnitude", 0.6, scope="global")
    keeps = list(pb.masks(net).values())
    assert sum(int((~k).sum()) for k in keeps) == round(0.6 * n)
    allw = torch.cat([m.parametrizations.weight.original.abs().flatten() for m in net])
    allk = torch.cat([k.flatten() for k in keeps])
    assert allw[~allk].max() <= allw[allk].min()  # nothing kept is smaller than anything pruned
    thr = allw[~allk].max()
    tied = (allw == thr).nonzero().flatten()
    pruned_tied = (~allk[tied]).nonzero().flatten()
    assert torch.equal(pruned_tied, torch.arange(pruned_tied.numel()))  # first ones first


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    amount=st.floats(0.0, 1.0),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_selection_property_exact_count_and_order(
    rows: int, cols: int, amount: float, levels: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-levels, levels + 1, (rows, cols), generator=g).float())
    pb.prune(lin, "magnitude", amount)
    keep = pb.masks(lin)[""]
    k = round(amount * (rows * cols))  # as prune: amount times the count (float order matters)
    assert int((~keep).sum()) == k
    w = lin.parametrizations.weight.original.abs()
    if 0 < k < rows * cols:
        assert w[~keep].max() <= w[keep].min()


def test_counts_exact_and_validated(mlp: nn.Sequential) -> None:
    pb.prune(mlp, "random", counts={"0": 17, "4": 5}, seed=0)
    pruned = {k: int((~v).sum()) for k, v in pb.masks(mlp).items()}
    assert pruned == {"0": 17, "4": 5}
    state = _state(mlp)
    with pytest.raises(ValueError, match="exceeds the"):
        pb.prune(mlp, "magnitude", counts={"0": 12 * 16})
    with pytest.raises(ValueError, match="matches no"):
        pb.prune(mlp, "magnitude", counts={"nope": 1})
    with pytest.raises(ValueError, match=r"counts\[.0.\] must be an int >= 0, got 1.5"):
        pb.prune(mlp, "magnitude", counts={"0": 1.5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="scope='global'"):
        pb.prune(mlp, "magnitude", counts={"0": 1}, scope="global")
    assert _same_state(mlp, state)


def test_plan_applies_method_and_counts(mlp: nn.Sequential) -> None:
    @dataclass(frozen=True)
    class FakePlan:
        method: str
        counts: dict[str, int]
        specs: tuple[LayerSpec, ...]

    specs = tuple(
        LayerSpec(n, "linear", tuple(mlp[int(n)].weight.shape), (mlp[int(n)].in_features,))
        for n in ("0", "2", "4")
    )
    pb.prune(mlp, plan=FakePlan("magnitude", {"0": 30, "2": 40, "4": 0}, specs))
    assert {k: int((~v).sum()) for k, v in pb.masks(mlp).items()} == {"0": 30, "2": 40, "4": 0}
    w = mlp[0].parametrizations.weight.original.abs()
    keep = pb.masks(mlp)["0"]
    assert w[~keep].max() <= w[keep].min()


def test_layer_selection_by_name_pattern_type(cnn: nn.Sequential) -> None:
    pb.prune(cnn, "magnitude", 0.5, layers=[nn.Conv2d])
    assert set(pb.masks(cnn)) == {"0", "2"}
    pb.prune(cnn, "magnitude", 0.5, layers=["5"])
    assert set(pb.masks(cnn)) == {"0", "2", "5"}
    assert set(pb.prunable_layers(cnn, ["[02]"])) == {"0", "2"}
    with pytest.raises(ValueError, match="matches no"):
        pb.prune(cnn, "magnitude", 0.5, layers=["classifier"])


def test_bad_inputs_leave_model_unchanged(mlp: nn.Sequential) -> None:
    pb.prune(mlp, "magnitude", 0.3)
    state = _state(mlp)
    with pytest.raises(ValueError, match="method must be one of"):
        pb.prune(mlp, "smallest", 0.3)
    with pytest.raises(ValueError, match="exactly one of amount"):
        pb.prune(mlp, "magnitude")
    with pytest.raises(ValueError, match="scope must be"):
        pb.prune(mlp, "magnitude", 0.3, scope="model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be"):
        pb.prune(mlp, "random", 0.3, seed="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no prunable layer for method 'filter'"):
        pb.prune(mlp, "filter", 0.3)
    with torch.no_grad():
        mlp[2].parametrizations.weight.original[0, 0] = float("nan")
    state = _state(mlp)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pb.prune(mlp, "magnitude", 0.3)
    assert _same_state_nan(mlp, state)
    with torch.no_grad():
        mlp[2].parametrizations.weight.original[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer '2'"):
        pb.prune(mlp, "magnitude", 0.3, scope="global")


def _same_state_nan(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return all(torch.equal(torch.nan_to_num(v), torch.nan_to_num(now[k])) for k, v in state.items())


def test_no_prunable_layer_and_tied_weights() -> None:
    with pytest.raises(ValueError, match="no prunable layer"):
        pb.prune(nn.Sequential(nn.ReLU(), nn.Embedding(3, 4)), "magnitude", 0.5)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    tied = nn.Sequential(a, nn.ReLU(), b)
    state = _state(tied)
    with pytest.raises(ValueError, match="tied/shared"):
        pb.prune(tied, "magnitude", 0.5)
    assert _same_state(tied, state)
    assert not pb.is_pruned(tied)
    with pytest.raises(ValueError, match="tied/shared"):  # still shared with layer 2
        pb.prune(tied, "magnitude", 0.5, layers=["0"])
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    with pytest.raises(ValueError, match="tied/shared"):
        pb.prune(nn.Sequential(emb, head), "magnitude", 0.5)


def test_amount_zero_installs_empty_masks_and_amount_one_prunes_all(mlp: nn.Sequential) -> None:
    pb.prune(mlp, "magnitude", 0.0)
    assert pb.is_pruned(mlp)
    assert all(v.all() for v in pb.masks(mlp).values())
    pb.prune(mlp, "magnitude", 1.0, scope="global")
    assert pb.sparsity(mlp).sparsity == 1.0


@pytest.mark.parametrize("name", ["magnitude", "random"])
def test_elementwise_sampling_selects_the_same_mask(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Global selection brackets its threshold from a strided sample of the weights for
    elementwise methods; the same method without the flag scores every block: same masks."""
    import prunebound.selection as selection

    monkeypatch.setattr(selection, "_SAMPLE", 64)  # small sample: many strides, tight brackets
    monkeypatch.setattr(selection, "_BLOCK", 128)
    fast = pb.METHODS[name]
    slow = pb.methods.Method(f"{name}_blocks", scores=fast.scores, blockwise=True)
    a, b = make_mlp(), make_mlp()
    b.load_state_dict(a.state_dict())
    for amount, seed in ((0.3, 1), (0.6, 2)):  # the second call composes with the first mask
        pb.prune(a, fast, amount, scope="global", seed=seed)
        pb.prune(b, slow, amount, scope="global", seed=seed)
        ma, mb = pb.masks(a), pb.masks(b)
        assert ma.keys() == mb.keys()
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
    with pytest.raises(ValueError, match="elementwise needs per-weight scores"):
        pb.methods.Method("rows", scores=fast.scores, unit="row", elementwise=True)


def test_numpy_float_amounts_count_like_python_floats() -> None:
    import numpy as np

    for amount in (np.float32(0.25), np.float64(0.25), np.float16(0.25)):
        lin = nn.Linear(8, 4)
        pb.prune(lin, "magnitude", amount)
        assert int((~pb.masks(lin)[""]).sum()) == 8
    lin = nn.Linear(8, 4)
    for bad in (np.int64(1), torch.tensor(0.5), 1):
        with pytest.raises(TypeError, match="amount must be a float fraction"):
            pb.prune(lin, "magnitude", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="amount must be in"):
        pb.prune(lin, "magnitude", np.float32("nan"))
    assert pb.masks(lin) == {}


def test_random_masks_follow_torch_manual_seed_without_a_seed() -> None:
    # issue 10 item 5: without seed= the masks ignored torch.manual_seed
    def masks_after(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
        torch.manual_seed(global_seed)
        return pb.masks(pb.prune(model, "random", 0.5))

    a, b, c = masks_after(1), masks_after(1), masks_after(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    explicit = pb.masks(pb.prune(model, "random", 0.5, seed=7))
    torch.manual_seed(0)
    again = pb.masks(
        pb.prune(
            nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), "random", 0.5, seed=7
        )
    )
    assert all(
        torch.equal(explicit[k], again[k]) for k in explicit
    )  # seed= wins over the global RNG


def test_structured_pruning_leaves_a_trained_classifier_alone_unless_named() -> None:
    # issue 10 item 1: the README's `prune(model, "neuron", 0.1, norm=1)` pruned a classifier
    # row of a trained digits LeNet, and that class's recall fell from 0.81 to 0.0
    data = load_digits()
    torch.manual_seed(0)
    model = pb.models.lenet_300_100(64)
    train(model, data, TrainConfig(epochs=3, batch_size=32), seed=0)
    head = model[5].weight.detach().clone()

    default = pb.prune(copy.deepcopy(model), "neuron", 0.1, norm=1)
    assert set(pb.masks(default)) == {"1", "3"}  # the output layer "5" is left alone
    assert torch.equal(default[5].weight, head)
    with torch.no_grad():
        pred = default(data.x_test).argmax(1)
    recall = [float((pred[data.y_test == c] == c).float().mean()) for c in range(10)]
    assert min(recall) > 0.5, recall  # every class survives (0.72 at worst, measured)

    named = pb.prune(copy.deepcopy(model), "neuron", 0.1, norm=1, layers=["1", "3", "5"])
    rows = ~pb.masks(named)["5"].any(dim=1)
    assert int(rows.sum()) == 1  # round(0.1 * 10) classifier rows: one class's logit is its bias
    with torch.no_grad():
        logits = named(data.x_test[:20])
    assert torch.equal(logits[:, rows], named[5].bias[rows].expand(20, 1))


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 6)
        self.mid = nn.Linear(8, 8)  # registered last, but not an output layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mid(torch.relu(self.body(x)))
        return self.a(h), self.b(h).softmax(-1)


def test_output_layers_are_found_by_tracing_and_opted_in_only_by_name() -> None:
    assert output_layers(_TwoHeads()) == ("a", "b")
    assert output_layers(make_mlp()) == ("4",)
    assert output_layers(nn.Linear(3, 2)) == ()  # the model is the layer asked for
    for scope in ("layer", "global"):
        m = pb.prune(_TwoHeads(), "neuron", 0.5, scope=scope)
        assert set(pb.masks(m)) == {"body", "mid"}
    for sel in (["*"], [nn.Linear]):  # a glob or a type is not a name
        assert set(pb.masks(pb.prune(_TwoHeads(), "neuron", 0.5, layers=sel))) == {"body", "mid"}
    m = pb.prune(_TwoHeads(), "neuron", 0.5, layers=["body", "a"])
    assert set(pb.masks(m)) == {"body", "a"}
    assert int((~pb.masks(m)["a"].any(dim=1)).sum()) == 2
    m = pb.prune(_TwoHeads(), "neuron", counts={"b": 1})  # counts name their layers
    assert int((~pb.masks(m)["b"].any(dim=1)).sum()) == 1
    m = pb.prune(_TwoHeads(), "magnitude", 0.5)  # unstructured methods prune every layer
    assert set(pb.masks(m)) == {"body", "a", "b", "mid"}
    assert int((~pb.masks(pb.prune(nn.Linear(3, 4), "neuron", 0.5))[""]).any(1).sum()) == 2


def test_structured_pruning_of_only_an_output_layer_asks_for_its_name() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"leaves the output layer\(s\) \['2'\] alone"):
        pb.prune(net, "neuron", 0.5)  # the Linear is neuron's only layer, and the output
    assert not pb.is_pruned(net)
    pb.prune(net, "neuron", 0.5, layers=["2"])
    assert int((~pb.masks(net)["2"].any(dim=1)).sum()) == 2
    single = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))  # one prunable layer: the one asked
    assert output_layers(single) == ()
    assert int((~pb.masks(pb.prune(single, "neuron", 0.5))["1"].any(dim=1)).sum()) == 2
