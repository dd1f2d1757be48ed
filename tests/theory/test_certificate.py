"""Deterministic certificates (theory/certify.py, norms.py, network.py): exact values on hand
examples, and certificate >= brute force / gradient-ascent gaps (docs/theory.md §7)."""

from __future__ import annotations

import copy
import importlib
import json
import math

import pytest
import torch
from soundness import worst_gap
from torch import nn

import prunebound as pb
from prunebound._masks import set_mask
from prunebound.theory.certificate import certify, float_margin
from prunebound.theory.lemma_a import propagate
from prunebound.theory.lipschitz import GELU_LIPSCHITZ, SILU_LIPSCHITZ, pool_multiplicity
from prunebound.theory.network import extract
from prunebound.theory.norms import (
    conv_norm,
    frobenius,
    kw_epsilon,
    lanczos_bound,
    norm_bound,
    schur,
    spectral_norm,
)
from prunebound.theory.resolve import conv_specs, from_widths

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(model: nn.Module) -> nn.Module:
    return pb.reset(copy.deepcopy(model))


def _dense(module: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a linear map (bias removed) on inputs of in_shape, column by column."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    m = copy.deepcopy(module).double()
    with torch.no_grad():
        zero = m(torch.zeros(1, *in_shape, dtype=torch.float64)).reshape(1, -1)
        return (m(eye).reshape(n, -1) - zero).T


def _disk_gap(model: nn.Module, radius: float, n_r: int = 60, n_t: int = 720) -> float:
    """Brute-force sup over a dense polar grid of the 2-D disk."""
    f, ref = copy.deepcopy(model).double().eval(), _reference(model).double().eval()
    rr = torch.linspace(0, radius, n_r, dtype=torch.float64)
    tt = torch.linspace(0, 2 * math.pi, n_t, dtype=torch.float64)
    rg, tg = torch.meshgrid(rr, tt, indexing="ij")
    x = torch.stack([rg * torch.cos(tg), rg * torch.sin(tg)], -1).reshape(-1, 2)
    with torch.no_grad():
        return float((f(x) - ref(x)).norm(dim=1).max())


def _mlp(widths: tuple[int, ...], seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)  # test-only: default init of nn.Linear uses the global RNG
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(act())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------- hand examples


def _hand_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    set_mask(net[0], torch.tensor([[True, True], [True, False]]))
    return net


def test_hand_single_layer_is_exact() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    set_mask(net[0], torch.tensor([[True, True], [True, False]]))
    cert = certify(net, radius=3.0)
    # ||Delta|| R, attained at x = (0, 3), with the floating-point margin (docs §7.3b)
    assert cert.candidates[cert.method] == pytest.approx(3.0, rel=1e-9)
    assert cert.bound == pytest.approx(3.0 * (1 + 1e-9) + 1e-12 * (6.0 + 1.0), rel=1e-12)
    assert cert.output_scale == pytest.approx(6.0, rel=1e-9)  # ||W|| R
    assert cert.relative == pytest.approx(0.5, rel=2e-9)


def test_hand_two_layers_matches_lemma_a_by_hand() -> None:
    net = _hand_net()
    cert = certify(net, radius=1.0)
    golden = (1 + math.sqrt(5)) / 2  # ||[[1, 1], [0, 1]]||
    assert cert.candidates["lemma_a"] == pytest.approx(golden * 1.0, rel=1e-9)
    assert cert.layers[0].norm_delta == pytest.approx(1.0, rel=1e-9)
    assert cert.layers[1].norm_w == pytest.approx(golden, rel=1e-9)
    assert cert.layers[0].contribution == pytest.approx(golden, rel=1e-9)
    # true sup: f - F = W2 (0, -relu(x2)) has norm sqrt(2) relu(x2) <= sqrt(2)
    assert _disk_gap(net, 1.0) == pytest.approx(math.sqrt(2), rel=1e-3)
    assert cert.bound >= math.sqrt(2)


def test_unpruned_model_certifies_zero() -> None:
    cert = certify(_mlp((5, 7, 3), 0))
    assert cert.bound == 0.0
    assert all(t.norm_delta == 0 for t in cert.layers)


def test_lemma_a_candidate_equals_propagate() -> None:
    net = pb.prune(_mlp((10, 12, 8, 4), 1), "magnitude", 0.4)
    cert = certify(net, radius=2.0, slopes=False)
    prop = propagate(
        [t.norm_w for t in cert.layers],
        [t.norm_kept for t in cert.layers],
        [t.norm_delta for t in cert.layers],
        [float(net[i].bias.detach().norm()) for i in (0, 2, 4)],
        2.0,
    )
    assert cert.candidates["lemma_a"] == pytest.approx(prop.gap, rel=1e-9)
    assert sum(t.contribution for t in cert.layers) == pytest.approx(prop.gap, rel=1e-9)
    assert cert.output_scale == pytest.approx(prop.output_scale, rel=1e-6)  # float32 bias norms
    assert cert.bound <= cert.candidates["lemma_a"]
    assert cert.method in cert.candidates
    json.dumps(cert.to_dict())
    both = certify(net, radius=2.0)  # relax on: output scale is the min of two valid bounds
    assert both.output_scale <= cert.output_scale
    assert both.bound == float_margin(min(both.candidates.values()), both.output_scale, 2.0)
    assert set(both.candidates) == {"lemma_a", "lemma_a_mixed", "triangle", "slopes", "hybrid"}


# ------------------------------------------------------------------------ brute-force soundness


@pytest.mark.parametrize(
    "act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU]
)
def test_certificate_bounds_dense_grid_on_2d_disk(act: type[nn.Module]) -> None:
    for seed in range(3):
        net = pb.prune(_mlp((2, 16, 16, 2), seed, act), "magnitude", 0.5)
        cert = certify(net, radius=1.5)
        brute = _disk_gap(net, 1.5)
        assert brute > 0
        assert cert.bound >= brute * (1 - 1e-9), f"{act.__name__} seed {seed}: {cert} < {brute}"


def test_certificate_bounds_1d_input_with_batchnorm() -> None:
    torch.manual_seed(3)
    bn = nn.BatchNorm1d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    net = nn.Sequential(nn.Linear(1, 8), bn, nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    pb.prune(net, "random", 0.5, seed=0)
    cert = certify(net, radius=2.0)
    x = torch.linspace(-2, 2, 20001, dtype=torch.float64).unsqueeze(1)
    f, ref = copy.deepcopy(net).double(), _reference(net).double()
    with torch.no_grad():
        brute = float((f(x) - ref(x)).norm(dim=1).max())
    assert 0 < brute <= cert.bound


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certificate_bounds_gradient_ascent_mlp(seed: int) -> None:
    net = pb.prune(_mlp((20, 30, 30, 5), seed), "magnitude", 0.6)
    cert = certify(net, radius=1.0)
    low = worst_gap(net, input_shape=(20,), seed=seed)
    assert 0 < low <= cert.bound
    assert cert.bound / low < 20  # sanity: not absurdly loose on a small net


def test_certificate_bounds_gradient_ascent_cnn() -> None:
    torch.manual_seed(0)
    shape = (2, 6, 6)
    body = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        width = body(torch.zeros(1, *shape)).shape[1]
    net = nn.Sequential(*body, nn.Linear(width, 3))
    pb.prune(net, "magnitude", 0.5)
    cert = certify(net, radius=1.0, input_shape=shape)
    low = worst_gap(net, input_shape=shape)
    assert 0 < low <= cert.bound
    assert [t.name for t in cert.layers] == ["0", "3", "7"]


# -------------------------------------------------------------------------------------- norms


def test_matrix_norm_bounds_are_upper_and_tight() -> None:
    a = torch.randn(300, 200, generator=_gen(0), dtype=torch.float64)
    exact = float(torch.linalg.svdvals(a)[0])
    assert exact <= spectral_norm(a) <= exact * (1 + 1e-9)
    assert exact <= spectral_norm(a.T) <= exact * (1 + 1e-9)
    assert exact <= frobenius(a) and exact <= schur(a)
    lz = lanczos_bound(a, steps=100, fail_prob=1e-9, seed=_gen(1))
    assert exact <= lz.value <= exact * 1.03
    assert lz.lower <= exact * (1 + 1e-9)
    assert lz.fail_prob == 1e-9
    nb = norm_bound(a, exact_max=50, seed=_gen(2))
    assert nb.method in ("lanczos", "frobenius/schur") and nb.value >= exact
    assert norm_bound(a).method == "gram"


def test_lanczos_bound_holds_on_hard_spectra() -> None:
    # near-degenerate top of the spectrum: Ritz values converge slowly, the KW factor still covers
    u, _ = torch.linalg.qr(torch.randn(400, 400, generator=_gen(3), dtype=torch.float64))
    s = torch.linspace(1.0, 0.0, 400, dtype=torch.float64) ** 0.05
    a = u * s
    for seed in range(5):
        assert lanczos_bound(a, steps=30, seed=_gen(seed)).value >= float(s[0])


def test_kw_epsilon_solves_its_equation() -> None:
    eps = kw_epsilon(4096, 100, 1e-9)
    assert 1.648 * 64 * math.exp(-math.sqrt(eps) * 199) == pytest.approx(1e-9, rel=1e-9)
    assert kw_epsilon(4096, 200, 1e-9) < eps


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "size", "stride", "pad", "dil"),
    [
        (2, 3, (3, 3), (6, 6), 1, 0, 1),
        (2, 3, (3, 3), (7, 7), 2, 1, 1),
        (3, 2, (2, 3), (5, 6), (2, 1), (1, 0), 1),
        (2, 2, (3, 3), (8, 8), 1, 2, 2),
        (3, 4, (3,), (9,), 2, 1, 1),
        (1, 1, (5,), (12,), 1, 2, 1),
    ],
)
def test_conv_norm_upper_bounds_exact_dense_norm(c_in, c_out, k, size, stride, pad, dil) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(sum(size) + c_in)
    conv = (nn.Conv1d if len(size) == 1 else nn.Conv2d)(
        c_in, c_out, k, stride=stride, padding=pad, dilation=dil, bias=False
    )
    exact = float(torch.linalg.matrix_norm(_dense(conv, (c_in, *size)), 2))
    st = stride if isinstance(stride, tuple) else (stride,)
    pd = pad if isinstance(pad, tuple) else (pad,)
    bound = conv_norm(conv.weight, size, stride=st, padding=pd, dilation=(dil,))
    assert bound >= exact * (1 - 1e-12)
    assert bound <= 2.0 * exact, f"bound {bound} vs exact {exact}"


