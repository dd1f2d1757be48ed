"""Shared fixtures: small seeded models."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn


def make_mlp(seed: int = 0, widths: tuple[int, ...] = (12, 16, 8, 3)) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g))
            lin.bias.copy_(torch.randn(b, generator=g))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


@pytest.fixture
def mlp() -> nn.Sequential:
    return make_mlp()


@pytest.fixture
def cnn() -> nn.Sequential:
    return make_cnn()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The test machine is shared: one thread is faster than two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gpt2_config(*, n_embd: int, vocab: int, positions: int) -> Any:
    """A 2-layer, 2-head GPT-2 config (no download); skips the test without transformers."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'prunebound[hf]')"
    )
    return transformers.GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=positions,
        bos_token_id=0,
        eos_token_id=0,
    )
