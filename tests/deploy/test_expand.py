"""expand: a shrunk model back in its original shapes, so that certify bounds the shrunk model
against the original (the same bound as its masked twin), checked by the worst-gap search."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import with_bn_stats
from safetensors import safe_open
from safetensors.torch import save_file
from soundness import worst_gap
from torch import nn

import prunebound as pb
from prunebound.theory import certify

pytest.importorskip("torch_pruning")
SHAPE = (2, 6, 6)


def _bn_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )
    return with_bn_stats(net, torch.randn(16, *SHAPE))


def test_a_shrunk_model_certifies_with_its_masked_twins_bound() -> None:
    original = _bn_cnn(0)
    net = copy.deepcopy(original)
    x = torch.randn(4, *SHAPE)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    pb.prune(net, "neuron", 0.25, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    assert [m.weight.shape[0] for m in small if isinstance(m, nn.Conv2d | nn.Linear)] == [
        3,
        4,
        9,
        3,
    ]
    big = pb.expand(small, original)
    twin = certify(net, radius=1.0, input_shape=SHAPE)
    cert = certify(big, radius=1.0, input_shape=SHAPE, reference=original)
    assert cert.bound == pytest.approx(twin.bound, rel=1e-9)
    found = worst_gap(small, original, input_shape=SHAPE)  # the shrunk model itself
    assert 0 < found <= cert.bound
    assert pb.is_pruned(net) and not pb.is_pruned(big)  # neither input changed
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in big.parameters())


def test_a_shrink_that_folded_constants_certifies_soundly() -> None:
    """A plain neuron prune keeps the pruned neurons' biases: shrink folds their constant into
    the next bias, so the expansion is not the masked twin, but the same function."""
    torch.manual_seed(1)
    original = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    with torch.no_grad():
        for m in original:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(0.2, 1.0)  # live constants after ReLU
    net = copy.deepcopy(original)
    pb.prune(net, "neuron", 0.5)
    x = torch.randn(32, 8)
    small = pb.shrink(net, x)
    big = pb.expand(small, original)
    assert torch.allclose(big(x), net(x), atol=1e-5)
    cert = certify(big, radius=1.0, reference=original)
    assert 0 < worst_gap(small, original, input_shape=(8,)) <= cert.bound


def test_expand_refuses_what_it_cannot_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    original = _bn_cnn(2)
    net = copy.deepcopy(original)
    x = torch.randn(4, *SHAPE)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    with pytest.raises(ValueError, match="no record of the units it kept"):
        pb.expand(original, original)
    other = copy.deepcopy(original)
    other[0] = nn.Conv2d(2, 5, 3, padding=1)  # another width: the record reaches past it
    with pytest.raises(ValueError, match=r"layer '0'"):
        pb.expand(small, other)
    linear = copy.deepcopy(original)
    linear[3] = nn.Linear(6, 8)
    with pytest.raises(ValueError, match=r"layer '3' is a Conv2d in the shrunk model"):
        pb.expand(small, linear)
    # a file whose record does not fit its layers is corrupt, named as such
    path = pb.save_shrunk(small, tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    kept = json.loads(meta["kept_units"])
    kept["0"]["out"] = kept["0"]["out"][:-1]
    meta["kept_units"] = json.dumps(kept)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="corrupt kept_units record"):
        pb.load_shrunk(_bn_cnn(2), tmp_path / "bad.safetensors")
