"""Shared fixtures: small seeded models, one torch thread per test (helpers: `helpers.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import make_cnn, make_mlp
from torch import nn


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
