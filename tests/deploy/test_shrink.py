"""shrink: a physically smaller model computing the masked model's function; coupled pruning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import with_bn_stats
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunebound as pb
from prunebound._masks import count_units

pytest.importorskip("torch_pruning")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach(), b.detach()
    return torch.allclose(a, b, rtol=tol, atol=tol * (1 + float(b.abs().max())))


def _check_expand(small: nn.Module, net: nn.Module, y: torch.Tensor, *, whole: bool) -> None:
    """`expand(small, net)` has net's shapes and small's function; after whole-unit pruning
    (nothing folded) its weights are the masked model's as it computes, except the input
    columns of removed units (zero in the expansion, dead inputs in the masked model)."""
    big = pb.expand(small, net).eval()
    assert _close(big(y), small.eval()(y), 1e-10 if y.dtype == torch.float64 else 1e-5)
    masked = pb.remove(copy.deepcopy(net)).state_dict()
    assert {k: v.shape for k, v in big.state_dict().items()} == {
        k: v.shape for k, v in masked.items()
    }
    if whole:
        for k, v in big.state_dict().items():
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                live = v != 0
                assert torch.equal(v[live], masked[k][live]), k
                if v.dim() > 0:  # the removed output units are the masked model's zero rows
                    dead = v.flatten(1).eq(0).all(1) if v.dim() > 1 else ~live
                    gone = masked[k].flatten(1).eq(0).all(1) if v.dim() > 1 else masked[k] == 0
                    assert torch.equal(dead, gone), k


def test_mlp_neurons_are_removed_with_exact_parameter_count() -> None:
    torch.manual_seed(0)
    net = pb.models.lenet_300_100()
    x = torch.randn(6, 784)
    pb.prune(net, "neuron", 0.5)
    before = copy.deepcopy(net.state_dict())
    small = pb.shrink(net, x)
    assert [m.out_features for m in small if isinstance(m, nn.Linear)] == [150, 50, 10]
    assert _params(small) == 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    # the pruned neurons' biases stayed: their constant outputs are folded into the next bias
    assert _close(small(x), net(x), 1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    assert pb.is_pruned(net) and not pb.is_pruned(small)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lenet5_filters_and_flatten_columns_in_both_precisions(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = pb.models.lenet5().to(dtype)
    x = torch.randn(5, 1, 28, 28, dtype=dtype)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    pb.prune(net, "neuron", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [3, 8]
    assert _params(small) < _params(net) / 3
    assert _close(small(x), net(x), 1e-12 if dtype == torch.float64 else 1e-5)


def test_vgg_with_batchnorm_coupled_is_exact_and_plain_keeps_constant_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    dense = with_bn_stats(pb.models.vgg_small(batch_norm=True), x)
    plain, whole = copy.deepcopy(dense), copy.deepcopy(dense)
    pb.prune(plain, "filter", 0.5)
    pb.prune(whole, "filter", 0.5, coupled=True, example_inputs=x)
    small_plain, small_whole = pb.shrink(plain, x), pb.shrink(whole, x)
    assert _close(small_plain(x), plain(x), 1e-5)
    assert _close(small_whole(x), whole(x), 1e-5)
    widths = [m.out_channels for m in small_whole.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16, 16, 32, 32, 64, 64]
    # rows only: BatchNorm shifts keep constant channels alive in front of padded convs
    assert _params(small_whole) < _params(small_plain) < _params(dense)


def test_resnet_residual_channels_go_only_as_whole_groups() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    dense = with_bn_stats(pb.models.resnet_small(), x)
    net = copy.deepcopy(dense)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    # the stem and the first block's conv2 feed one add: the same channels are pruned in both
    stem = pb.masks(net)["0"].flatten(1).any(1)
    assert torch.equal(stem, pb.masks(net)["3.conv2"].flatten(1).any(1))
    assert int(stem.sum()) == 8
    bn = net[1]
    assert torch.equal(bn.weight != 0, stem) and torch.equal(bn.bias != 0, stem)
    small = pb.shrink(net, x)
    assert small[0].out_channels == 8 and small[-1].in_features == 32
    assert _close(small(x), net(x), 1e-5)
    assert _params(small) < _params(dense) / 3
    # per-layer filter pruning does not align the residual channels: little can go
    plain = copy.deepcopy(dense)
    pb.prune(plain, "filter", 0.5)
    small_plain = pb.shrink(plain, x)
    assert _close(small_plain(x), plain(x), 1e-5)
    assert _params(small_plain) > _params(small)


class _Branches(nn.Module):
    """Depthwise conv, concat of two branches, and a split feeding two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.b = nn.Conv2d(2, 4, 1)
        self.mix = nn.Conv2d(10, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.dw(torch.relu(self.a(x)))), torch.relu(self.b(x))], 1)
        return self.head(self.pool(torch.relu(self.mix(y))).flatten(1))


