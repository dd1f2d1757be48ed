"""Data-aware methods (wanda, obs, obd, taylor, snip), calibration statistics and N:M patterns."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import gpt2_config, make_cnn, make_mlp
from torch import nn

import prunebound as pb
from prunebound.calibration import collect
from prunebound.methods import Method, ScoreContext

DATA_METHODS = sorted(n for n, m in pb.METHODS.items() if m.needs)


def _trained(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small MLP trained on a 10-class problem whose 24 input features have very different
    scales (as real features do); returns (model, train x, train y, held-out x)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.5 * torch.randn(24, generator=g))
    centres = torch.randn(10, 24, generator=g)
    y = torch.randint(0, 10, (1200,), generator=g)
    x = (centres[y] + 0.7 * torch.randn(1200, 24, generator=g)) * scale
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    model.append(nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1000] / scale.mean()), y[:1000]).backward()
        opt.step()
    with torch.no_grad():  # fold the input normalisation into the first layer
        model[0].weight /= scale.mean()
    return model, x[:1000], y[:1000], x[1000:]


def _flips(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) != dense(x).argmax(1)).sum())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_obs_and_wanda_flip_fewer_predictions_than_magnitude_on_a_trained_model() -> None:
    dense, x, y, held_out = _trained()
    flips = {}
    for name in ("magnitude", "wanda", "obs"):
        model = copy.deepcopy(dense)
        pb.prune(model, name, 0.7, data=(x[:512], y[:512]))
        assert pb.sparsity(model).zeros == round(0.7 * 24 * 64) + round(0.7 * 64 * 32) + round(
            0.7 * 32 * 10
        )
        flips[name] = _flips(model, dense, held_out)
    assert flips["obs"] < flips["magnitude"], flips
    assert flips["wanda"] < flips["magnitude"], flips
    assert flips["obs"] <= flips["magnitude"] / 4, flips


def test_obs_reconstruction_error_is_lower_than_magnitude_on_the_same_layer() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(400, 32, generator=g) @ mix  # correlated inputs
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    errors = {}
    for name in ("magnitude", "obs"):
        pruned = pb.prune(copy.deepcopy(layer), name, 0.5, data=x)
        assert int((~pb.masks(pruned)[""]).sum()) == 256
        with torch.no_grad():
            errors[name] = float((layer(x) - pruned(x)).square().sum())
    assert errors["obs"] < 0.8 * errors["magnitude"], errors


def test_obs_updates_only_surviving_weights_and_keeps_pruned_ones_pruned() -> None:
    model = make_mlp()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    pb.prune(model, "magnitude", 0.3)
    before = {n: k.clone() for n, k in pb.masks(model).items()}
    raw = pb.original_weight(model[0]).detach().clone()
    pb.prune(model, "obs", 0.5, data=x)
    for n, keep in pb.masks(model).items():
        assert not (keep & ~before[n]).any()
        alive = int(before[n].sum())
        assert int(keep.sum()) == alive - round(0.5 * alive)
    w = pb.original_weight(model[0]).detach()
    keep = pb.masks(model)["0"]
    assert torch.equal(w[~keep], raw[~keep])  # raw values under the mask are left alone
    assert not torch.equal(w[keep], raw[keep])  # survivors moved


def test_obs_processes_layers_with_inputs_from_the_pruned_prefix() -> None:
    # the second layer reconstructs the outputs it sees after the first layer was pruned: its
    # error against the dense model is lower than when each layer is reconstructed alone
    dense, x, _, held_out = _trained(1)
    seq = pb.prune(copy.deepcopy(dense), "obs", 0.8, data=x[:400])
    alone = copy.deepcopy(dense)  # each layer reconstructed from the dense model's inputs
    for name in ("0", "2", "4"):
        inputs = _inputs_of(dense, dense.get_submodule(name), x[:400])
        alone[int(name)] = pb.prune(
            copy.deepcopy(dense.get_submodule(name)), "obs", 0.8, data=inputs
        )
    with torch.no_grad():
        err_seq = float((seq(held_out) - dense(held_out)).square().sum())
        err_alone = float((alone(held_out) - dense(held_out)).square().sum())
    assert err_seq < err_alone


def _inputs_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def test_wanda_prunes_the_same_share_of_every_row_by_weight_times_input_norm() -> None:
    layer = nn.Linear(8, 4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g) * torch.arange(1.0, 9.0)
    pb.prune(layer, "wanda", 0.5, data=x)
    pruned = ~pb.masks(layer)[""]
    assert pruned.sum(1).tolist() == [4, 4, 4, 4]
    score = pb.original_weight(layer).detach().abs() * x.square().sum(0).sqrt()
    expected = torch.zeros_like(pruned)
    expected.scatter_(1, score.argsort(1)[:, :4], True)
    assert torch.equal(pruned, expected)


def _manual_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-example weight gradients of the first layer (summed cross-entropy)."""
    out = []
    for i in range(x.shape[0]):
        twin = copy.deepcopy(model)
        loss = nn.functional.cross_entropy(twin(x[i : i + 1]), y[i : i + 1], reduction="sum")
        loss.backward()
        out.append(twin[0].weight.grad.detach().double())
    return out


