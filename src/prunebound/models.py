"""Small reference networks for pruning experiments, and a name -> builder registry.

Models are flat `nn.Sequential`s where possible so that layer names are short ("1", "3", ...)
and every prunable Linear/Conv2d is easy to find. Builders use PyTorch's default init; pass
`seed` to `build_model` for reproducible weights without touching the global RNG.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "build_model",
    "cnn",
    "lenet5",
    "lenet_300_100",
    "mlp",
    "resnet_small",
    "vgg_small",
]


def _check_positive(what: str, values: Sequence[int]) -> None:
    if any(int(v) != v or v < 1 for v in values):
        raise ValueError(f"{what} must be positive ints, got {list(values)}")


def _conv_out(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def mlp(
    widths: Sequence[int], *, activation: type[nn.Module] = nn.ReLU, bias: bool = True
) -> nn.Sequential:
    """Fully connected network: Flatten, then Linear(w[i], w[i+1]) with `activation` between.

    There is no activation after the last layer (it outputs logits). The leading Flatten makes
    the model accept (N, C, H, W) images as well as (N, D) vectors.
    """
    if len(widths) < 2:
        raise ValueError(f"widths needs at least 2 entries (in, out), got {list(widths)}")
    _check_positive("widths", widths)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        if i > 0:
            layers.append(activation())
        layers.append(nn.Linear(w_in, w_out, bias=bias))
    return nn.Sequential(*layers)


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998): in -> 300 -> 100 -> classes, ReLU between.

    The standard pruning baseline on MNIST (in_features=784); use 64 for 8x8 digits.
    """
    return mlp([in_features, 300, 100, num_classes])


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """LeNet-5: conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> 120 -> 84 -> classes.

    Conv1 is padded by 2 for images smaller than 32 (as usual on 28x28 MNIST). On tiny images
    (e.g. 8x8 digits) conv2 is padded by 2 too so that the feature map does not vanish.
    """
    _check_positive("in_channels, num_classes, image_size", [in_channels, num_classes, image_size])
    if image_size < 4:
        raise ValueError(f"lenet5 needs image_size >= 4, got {image_size}")
    pad1 = 2 if image_size < 32 else 0
    s = _conv_out(image_size, 5, pad1) // 2
    pad2 = 0 if s - 4 >= 2 else 2
    s = _conv_out(s, 5, pad2) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * s * s, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def vgg_small(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    widths: Sequence[int] = (32, 64, 128),
    *,
    batch_norm: bool = False,
) -> nn.Sequential:
    """VGG-style CNN: per stage two 3x3 convs (+BatchNorm) with ReLU, then 2x2 max-pool.

    A Flatten and one Linear head follow. Each stage halves the image, so image_size must be
    at least 2**len(widths) (8 for the default three stages).
    """
    _check_positive("widths", widths)
    if image_size < 2 ** len(widths):
        raise ValueError(
            f"vgg_small with {len(widths)} stages needs image_size >= {2 ** len(widths)}, "
            f"got {image_size}"
        )
    layers: list[nn.Module] = []
    prev, s = in_channels, image_size
    for w in widths:
        for c_in in (prev, w):
            layers.append(nn.Conv2d(c_in, w, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU())
        layers.append(nn.MaxPool2d(2))
        prev, s = w, s // 2
    layers += [nn.Flatten(), nn.Linear(prev * s * s, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    The shortcut is a 1x1 conv + BN when stride or channel count changes, identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C_in, H, W) to (N, C_out, H/stride, W/stride)."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Module.__call__ is typed Any; the annotation restores Tensor for mypy.
        y: torch.Tensor = self.relu2(out + self.shortcut(x))
        return y


def resnet_small(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: Sequence[int] = (16, 32, 64),
    *,
    blocks: int = 1,
) -> nn.Sequential:
    """Small ResNet: 3x3 stem, `blocks` BasicBlocks per stage, global average pool, Linear.

    Every stage after the first halves the resolution; the global pool makes any input size
    (8x8 digits, 28x28 MNIST) work.
    """
    _check_positive("widths", widths)
    _check_positive("blocks", [blocks])
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    prev = widths[0]
    for i, w in enumerate(widths):
        for j in range(blocks):
            layers.append(BasicBlock(prev, w, stride=2 if i > 0 and j == 0 else 1))
            prev = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes)]
    return nn.Sequential(*layers)


def cnn(
    channels: Sequence[int],
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    kernel_size: int = 3,
    pool: bool = True,
    hidden: Sequence[int] = (),
) -> nn.Sequential:
    """Generic CNN: per entry of `channels` a "same"-padded conv + ReLU (+ 2x2 max-pool).

    Then Flatten, Linear+ReLU layers of widths `hidden`, and a Linear head to `num_classes`.
    Raises ValueError if pooling would shrink the image below 1x1.
    """
    _check_positive("channels", channels)
    _check_positive("hidden", hidden)
    _check_positive("kernel_size, image_size", [kernel_size, image_size])
    layers: list[nn.Module] = []
    prev, s = in_channels, image_size
    for c in channels:
        layers += [nn.Conv2d(prev, c, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        s = _conv_out(s, kernel_size, kernel_size // 2)
        if pool:
            layers.append(nn.MaxPool2d(2))
            s //= 2
        if s < 1:
            raise ValueError(
                f"cnn: image_size={image_size} is too small for channels={list(channels)} "
                f"with pool={pool}"
            )
        prev = c
    mlp_head = mlp([prev * s * s, *hidden, num_classes])
    return nn.Sequential(*layers, *mlp_head)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
    "vgg_small": vgg_small,
    "resnet_small": resnet_small,
    "mlp": mlp,
    "cnn": cnn,
}


def build_model(name: str, *, seed: int | None = None, **params: Any) -> nn.Module:
    """Build a registered model by name from plain keyword parameters (as in config files).

    With `seed`, weights are initialised from `seed` inside `torch.random.fork_rng`, so the same
    seed gives the same weights and the caller's global RNG state is left unchanged; without it,
    the global RNG is used as in plain PyTorch. Raises ValueError for an unknown name or
    parameters the builder does not accept.
    """
    # **params is the registry's passthrough to each builder; it is checked against the
    # builder's signature here so that a typo in a config fails with a clear message.
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    builder = MODELS[name]
    try:
        inspect.signature(builder).bind(**params)
    except TypeError as err:
        accepted = ", ".join(inspect.signature(builder).parameters)
        raise ValueError(
            f"invalid parameters for model {name!r}: {err}; accepted: {accepted}"
        ) from err
    if seed is None:
        return builder(**params)
    # Scoped seeding: only the CPU generator is forked and seeded (models are built on CPU),
    # so neither the caller's CPU nor any CUDA RNG state changes.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return builder(**params)