def test_conv_norm_is_tight_for_stride_one_large_input() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=_gen(5)))
    exact = float(torch.linalg.matrix_norm(_dense(conv, (3, 12, 12)), 2))
    assert exact <= conv_norm(conv.weight, (12, 12), padding=1) <= 1.1 * exact


# -------------------------------------------------------------------------- network constants


def test_gelu_and_silu_constants_cover_the_derivative() -> None:
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64, requires_grad=True)
    for fn, lip in ((nn.functional.gelu, GELU_LIPSCHITZ), (nn.functional.silu, SILU_LIPSCHITZ)):
        (d,) = torch.autograd.grad(fn(x).sum(), x)
        assert float(d.abs().max()) <= lip
        assert lip - float(d.abs().max()) < 1e-3


@pytest.mark.parametrize(
    ("pool", "in_shape"),
    [
        (nn.MaxPool2d(3, stride=1), (1, 7, 7)),
        (nn.MaxPool2d(3, stride=2, padding=1), (2, 8, 8)),
        (nn.AvgPool2d(3, stride=1), (1, 7, 7)),
        (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 8, 8)),
        (nn.MaxPool1d(4, stride=1), (1, 16)),
    ],
)
def test_pool_lipschitz_constant_holds(pool: nn.Module, in_shape: tuple[int, ...]) -> None:
    conv = nn.Conv2d(1, 1, 1) if len(in_shape) == 3 else nn.Conv1d(1, 1, 1)
    net = extract(nn.Sequential(conv, pool), (1, *in_shape[1:]))
    lip = net.steps[1].lipschitz
    x = torch.randn(4000, *in_shape, generator=_gen(0), dtype=torch.float64)
    y = x + 0.3 * torch.randn(x.shape, generator=_gen(1), dtype=torch.float64)
    ratio = (pool(x) - pool(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= lip
    if isinstance(pool, nn.AvgPool2d) and pool.count_include_pad:  # linear: compare exact norm
        exact = float(torch.linalg.matrix_norm(_dense(pool, in_shape), 2))
        assert exact <= lip <= 3 * exact


def test_pool_multiplicity_formula() -> None:
    assert pool_multiplicity([3, 3], [1, 1], [1, 1]) == 9
    assert pool_multiplicity([2, 2], [2, 2], [1, 1]) == 1
    assert pool_multiplicity([3], [2], [1]) == 2
    assert pool_multiplicity([3], [1], [2]) == 3


def test_extract_network_view() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 5),
        nn.Sigmoid(),
        nn.Linear(5, 2),
    )
    view = extract(net, (1, 8, 8))
    assert [s.name for s in view.specs] == ["0", "3", "5"]
    assert view.specs[0].in_shape == (1, 8, 8) and view.specs[1].in_shape == (32,)
    assert view.lipschitz == (1.0, 0.25, 1.0)
    sig = next(s for s in view.steps if isinstance(s.module, nn.Sigmoid))
    assert sig.offset == pytest.approx(0.5 * math.sqrt(5))
    pb.prune(net, "magnitude", 0.5)
    w, wt = extract(net, (1, 8, 8)).steps[0].weights()
    assert int((wt == 0).sum()) == 9 and torch.equal(wt, w * (wt != 0))
    with pytest.raises(ValueError, match="not a prunable"):
        view.steps[1].weights()
    assert [s.name for s in from_widths([4, 3, 2])] == ["1", "3"]
    assert from_widths([4, 3, 2])[1].shape == (2, 3)
    cs = conv_specs([1, 4, 8], 3, (28, 28), stride=2, padding=1)
    assert cs[1].in_shape == (4, 14, 14) and cs[1].shape == (8, 4, 3, 3)


