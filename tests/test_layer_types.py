"""Layers beyond Linear/Conv (issue 10 item 4): transposed convolutions are pruned like convs
(filters on dim 1); recurrent and attention input weights are named, never silently skipped."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import prunebound as pb
from prunebound.layer_types import output_axis, unpruned_weights


def _decoder(dim: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1]
    return nn.Sequential(conv(3, 8, 3, stride=2), nn.ReLU(), conv(8, 2, 3))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_transpose_filters_are_dim_1_and_masks_survive_everything(
    dim: int, tmp_path: Path
) -> None:
    model = _decoder(dim)
    assert output_axis(model[0]) == 1 and list(pb.prunable_layers(model)) == ["0", "2"]
    pb.prune(model, "filter", 0.5)  # the output layer "2" is left alone
    keep = pb.masks(model)["0"]  # (in 3, out 8, k...)
    channels = keep.flatten(2).any(dim=(0, 2))
    assert set(pb.masks(model)) == {"0"} and int((~channels).sum()) == 4
    assert torch.equal(keep, channels.view(1, 8, *[1] * dim).expand_as(keep))  # whole channels
    x = torch.randn(2, 3, *[4] * dim)
    h = model[0](x)  # a pruned output channel computes its bias alone
    torch.testing.assert_close(
        h[:, ~channels], model[0].bias[~channels].view(1, -1, *[1] * dim).expand_as(h[:, ~channels])
    )
    pb.prune(model, "magnitude", 0.3, layers=["2"])
    expected = model(x)

    fresh = pb.load(_decoder(dim), pb.save(model, tmp_path / "m.safetensors"))
    assert all(torch.equal(fresh_m, pb.masks(model)[k]) for k, fresh_m in pb.masks(fresh).items())
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # retraining keeps pruned weights at 0
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    assert all(
        not m.weight[~pb.masks(model)[n]].any() for n, m in pb.prunable_layers(model).items()
    )

    revived = pb.reset(copy.deepcopy(model))
    assert not pb.is_pruned(revived) and bool(revived[0].weight[~keep].ne(0).any())
    baked = pb.remove(model)
    assert not pb.is_pruned(baked) and not baked[0].weight[~keep].any()


def test_conv_transpose_sparsity_flops_count_input_positions() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(2, 4, 3, stride=2))  # 4x4 input -> 9x9 output
    pb.prune(model, "magnitude", 0.5)
    sp = pb.sparsity(model, input_shape=(2, 4, 4))
    assert sp.dense_flops == 2 * 72 * 16 and sp.sparse_flops == 2 * 36 * 16


def test_grouped_conv_transpose_refuses_structured_pruning() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with pytest.raises(ValueError, match=r"grouped ConvTranspose2d \(groups=2\)"):
        pb.prune(model, "filter", 0.5)
    assert not pb.is_pruned(model)
    pb.prune(model, "magnitude", 0.5)  # unstructured is fine
    assert int((~pb.masks(model)["0"]).sum()) == round(0.5 * 4 * 3 * 9)


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(8, 16, num_layers=2)
        self.attn = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        h, _ = self.attn(h, h, h)
        return self.head(h)


def test_recurrent_and_attention_weights_are_named_and_counted() -> None:
    model = _Seq()
    names = unpruned_weights(model)
    assert names == [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1",
        "attn.in_proj_weight",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"5 weights of \['attn', 'lstm'\] stay dense"):
        pb.prune(model, "magnitude", 0.9)
    assert set(pb.masks(model)) == {"attn.out_proj", "head"}  # out_proj is a Linear
    sp = pb.sparsity(model)
    assert sp.sparsity == pytest.approx(0.9, abs=1e-3)  # of the pruned (Linear) weights
    baked = list(pb.remove(copy.deepcopy(model)).parameters())  # zeros among all parameters
    zeros = sum(int((p == 0).sum()) for p in baked)  # masked weights + attention's zero biases
    n_params = sum(p.numel() for p in baked)
    assert sp.model_params == n_params and sp.model_sparsity == pytest.approx(zeros / n_params)
    assert sp.model_sparsity < 0.2  # the LSTM holds most parameters: the model is mostly dense
    assert sp.unpruned == tuple(names)
    text = str(sp)
    assert (
        "prunable weights 90.0% zero" in text and f"all parameters {sp.model_sparsity:.1%}" in text
    )
    assert "not prunable here (5 weights): lstm.weight_ih_l0" in text