def test_depthwise_and_concat_shrink_exactly() -> None:
    torch.manual_seed(0)
    net, x = _Branches(), torch.randn(3, 2, 8, 8)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)  # a and dw: one group
    small = pb.shrink(net, x)
    assert (small.a.out_channels, small.dw.groups, small.b.out_channels) == (3, 3, 2)
    assert (small.mix.in_channels, small.mix.out_channels, small.head.in_features) == (5, 4, 4)
    assert _close(small(x), net(x), 1e-5)
    _check_expand(small, net, x, whole=True)


def test_bad_input_is_refused_and_the_model_is_untouched() -> None:
    net = pb.models.lenet_300_100()
    pb.prune(net, "neuron", 0.5)
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="cannot run on example_inputs of shape"):
        pb.shrink(net, torch.randn(2, 100))
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        pb.shrink(net, [1, 2])
    with pytest.raises(ValueError, match="NaN or Inf"):
        pb.shrink(net, torch.full((2, 784), float("nan")))
    with pytest.raises(ValueError, match="needs example_inputs"):
        pb.prune(net, "neuron", 0.5, coupled=True)
    with pytest.raises(ValueError, match="structured ranking method"):
        pb.prune(net, "magnitude", 0.5, coupled=True, example_inputs=torch.randn(2, 784))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    ln = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"'1 \(LayerNorm\)'"):
        pb.shrink(ln, torch.randn(2, 4))


def test_a_layer_with_every_unit_pruned_is_named() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    pb.prune(net, "neuron", 1.0, coupled=True, example_inputs=x)
    with pytest.raises(ValueError, match="every output unit of layer '0'"):
        pb.shrink(net, x)


def test_shrunk_model_file_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    net = with_bn_stats(pb.models.resnet_small(), x)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    path = pb.save_shrunk(small, tmp_path / "small.safetensors")
    fresh = pb.models.resnet_small()
    loaded = pb.load_shrunk(fresh, path).eval()
    assert torch.equal(loaded(x), small(x)) and _params(loaded) == _params(small)
    assert loaded.kept_units == small.kept_units  # expand works on a loaded model too
    assert torch.equal(pb.expand(loaded, net).eval()(x), pb.expand(small, net).eval()(x))
    assert fresh[0].out_channels == 16  # the given model is left as built
    with pytest.raises(ValueError, match="do not match the model's"):
        pb.load_shrunk(pb.models.vgg_small(), path)
    with pytest.raises(ValueError, match="mask-free"):
        pb.save_shrunk(net, tmp_path / "masked.safetensors")


def test_shrunk_model_runs_in_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    net, x = pb.models.lenet5().eval(), torch.randn(4, 1, 28, 28)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    path = str(tmp_path / "small.onnx")
    with warnings.catch_warnings():  # the TorchScript exporter (no onnxscript) is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(small, (x,), path, dynamo=False)
    session = ort.InferenceSession(path)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _close(torch.from_numpy(y), net(x), 1e-5)


_ACTS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU)