# ------------------------------------------------------------------------------------ errors


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(ValueError, match=r"'2'.*Softmax"):
        certify(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Softmax(dim=1)))
    with pytest.raises(ValueError, match=r"'1.0'.*_Residual"):
        certify(nn.Sequential(nn.Linear(4, 4), nn.Sequential(_Residual())))
    with pytest.raises(ValueError, match="groups=1"):
        certify(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), input_shape=(2, 5, 5))
    with pytest.raises(ValueError, match="input_shape is required"):
        certify(nn.Sequential(nn.Conv2d(1, 2, 3)))
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="BatchNorm"):
        certify(bn)  # training mode


@pytest.mark.parametrize("radius", [0.0, -1.0, math.inf, math.nan])
def test_bad_radius_raises(radius: float) -> None:
    with pytest.raises(ValueError, match=r"radius must be .*> 0"):
        certify(_mlp((3, 2), 0), radius=radius)


def test_non_finite_weights_raise() -> None:
    net = _mlp((3, 4, 2), 0)
    with torch.no_grad():
        net[2].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"'2.weight'.*finite"):
        certify(net)


# ------------------------------------------------------------------------- measured tightness


def test_mnist_mlp_tightness_against_gradient_ascent() -> None:
    net = pb.prune(pb.models.mlp([784, 300, 100, 10]).eval(), "magnitude", 0.3)
    cert = certify(net, radius=1.0)
    low = worst_gap(net, input_shape=(784,), starts=32, steps=100)
    assert 0 < low <= cert.bound
    assert cert.bound <= cert.candidates["lemma_a"]
    assert cert.bound / low < 50


