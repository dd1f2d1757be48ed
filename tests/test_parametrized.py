"""Pickling pruned models (torch.save(model)) and the inference cache of the masked weight."""

from __future__ import annotations

import copy
import io
import pickle

import torch
from helpers import make_cnn, make_mlp
from torch import nn
from torch.nn.utils import parametrize

import prunebound as pb


def _pruned() -> nn.Sequential:
    model = make_mlp()
    pb.prune(model, "magnitude", 0.6)
    return model


def test_pickle_round_trip_keeps_masks_weights_and_trains() -> None:
    model = _pruned()
    twin = pickle.loads(pickle.dumps(model))
    assert pb.is_pruned(twin)
    for name, keep in pb.masks(model).items():
        assert torch.equal(pb.masks(twin)[name], keep)
        layer, twin_layer = model.get_submodule(name), twin.get_submodule(name)
        assert torch.equal(pb.original_weight(twin_layer), pb.original_weight(layer))
        assert isinstance(pb.original_weight(twin_layer), nn.Parameter)
    x = torch.randn(4, 12)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    # the loaded model trains with its masks: pruned entries stay zero after steps
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        twin(x).square().sum().backward()
        opt.step()
    for name, keep in pb.masks(twin).items():
        assert torch.all(twin.get_submodule(name).weight[~keep] == 0)
        assert not torch.equal(
            pb.original_weight(twin.get_submodule(name))[keep],
            pb.original_weight(model.get_submodule(name))[keep],
        )


def test_torch_save_whole_model_and_deepcopy() -> None:
    model = make_cnn()
    pb.prune(model, "filter", 0.5, norm=1, layers=["0", "2"])
    buf = io.BytesIO()
    torch.save(model, buf)  # raised "Serialization of parametrized modules ..." before
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # a full pickle: trusted files only
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert pb.masks(loaded).keys() == pb.masks(model).keys()
    twin = copy.deepcopy(loaded)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    pb.remove(twin)  # removing on a copy leaves the original (and the pickled class) intact
    assert pb.is_pruned(loaded)
    assert pickle.loads(pickle.dumps(loaded)) is not None


def test_pickle_keeps_tied_weights_tied() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    pb.prune(model, "magnitude", 0.5, layers=["0", "1"])
    twin = pickle.loads(pickle.dumps(model))
    assert pb.original_weight(twin[0]) is pb.original_weight(twin[1])
    assert pb.masks(twin)["0"] is pb.masks(twin)["1"] or torch.equal(
        pb.masks(twin)["0"], pb.masks(twin)["1"]
    )


def test_masked_weight_cached_without_grad_and_invalidated_by_updates() -> None:
    model = _pruned()
    layer = model[0]
    x = torch.randn(3, 12)
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # cached: no recompute while nothing changed
        cached_out = model(x)
    reference = make_mlp()
    with torch.no_grad():
        for name, keep in pb.masks(model).items():
            reference.get_submodule(name).weight.mul_(keep)
        torch.testing.assert_close(cached_out, reference(x), rtol=0, atol=0)
    # with autograd on, every access recomputes (gradients must flow)
    assert layer.weight is not layer.weight
    # an optimizer step (in place) invalidates the cache
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer.weight
        assert after is not first
        fresh = pb.original_weight(layer) * pb.masks(model)["0"]
        torch.testing.assert_close(after, fresh, rtol=0, atol=0)
        pb.original_weight(layer).add_(1.0)  # an in-place edit under no_grad, too
        torch.testing.assert_close(layer.weight, fresh + pb.masks(model)["0"], rtol=0, atol=0)
    # a new mask invalidates it
    pb.prune(model, "magnitude", 0.9)
    with torch.no_grad():
        assert int(torch.count_nonzero(layer.weight)) == int(pb.masks(model)["0"].sum())


def test_cache_is_not_pickled_and_inference_mode_works() -> None:
    model = _pruned()
    with torch.inference_mode():
        out = model(torch.ones(1, 12))
    with torch.no_grad():
        model(torch.ones(1, 12))
    blob = pickle.dumps(model)
    assert len(blob) < len(pickle.dumps(_pruned())) * 1.2
    twin = pickle.loads(blob)
    with torch.no_grad():
        torch.testing.assert_close(twin(torch.ones(1, 12)), out)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_cache_is_not_used_when_another_parametrization_follows_the_mask() -> None:
    model = _pruned()
    layer = model[0]
    parametrize.register_parametrization(layer, "weight", _Double(), unsafe=True)
    expected = 2 * pb.original_weight(layer).detach() * pb.masks(model)["0"]
    with torch.no_grad():
        for _ in range(3):  # the first access fills the mask's cache; later ones must not
            torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
