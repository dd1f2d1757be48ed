"""Checkpoints of whole-unit masks (`prune(..., coupled=True)`): the masks on biases and
BatchNorm entries are stored (`__mask__.X.bias`, ...) and restored like the weight masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import make_mlp, with_bn_stats
from torch import nn

import prunebound as pb
from prunebound._masks import tensor_masks
from prunebound.checkpoint import file_tensors, load_masks, masked_state_dict, read, save_masks

pytest.importorskip("torch_pruning")

X_CNN = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
X_MLP = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return with_bn_stats(pb.models.resnet_small(widths=(4, 8, 8)), X_CNN)


def _bn_cnn(seed: int) -> nn.Module:
    """Convs with biases, each followed by a BatchNorm: a whole unit masks all four tensors."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 3),
    )
    return with_bn_stats(net, X_CNN)


def _all_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: mm.mask for k, (_, _, mm) in tensor_masks(model).items()}


def _masks_equal(a: nn.Module, b: nn.Module) -> bool:
    ma, mb = _all_masks(a), _all_masks(b)
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def _coupled(kind: str) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """(coupled-pruned model, its input, a fresh model of the same architecture, other weights)."""
    if kind in ("cnn", "resnet"):
        build = _bn_cnn if kind == "cnn" else _resnet
        model = build(0)
        pb.prune(model, "filter", 0.5, coupled=True, example_inputs=X_CNN)
        return model, X_CNN, build(1)
    model = make_mlp(0).eval()
    pb.prune(model, "neuron", 0.5, coupled=True, example_inputs=X_MLP)
    return model, X_MLP, make_mlp(1).eval()


@pytest.mark.parametrize("kind", ["cnn", "resnet", "mlp"])
def test_round_trip_restores_every_mask_and_the_values_behind(tmp_path: Path, kind: str) -> None:
    model, x, fresh = _coupled(kind)
    masked = _all_masks(model)
    assert any(k.endswith(".bias") for k in masked)  # whole units: bias masks exist
    if kind == "cnn":  # a conv's weight and bias, the BatchNorm entries after it
        assert {"0.weight", "0.bias", "1.weight", "1.bias"} <= set(masked)
    if kind == "resnet":  # the residual stream: stem conv and each block's last conv, tied
        assert {"1.weight", "1.bias", "3.bn2.weight", "3.bn2.bias"} <= set(masked)
    path = pb.save(model, tmp_path / "m.safetensors")
    keys = set(safetensors.torch.load_file(path))
    assert {f"__mask__.{k}" for k in masked} <= keys
    assert f"__pruned__.{'1' if kind == 'resnet' else '0'}.bias" in keys
    pb.load(fresh, path)
    assert _masks_equal(fresh, model)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for k, v in pb.snapshot(model).items():  # underlying values (behind the masks) too
        assert torch.equal(pb.snapshot(fresh)[k], v), k
    dense = pb.reset(fresh)(x)
    torch.testing.assert_close(dense, pb.reset(model)(x), rtol=0, atol=0)
    assert not torch.allclose(dense, pb.load(fresh, path)(x))  # the masks matter


def test_retraining_after_load_keeps_masked_entries_at_zero(tmp_path: Path) -> None:
    model, x, fresh = _coupled("cnn")
    pb.load(fresh, pb.save(model, tmp_path / "m.safetensors"))
    before = {k: t.detach().clone() for k, t in fresh.state_dict().items()}
    fresh.train()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        fresh(x).square().mean().backward()
        opt.step()
    masks = _all_masks(fresh)
    for key, keep in masks.items():
        owner, _, tensor = key.rpartition(".")
        effective = getattr(fresh.get_submodule(owner), tensor).detach()
        assert bool((effective[~keep] == 0).all()), key
    orig = "parametrizations.bias.original"
    assert not torch.equal(before[f"1.{orig}"], fresh.state_dict()[f"1.{orig}"])  # it trained
    assert bool((fresh.get_submodule("1").bias[~masks["1.bias"]] == 0).all())


def test_plain_readers_get_the_masked_values(tmp_path: Path) -> None:
    model, x, fresh = _coupled("cnn")
    path = pb.save(model, tmp_path / "m.safetensors")
    result = fresh.load_state_dict(safetensors.torch.load_file(path), strict=False)
    assert not result.missing_keys
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert bool((fresh.get_submodule("1").bias[~_all_masks(model)["1.bias"]] == 0).all())
    plain = masked_state_dict(model)
    assert set(plain) == set(_bn_cnn(2).state_dict())
    torch.testing.assert_close(plain["0.bias"], model.get_submodule("0").bias, rtol=0, atol=0)