# ------------------------------------------------------------------ slope decomposition (relax)


def test_relax_hand_two_layers() -> None:
    # z = (2 x1, x2) unstable on the unit disk, p = -Delta x = (0, -x2): the difference is
    # 1/2 W2 p + 1/2 W2 v with ||v|| <= ||p|| <= 1, so relax = (||W2 e2|| + ||W2||) / 2
    # (triangle sum); the stacked bound ||[B_x / t_x, B_v / t_v]|| sqrt(t_x^2 + t_v^2) with
    # B_x = W2 diag(0, -1) / 2, B_v = W2 / 2, t^2 = ||B|| (radii 1) is smaller (docs §7.5)
    cert = certify(_hand_net(), radius=1.0)
    golden = (1 + math.sqrt(5)) / 2
    w2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    bx, bv = w2 @ torch.diag(torch.tensor([0.0, -1.0], dtype=torch.float64)) / 2, w2 / 2
    tx, tv = math.sqrt(math.sqrt(2) / 2), math.sqrt(golden / 2)
    stacked = float(torch.linalg.matrix_norm(torch.cat([bx / tx, bv / tv], 1), ord=2))
    stacked *= math.sqrt(tx**2 + tv**2)
    assert stacked < (math.sqrt(2) + golden) / 2
    assert cert.candidates["slopes"] == pytest.approx(stacked, rel=1e-9)
    assert cert.method == "slopes"
    assert cert.bound >= math.sqrt(2)  # the exact sup (see the Lemma A hand test)