@st.composite
def _chains(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, str, bool]:
    """Random conv chains (BatchNorm, activations that keep or break zeros, pooling) with a
    Flatten -> Linear head, or Linear chains; a structured prune, plain or coupled."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    conv = draw(st.booleans())
    c = 2
    if conv:
        for _ in range(draw(st.integers(1, 3))):
            out = draw(st.integers(2, 6))
            layers.append(nn.Conv2d(c, out, 3, padding=draw(st.sampled_from([0, 1]))))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out))
            layers.append(draw(st.sampled_from(_ACTS))())
            c = out
        if draw(st.booleans()):
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.Flatten())
        x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
        width = nn.Sequential(*layers).double()(x).shape[1]
    else:
        x = torch.randn(3, 5, dtype=torch.float64)
        width = 5
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(2, 6))
        layers += [nn.Linear(width, out), draw(st.sampled_from(_ACTS))()]
        width = out
    layers.append(nn.Linear(width, 3))
    net = with_bn_stats(nn.Sequential(*layers).double(), x) if conv else nn.Sequential(*layers)
    net = net.double().eval()
    method = "filter" if conv and draw(st.booleans()) else "neuron"
    return net, x, method, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(_chains())
def test_shrink_computes_the_masked_function_on_random_chains(
    case: tuple[nn.Module, torch.Tensor, str, bool],
) -> None:
    net, x, method, coupled = case
    convs = any(isinstance(m, nn.Conv2d) for m in net)
    if method == "neuron" and convs and sum(isinstance(m, nn.Linear) for m in net) == 1:
        return  # a conv chain whose only Linear is the head: "neuron" has nothing to prune
    pb.prune(net, method, 0.5, coupled=coupled, example_inputs=x if coupled else None)
    small = pb.shrink(net, x)
    assert _params(small) <= _params(net)
    y = torch.randn(7, *x.shape[1:], dtype=torch.float64)  # other inputs than the traced ones
    assert _close(small(y), net(y), 1e-10)
    sigmoid = any(isinstance(m, nn.Sigmoid) for m in net)  # 0 -> 1/2: padded convs keep it
    _check_expand(small, net, y, whole=coupled and not sigmoid)
    if coupled and not sigmoid:  # whole units: every pruned unit is gone (one group per layer)
        for name, m in pb.prunable_layers(net).items():
            if name == str(len(net) - 1):
                continue  # the head keeps its outputs (a one-layer model prunes it)
            assert small.get_submodule(name).weight.shape[0] == count_units(m, "row")[1]


def test_constant_channels_fold_into_unpadded_convs_but_not_padded_ones() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 8)
    for padding, width in ((0, 2), (1, 4)):  # sigmoid(0) = 1/2 reaches the second conv
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 4, 3, padding=padding), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * (4 + 2 * padding) ** 2, 3),
        )  # fmt: skip
        pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
        small = pb.shrink(net, x)
        assert (small[0].out_channels, small[2].out_channels) == (width, 2)
        assert _close(small(x), net(x), 1e-5)


class _Centred(nn.Module):
    """A forward that mixes channels (subtracts their mean): no module says so."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.head((y - y.mean(1, keepdim=True)).flatten(1))


def test_channels_a_forward_mixes_are_kept_and_grouped_convs_refused() -> None:
    torch.manual_seed(0)
    net, x = _Centred(), torch.randn(3, 2, 8, 8)
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)  # the head sees the pruned channels as -mean: not removable
    assert small.conv.out_channels == 4 and _close(small(x), net(x), 1e-5)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(ValueError, match=r"'0 \(Conv2d, groups=2\)'"):
        pb.shrink(grouped, torch.randn(2, 4, 8, 8))


def test_the_shrunk_model_keeps_the_training_mode_and_trains() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    net = with_bn_stats(pb.models.resnet_small(), x).train()
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=x)
    small = pb.shrink(net, x)
    assert small.training and net.training
    small(x).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.integers(2, 6), min_size=1, max_size=3),
    st.integers(1, 2),
    st.sampled_from([0.3, 0.5, 0.7]),
    st.booleans(),
)
def test_random_resnets_shrink_exactly(
    widths: list[int], blocks: int, amount: float, coupled: bool
) -> None:
    torch.manual_seed(sum(widths) + blocks)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    net = with_bn_stats(pb.models.resnet_small(widths=widths, blocks=blocks).double(), x)
    pb.prune(net, "filter", amount, coupled=coupled, example_inputs=x if coupled else None)
    small = pb.shrink(net, x)
    y = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    assert _close(small(y), net(y), 1e-10)
    _check_expand(small, net, y, whole=coupled)
    if coupled:  # every stage's residual stream lost round(amount * width) channels
        assert small[0].out_channels == widths[0] - round(amount * widths[0])