def test_weight_masks_keyed_by_layer_and_all_masks_by_tensor(tmp_path: Path) -> None:
    model, _, _ = _coupled("mlp")
    path = pb.save(model, tmp_path / "m.safetensors")
    _, by_layer = read(path)
    assert by_layer.keys() == pb.masks(model).keys() == {"0", "2"}
    _, by_tensor = read(path, all_masks=True)
    assert set(by_tensor) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_save_masks_and_load_masks_carry_the_whole_units(tmp_path: Path) -> None:
    model, x, fresh = _coupled("cnn")
    side = save_masks(model, tmp_path / "masks.safetensors")
    assert any(k.startswith("__mask__.1.") for k in safetensors.torch.load_file(side))
    fresh.load_state_dict(masked_state_dict(model))  # what from_pretrained loads
    load_masks(fresh, side)
    assert _masks_equal(fresh, model)
    torch.testing.assert_close(pb.reset(fresh)(x), pb.reset(model)(x), rtol=0, atol=0)


def test_snapshot_and_rewind_keep_the_bias_masks() -> None:
    model = _resnet(0)
    init = pb.snapshot(model)
    pb.prune(model, "filter", 0.5, coupled=True, example_inputs=X_CNN)
    masks = {k: v.clone() for k, v in _all_masks(model).items()}
    with torch.no_grad():
        for t in model.parameters():
            t.add_(1.0)
    pb.rewind(model, init)
    assert set(init) == set(pb.snapshot(model))
    for k, v in init.items():
        assert torch.equal(pb.snapshot(model)[k], v), k
    assert {k: torch.equal(v, masks[k]) for k, v in _all_masks(model).items()} == dict.fromkeys(
        masks, True
    )


def test_weight_only_files_still_load_and_clear_whole_unit_masks(tmp_path: Path) -> None:
    """A file of before whole units (weight masks only) loads, and loading it into a model with
    bias/BatchNorm masks leaves only its weight masks."""
    old = make_mlp(0)
    pb.prune(old, "neuron", 0.5)  # not coupled: weight masks only, the layout of before
    path = pb.save(old, tmp_path / "old.safetensors")
    assert not any(".bias" in k for k in file_tensors(old) if k.startswith("__"))
    model, x, _ = _coupled("mlp")
    pb.load(model, path)
    assert set(_all_masks(model)) == {"0.weight", "2.weight"}
    assert _masks_equal(model, old)
    torch.testing.assert_close(model(x), old(x), rtol=0, atol=0)


def test_a_mask_on_a_tensor_that_is_not_maskable_is_refused(tmp_path: Path) -> None:
    model, _, fresh = _coupled("mlp")
    tensors = file_tensors(model)
    tensors["__mask__.1.weight"] = torch.ones(3, dtype=torch.bool)  # "1" is a ReLU
    meta = {"format": "prunebound", "layout": "2"}
    safetensors.torch.save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    state = pb.snapshot(fresh)
    with pytest.raises(ValueError, match=r"mask for '1.weight', which is not the weight or bias"):
        pb.load(fresh, tmp_path / "bad.safetensors")
    del tensors["__mask__.1.weight"]
    del tensors["__pruned__.0.bias"]
    tensors["__mask__.0.bias"] = torch.ones(3, dtype=torch.bool)  # the bias has 16 entries
    safetensors.torch.save_file(tensors, tmp_path / "shape.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"'0.bias' must be bool with the shape of its tensor"):
        pb.load(fresh, tmp_path / "shape.safetensors")
    assert not pb.is_pruned(fresh)
    assert all(torch.equal(pb.snapshot(fresh)[k], v) for k, v in state.items())


def test_torch_prune_round_trip_keeps_the_bias_masks() -> None:
    model, x, _ = _coupled("cnn")
    masks = {k: v.clone() for k, v in _all_masks(model).items()}
    out = model(x)
    pb.export_torch_prune(model)
    assert not pb.is_pruned(model)
    assert torch.equal(model.get_submodule("1").bias_mask.bool(), masks["1.bias"])
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    pb.import_torch_prune(model)
    assert _all_masks(model).keys() == masks.keys()
    assert all(torch.equal(v, masks[k]) for k, v in _all_masks(model).items())
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