def test_relax_single_layer_is_exact() -> None:
    net = pb.prune(_mlp((6, 4), 0), "magnitude", 0.5)
    cert = certify(net, radius=2.0)
    delta = (pb.original_weight(net[0]) - net[0].weight).detach().double()
    exact = 2.0 * float(torch.linalg.matrix_norm(delta, ord=2))
    assert cert.candidates["slopes"] == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh])
@pytest.mark.parametrize("radius", [0.3, 1.5])
def test_relax_bounds_dense_grid_on_2d_disk(act: type[nn.Module], radius: float) -> None:
    for seed in range(3):
        net = pb.prune(_mlp((2, 16, 16, 2), seed, act), "magnitude", 0.5)
        cert = certify(net, radius=radius, slopes=True)
        brute = _disk_gap(net, radius)
        assert 0 < brute <= cert.candidates["slopes"] * (1 + 1e-12)
        assert 0 < brute <= cert.candidates["hybrid"] * (1 + 1e-12)
        assert cert.candidates["hybrid"] <= cert.candidates["lemma_a"] * (1 + 1e-12)


def test_relax_exact_when_all_neurons_stable() -> None:
    # huge positive biases: every ReLU is active on the ball, the network is affine there, and
    # relax is the exact sup ||(W2 W1 - W~2 W~1) x|| = R ||W2 W1 - W~2 W~1||
    net = _mlp((3, 5, 2), 4)
    with torch.no_grad():
        net[0].bias.fill_(100.0)
    pb.prune(net, "magnitude", 0.4)
    cert = certify(net, radius=1.0)
    w1, w2 = (pb.original_weight(net[i]).detach().double() for i in (0, 2))
    t1, t2 = (net[i].weight.detach().double() for i in (0, 2))
    lin = float(torch.linalg.matrix_norm(w2 @ w1 - t2 @ t1, ord=2))
    b = net[0].bias.detach().double()
    const = float(torch.linalg.vector_norm((w2 - t2) @ b))
    # sup_x ||A x + c|| <= ||A|| + ||c|| (relax's bound) and >= max(||A||, ||c||)
    assert max(lin, const) <= cert.candidates["slopes"] <= (lin + const) * (1 + 1e-9)
    assert cert.candidates["slopes"] < cert.candidates["lemma_a"]


@pytest.mark.parametrize("seed", [0, 1])
def test_relax_bounds_gradient_ascent_conv_and_batchnorm(seed: int) -> None:
    torch.manual_seed(seed)
    shape = (2, 6, 6)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 2)
    body = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1),
        bn,
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():
        width = body(torch.zeros(1, *shape)).shape[1]
    net = nn.Sequential(*body, nn.Linear(width, 3)).eval()
    pb.prune(net, "magnitude", 0.5)
    cert = certify(net, radius=1.0, input_shape=shape, slopes=True)
    low = worst_gap(net, input_shape=shape, seed=seed)
    assert 0 < low <= cert.candidates["slopes"]


def test_relax_skipped_with_note_for_max_pool() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Unflatten(1, (1, 8)))
    with pytest.raises(ValueError, match="Unflatten"):
        certify(net)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(12, 2)
    )
    pb.prune(net, "magnitude", 0.5)
    cert = certify(net, input_shape=(1, 14))
    assert "slopes" not in cert.candidates
    assert any("MaxPool1d" in n for n in cert.notes)
    with pytest.raises(ValueError, match="slopes=True"):
        certify(net, input_shape=(1, 14), slopes=True)