def test_taylor_obd_snip_scores_match_autograd() -> None:
    model = make_mlp()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 12, generator=g), torch.randint(0, 3, (20,), generator=g)
    per = _manual_grads(model, x, y)
    w = model[0].weight.detach().double()
    stats = collect(model, {"0": model[0]}, (x, y), needs=("grad", "fisher"), method="t")["0"]
    assert stats.grad is not None and stats.fisher is not None
    torch.testing.assert_close(stats.grad, sum(per), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.fisher, sum(p * p for p in per), rtol=1e-5, atol=1e-6)
    expected = {
        "taylor": (sum(per) * w).abs(),
        "snip": (sum(per) * w).abs(),
        "obd": 0.5 * sum(p * p for p in per) / 20 * w * w,
    }
    for name, score in expected.items():
        twin = pb.prune(copy.deepcopy(model), name, counts={"0": 60}, data=(x, y))
        want = torch.zeros(score.numel(), dtype=torch.bool)
        want[score.float().flatten().argsort(stable=True)[:60]] = True
        assert torch.equal(~pb.masks(twin)["0"].flatten(), want), name
    assert all(p.grad is None for p in model.parameters())  # no .grad written


def test_collection_restores_modes_and_uses_own_predictions_without_labels() -> None:
    model = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(0))
    a = pb.prune(copy.deepcopy(model), "taylor", 0.5, data=x)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    b = pb.prune(copy.deepcopy(model), "taylor", 0.5, data=(x, y))
    assert all(m.training for m in a.modules())
    for k, v in pb.masks(a).items():
        assert torch.equal(v, pb.masks(b)[k])


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_conv_statistics_match_autograd_and_unfold(conv: type[nn.Module]) -> None:
    torch.manual_seed(0)
    layer = conv(3, 5, 3, stride=2, padding=1, dilation=1)
    shape = (7, 3, 11) if conv is nn.Conv1d else (7, 3, 9, 8)
    x = torch.randn(shape)
    model = nn.Sequential(layer, nn.Flatten())
    y = torch.randint(0, 4, (7,))
    stats = collect(model, {"0": layer}, (x, y), needs=("grad", "inputs", "hessian"), method="t")
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [layer.weight])
    torch.testing.assert_close(stats["0"].grad.float(), grad, rtol=1e-4, atol=1e-5)
    h = stats["0"].hessian
    assert h is not None and h.shape == (layer.weight[0].numel(),) * 2
    assert stats["0"].input_sq.shape == layer.weight.shape
    pb.prune(layer, "obs", 0.5, data=x)
    assert int((~pb.masks(layer)[""]).sum()) == round(0.5 * layer.weight.numel())


# weight-level data methods; the unit Taylor ones (whole rows) have tests/test_coupled_criteria.py
WEIGHT_DATA_METHODS = [n for n in DATA_METHODS if pb.METHODS[n].unit != "row"]


