"""Tests for prunebound.models: output shapes, layer structure, registry and seeding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from prunebound.models import (
    MODELS,
    BasicBlock,
    build_model,
    cnn,
    lenet5,
    lenet_300_100,
    mlp,
    resnet_small,
    vgg_small,
)

# (builder, image_size) -> model; every model family on both MNIST and digits resolutions.
BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "lenet_300_100": lambda s: lenet_300_100(in_features=s * s, num_classes=7),
    "mlp": lambda s: mlp([s * s, 32, 7]),
    "lenet5": lambda s: lenet5(num_classes=7, image_size=s),
    "vgg_small": lambda s: vgg_small(num_classes=7, image_size=s, widths=(4, 8, 8)),
    "vgg_small_bn": lambda s: vgg_small(
        num_classes=7, image_size=s, widths=(4, 8), batch_norm=True
    ),
    "resnet_small": lambda s: resnet_small(num_classes=7, widths=(4, 8, 8)),
    "cnn": lambda s: cnn([4, 8], num_classes=7, image_size=s, hidden=[16]),
}


@pytest.mark.parametrize("size", [28, 8])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_shape(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name](size)
    x = torch.rand(3, 1, size, size)
    out = model(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_mlp_accepts_flat_and_image_inputs() -> None:
    model = mlp([16, 5, 3])
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(model(x), model(x.reshape(2, 16)))
    acts = [m for m in model if isinstance(m, nn.ReLU)]
    assert len(acts) == 1  # between the two Linear layers, none after the last
    assert isinstance(model[-1], nn.Linear)
    assert all(m.bias is None for m in mlp([4, 3, 2], bias=False) if isinstance(m, nn.Linear))
    assert isinstance(mlp([4, 3, 2], activation=nn.Tanh)[2], nn.Tanh)


def test_lenet_300_100_layers() -> None:
    linears = [m for m in lenet_300_100().modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(300, 784), (100, 300), (10, 100)]
    assert [m.weight.numel() for m in linears] == [784 * 300, 300 * 100, 100 * 10]
    assert lenet_300_100(64)(torch.rand(2, 64)).shape == (2, 10)


def test_lenet5_structure_28() -> None:
    model = lenet5()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert convs[0].padding == (2, 2)
    assert convs[1].padding == (0, 0)
    assert [m.in_features for m in linears] == [16 * 5 * 5, 120, 84]
    assert lenet5(image_size=32)[0].padding == (0, 0)
    with pytest.raises(ValueError, match="image_size >= 4, got 3"):
        lenet5(image_size=3)


def test_resnet_block_shortcuts() -> None:
    model = resnet_small(widths=(4, 8))
    blocks = [m for m in model if isinstance(m, BasicBlock)]
    assert len(blocks) == 2
    assert isinstance(blocks[0].shortcut, nn.Identity)
    assert isinstance(blocks[1].shortcut, nn.Sequential)  # 1x1 conv when shape changes
    assert blocks[1](torch.rand(1, 4, 8, 8)).shape == (1, 8, 4, 4)
    assert len([m for m in resnet_small(blocks=2) if isinstance(m, BasicBlock)]) == 6


def test_vgg_and_cnn_validation() -> None:
    with pytest.raises(ValueError, match="image_size >= 16, got 8"):
        vgg_small(image_size=8, widths=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="too small"):
        cnn([4, 4, 4, 4], image_size=8)
    with pytest.raises(ValueError, match=r"widths must be positive ints, got \[4, 0\]"):
        mlp([4, 0])
    with pytest.raises(ValueError, match="at least 2 entries"):
        mlp([4])
    assert len([m for m in cnn([4], pool=False) if isinstance(m, nn.MaxPool2d)]) == 0


def test_registry_names() -> None:
    assert set(MODELS) == {"lenet_300_100", "lenet5", "vgg_small", "resnet_small", "mlp", "cnn"}
    model = build_model("cnn", channels=[4], image_size=8, hidden=[8])
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'alexnet'; valid names: cnn, lenet5"):
        build_model("alexnet")


def test_build_model_bad_params() -> None:
    with pytest.raises(ValueError, match=r"invalid parameters for model 'lenet5'.*image_size"):
        build_model("lenet5", image_sise=8)


def test_build_model_seed_determinism() -> None:
    state = torch.get_rng_state()
    a = build_model("lenet_300_100", seed=7, in_features=64)
    b = build_model("lenet_300_100", seed=7, in_features=64)
    c = build_model("lenet_300_100", seed=8, in_features=64)
    assert torch.equal(torch.get_rng_state(), state), "build_model changed the global RNG"
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


def test_build_model_without_seed_uses_global_rng() -> None:
    torch.manual_seed(3)
    seeded = torch.get_rng_state()
    a = build_model("mlp", widths=[4, 3])
    assert not torch.equal(torch.get_rng_state(), seeded), "init should draw from global RNG"
    torch.manual_seed(3)
    b = build_model("mlp", widths=[4, 3])
    assert torch.equal(a.state_dict()["1.weight"], b.state_dict()["1.weight"])