def test_relax_wins_on_default_init_mlp_and_halves_lemma_a() -> None:
    torch.manual_seed(0)
    net = pb.prune(pb.models.mlp([784, 300, 100, 10]).eval(), "magnitude", 0.3)
    cert = certify(net, radius=1.0)
    assert cert.method in ("slopes", "hybrid")
    assert cert.bound < 0.6 * cert.candidates["lemma_a"]


# ----------------------------------------------------------- large layers: operator Lanczos path


@pytest.mark.parametrize("amount", [0.3, 0.9])
def test_large_layer_path_bounds_exact_norms(
    amount: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    cmod = importlib.import_module("prunebound.theory.certificate")
    monkeypatch.setattr(cmod, "EXACT_MAX", 8)  # force Lanczos operators (CSR at 90%)
    net = pb.prune(_mlp((20, 30, 30, 5), 2), "magnitude", amount)
    cert = certify(net, radius=1.0, slopes=False, seed=_gen(0))
    for t, i in zip(cert.layers, (0, 2, 4), strict=True):
        w = pb.original_weight(net[i]).detach().double()
        wt = net[i].weight.detach().double()
        for bound, mat in ((t.norm_w, w), (t.norm_kept, wt), (t.norm_delta, w - wt)):
            exact = float(torch.linalg.matrix_norm(mat, ord=2))
            assert exact * (1 - 1e-9) <= bound
    low = worst_gap(net, input_shape=(20,))
    assert 0 < low <= cert.bound
    monkeypatch.setattr(cmod, "EXACT_MAX", 1024)
    exact_cert = certify(net, radius=1.0, slopes=False)
    assert cert.bound >= exact_cert.bound * (1 - 1e-9)


def test_nested_train_mode_layers_are_named() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Dropout(0.5)), nn.Linear(16, 4)
    ).eval()
    model[1][1].train()  # type: ignore[index]
    with pytest.raises(ValueError, match=r"'1\.1' \(Dropout\) with training=True"):
        certify(model)
    bn = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.BatchNorm1d(3))).eval()
    bn[1][0].train()  # type: ignore[index]
    with pytest.raises(ValueError, match=r"'1\.0' \(BatchNorm1d\) with training=True"):
        certify(bn)
    model.eval()
    assert certify(model).bound == 0.0


# ----------------------------------------------------------------- whole units and references


def _bn_cnn() -> tuple[nn.Sequential, tuple[int, ...]]:
    from helpers import with_bn_stats

    torch.manual_seed(3)
    shape = (2, 6, 6)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 36, 3),
    )
    return with_bn_stats(net, torch.randn(16, *shape)), shape


def test_whole_filter_masks_with_batchnorm_are_certified() -> None:
    """Coupled filter pruning masks bias and BatchNorm entries with the row; certify models
    those gaps (the padded-border pattern of a live shift) and stays above the worst gap."""
    net, shape = _bn_cnn()
    pb.prune(net, "filter", 0.5, coupled=True, example_inputs=torch.randn(1, *shape))
    assert isinstance(net[1].parametrizations.bias[0], pb.Mask)  # the BN shift is masked too
    cert = certify(net, radius=1.0, input_shape=shape)
    low = worst_gap(net, input_shape=shape)
    assert 0 < low <= cert.bound


def test_baked_model_certified_against_reference() -> None:
    """A model whose masks were made permanent has no record of the original: certify says so,
    and with `reference=` gives the masked model's bound."""
    net = _mlp((8, 16, 16, 3), seed=5)
    pb.prune(net, "neuron", 0.25)
    original = _reference(net)
    masked_bound = certify(net, radius=1.0).bound
    baked = pb.remove(copy.deepcopy(net))
    unreferenced = certify(baked, radius=1.0)
    assert unreferenced.bound == 0 and "reference" in str(unreferenced.notes)
    cert = certify(baked, radius=1.0, reference=original)
    assert cert.bound == pytest.approx(masked_bound, rel=1e-6)
    assert worst_gap(baked, original, input_shape=(8,)) <= cert.bound


def test_reference_of_another_chain_is_refused() -> None:
    net = _mlp((8, 16, 3), seed=1)
    other = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"layer '1'.*Tanh"):
        certify(net, radius=1.0, reference=other)
    with pytest.raises(ValueError, match="are not the model's"):
        certify(net, radius=1.0, reference=_mlp((8, 16, 16, 3), seed=1))