@pytest.mark.parametrize("name", WEIGHT_DATA_METHODS)
def test_data_methods_prune_a_cnn_with_a_dataloader(name: str) -> None:
    model = make_cnn()
    x = torch.randn(24, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (24,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    pb.prune(model, name, 0.4, data=loader, scope="global")
    total = sum(m.weight.numel() for m in pb.prunable_layers(model).values())
    assert pb.sparsity(model).zeros == round(0.4 * total)


@pytest.mark.parametrize("name", ["wanda", "obs", "taylor"])
def test_data_methods_on_gpt2_conv1d(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config(n_embd=16, vocab=50, positions=16)).eval()
    ids = torch.randint(0, 50, (6, 12))
    layers = ["transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_fc"]
    pb.prune(model, name, 0.5, data=ids, layers=layers)
    masks = pb.masks(model)
    assert sorted(masks) == [
        f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "mlp.c_fc")
    ]
    for n, keep in masks.items():
        assert int((~keep).sum()) == keep.numel() // 2, n
    if name == "wanda":  # compared within each output unit: a Conv1D's unit is a column
        for keep in masks.values():
            assert set((~keep).sum(0).tolist()) == {8}


def test_n_m_pattern_keeps_exactly_n_of_every_m_inputs() -> None:
    model = make_mlp(widths=(12, 16, 8, 4))
    pb.prune(model, "magnitude", pattern="2:4")
    for keep in pb.masks(model).values():
        groups = keep.reshape(-1, 4)
        assert groups.sum(1).tolist() == [2] * groups.shape[0]
        w = pb.original_weight(model[0]).detach().abs().reshape(-1, 4)
    kept = w.gather(
        1, pb.masks(model)["0"].reshape(-1, 4).float().argsort(dim=1, stable=True)[:, 2:]
    )
    dropped = w.gather(
        1, pb.masks(model)["0"].reshape(-1, 4).float().argsort(dim=1, stable=True)[:, :2]
    )
    assert (kept.min(1).values >= dropped.max(1).values).all()


@pytest.mark.parametrize("name", ["magnitude", "wanda", "obs", "taylor", "random"])
def test_n_m_pattern_for_any_score_composes_with_masks(name: str) -> None:
    model = make_cnn()
    x = torch.randn(16, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    pb.prune(model, "random", 0.3, seed=0, layers=["5"])
    before = pb.masks(model)["5"].clone()
    pb.prune(model, name, pattern="1:3", data=x, layers=["0", "5"], seed=1)
    for lname in ("0", "5"):
        groups = pb.masks(model)[lname].flatten(1).reshape(-1, 3)
        assert (groups.sum(1) <= 1).all()
    assert not (pb.masks(model)["5"] & ~before).any()
    first = pb.masks(model)["0"].flatten(1).reshape(-1, 3)
    assert first.sum(1).tolist() == [1] * first.shape[0]
    untouched = before.reshape(-1, 3).any(1)
    assert torch.equal(pb.masks(model)["5"].reshape(-1, 3).sum(1) == 1, untouched)


def test_n_m_on_a_transposed_linear_groups_inputs_along_dim_0() -> None:
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(6, 8)  # weight (in=8, out=6)
    pb.prune(layer, "magnitude", pattern="2:4")
    keep = pb.masks(layer)[""]
    assert keep.t().reshape(-1, 4).sum(1).tolist() == [2] * 12


def test_score_functions_see_the_layer_name_module_and_context() -> None:
    seen: list[tuple[str, type[nn.Module], bool]] = []

    def by_name(
        weight: torch.Tensor, generator: torch.Generator, layer: ScoreContext
    ) -> torch.Tensor:
        seen.append((layer.name, type(layer.module), layer.stats is not None))
        order = torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)
        return order if layer.name == "0" else -order

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    pb.prune(model, Method("by_name", scores=by_name), counts={"0": 2, "2": 2})
    assert (~pb.masks(model)["0"]).flatten().nonzero().flatten().tolist() == [0, 1]
    assert (~pb.masks(model)["2"]).flatten().nonzero().flatten().tolist() == [14, 15]
    assert set(seen) == {("0", nn.Linear, False), ("2", nn.Linear, False)}
    grads = Method("g", scores=lambda w, g, layer: (w * layer.stats.grad).abs(), needs=("grad",))
    x = torch.randn(8, 4)
    a = pb.prune(copy.deepcopy(model), grads, 0.25, data=x)
    b = pb.prune(copy.deepcopy(model), "taylor", 0.25, data=x)
    for k, v in pb.masks(a).items():
        assert torch.equal(v, pb.masks(b)[k])


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (lambda w: w.abs().flatten()[:-1], r"method 'bad', layer '2': scores have shape \(31,\)"),
        (lambda w: w * float("nan"), r"method 'bad', layer '0': scores contain NaN"),
    ],
)
def test_bad_scores_name_the_method_and_layer(scores: object, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 8))
    state = _state(model)
    for scope in ("layer", "global"):
        if "31" in match:
            meth = Method("bad", scores=lambda w: w.abs() if w.shape[0] == 4 else scores(w))  # type: ignore[operator]
        else:
            meth = Method("bad", scores=scores)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=match):
            pb.prune(model, meth, 0.5, scope=scope)  # type: ignore[arg-type]
        assert pb.masks(model) == {} and _unchanged(model, state)


def _nan_grad_model() -> nn.Module:
    class SqrtZero(nn.Module):  # forward adds 0, backward gives NaN
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.sqrt(x - x)

    return nn.Sequential(nn.Linear(4, 3), SqrtZero())


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [
        ("wanda", {}, ValueError, r"method 'wanda' needs calibration data"),
        ("obs", {}, ValueError, r"method 'obs' needs calibration data"),
        (
            "wanda",
            {"data": torch.randn(5, 7)},
            ValueError,
            r"method 'wanda': layer '0'.*shape \(5, 7\).*4 input",
        ),
        (
            "obs",
            {"data": torch.randn(5, 4).double()},
            ValueError,
            r"method 'obs': layer '0'.*dtype torch.float64",
        ),
        (
            "obd",
            {"data": torch.full((5, 4), float("nan"))},
            ValueError,
            r"method 'obd': layer '0'.*NaN",
        ),
        ("taylor", {"data": (torch.randn(5, 4), torch.zeros(4).long())}, ValueError, r"labels"),
        ("taylor", {"data": (torch.randn(5, 4), torch.rand(5))}, ValueError, r"integer class"),
        ("taylor", {"data": torch.randn(0, 4)}, ValueError, r"calibration data is empty"),
        ("taylor", {"data": []}, ValueError, r"calibration data is empty"),
        ("taylor", {"data": "x"}, TypeError, r"data must be a tensor"),
        (
            "magnitude",
            {"pattern": "2:5"},
            ValueError,
            r"method 'magnitude', layer '0'.*multiple of 5",
        ),
        ("magnitude", {"pattern": "4:2"}, ValueError, r"pattern must be 'N:M'"),
        ("neuron", {"pattern": "2:4"}, ValueError, r"prunes whole rows"),
        ("bernoulli", {"pattern": "2:4"}, ValueError, r"samples a random mask"),
        ("magnitude", {"pattern": "2:4", "scope": "global"}, ValueError, r"scope='global'"),
    ],
)
def test_bad_calibration_input_is_refused_and_the_model_untouched(
    name: str, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = _state(model)
    amount = None if "pattern" in kwargs else 0.5
    with pytest.raises(error, match=match):
        pb.prune(model, name, amount, **kwargs)  # type: ignore[arg-type]
    assert pb.masks(model) == {} and _unchanged(model, state)


@pytest.mark.parametrize("name", ["taylor", "obd"])
def test_nan_gradients_are_refused(name: str) -> None:
    model = _nan_grad_model()
    state = _state(model)
    with pytest.raises(ValueError, match=rf"method '{name}': layer '0': gradients contain NaN"):
        pb.prune(model, name, 0.5, data=torch.randn(6, 4))
    assert pb.masks(model) == {} and _unchanged(model, state)


def test_obs_failure_midway_leaves_the_model_untouched() -> None:
    # the second layer's inputs are NaN only after the first layer ran: nothing is changed
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    state = _state(model)
    with pytest.raises(ValueError, match=r"method 'obs': layer '2'.*NaN or Inf"):
        pb.prune(model, "obs", 0.5, data=torch.randn(6, 4))
    assert pb.masks(model) == {} and _unchanged(model, state)
