"""Soundness: every certificate bounds the worst gap the shared harness finds, or is refused
with a message naming the module (issue 9). The harness is `tests/soundness.py`."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from scipy import stats
from soundness import architectures, assert_sound, scale_biases, worst_gap
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunebound as pb
from prunebound._masks import original_weight, set_mask
from prunebound.theory.certificate import certify


def _scaled_mlp(
    seed: int, widths: list[int], *, between: list[nn.Module], bias: float
) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), *copy.deepcopy(between)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.mul_(bias)
    return model


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(architectures())
def test_certificate_bounds_the_worst_gap_on_random_architectures(case) -> None:  # type: ignore[no-untyped-def]
    cert = certify(case.model, radius=case.radius, input_shape=case.input_shape)
    found = worst_gap(case.model, radius=case.radius, input_shape=case.input_shape)
    assert_sound(cert.bound, found, f"certificate of {case.description}")


@pytest.mark.parametrize(
    "between",
    [[nn.Identity()], [nn.Dropout(0.5)], [nn.Flatten()], [nn.Identity(), nn.Identity()]],
    ids=["identity", "dropout", "flatten", "two"],
)
def test_affine_no_op_steps_keep_the_difference_constant(between: list[nn.Module]) -> None:
    # defect 1: the difference network's constant was dropped through affine steps
    plain = pb.prune(_scaled_mlp(1, [4, 8, 8, 2], between=[], bias=30.0), "magnitude", 0.5)
    padded = _scaled_mlp(1, [4, 8, 8, 2], between=between, bias=30.0)
    _copy_masks(plain, padded)
    found = worst_gap(plain, radius=1.0, input_shape=(4,))
    c_plain = certify(plain, radius=1.0).bound
    c_padded = certify(padded, radius=1.0).bound
    assert_sound(c_padded, found)
    assert c_padded == pytest.approx(c_plain, rel=1e-9)


def _copy_masks(src: nn.Module, dst: nn.Module) -> None:
    """Give dst (same Linear layers, other steps between) src's weights and masks."""
    name_of = {id(m): n for n, m in src.named_modules()}
    a = [m for m in src.modules() if isinstance(m, nn.Linear)]
    b = [m for m in dst.modules() if isinstance(m, nn.Linear)]
    for x, y in zip(a, b, strict=True):
        with torch.no_grad():
            y.weight.copy_(original_weight(x))
            y.bias.copy_(x.bias)
        set_mask(y, pb.masks(src)[name_of[id(x)]])


def test_project_cnn_with_flatten_is_certified_above_its_gap() -> None:
    torch.manual_seed(0)
    model = pb.models.cnn([4, 8], pool=False, image_size=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.bias.mul_(10)
    pb.prune(model, "magnitude", 0.5)
    found = worst_gap(model, radius=0.1, input_shape=(1, 10, 10))
    assert_sound(certify(model, radius=0.1, input_shape=(1, 10, 10)).bound, found)


def test_a_shared_activation_instance_is_every_step_it_is_used_in() -> None:
    # defect 2: named_children() de-duplicated the shared ReLU: a shorter network was certified
    torch.manual_seed(0)
    act = nn.ReLU()
    l1, l2, l3 = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
    shared = pb.prune(nn.Sequential(l1, act, l2, act, l3), "magnitude", 0.5)
    separate = nn.Sequential(shared[0], nn.ReLU(), shared[2], nn.ReLU(), shared[4])
    assert len(pb.theory.extract(shared).steps) == 5
    c_shared = certify(shared, radius=1.0).bound
    assert c_shared == pytest.approx(certify(separate, radius=1.0).bound, rel=1e-12)
    assert_sound(c_shared, worst_gap(shared, radius=1.0, input_shape=(3,)))


def test_a_prunable_layer_applied_twice_is_refused_naming_both_uses() -> None:
    lin = nn.Linear(4, 4)
    model = pb.prune(nn.Sequential(lin, nn.ReLU(), lin), "magnitude", 0.5)
    with pytest.raises(ValueError, match=r"layer '2'.*same module instance as layer '0'"):
        certify(model, radius=1.0)


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class _Block(nn.Sequential):
    """A Sequential subclass that adds nothing to forward: still the plain chain."""


class _Tweaked(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


class _InitOnly(nn.Linear):
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def test_modules_with_their_own_forward_are_refused_by_name() -> None:
    # defects 3 and 11: a residual Sequential subclass and a ReLU subclass were modelled as plain
    res = nn.Sequential(nn.Linear(4, 4), _Residual(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    with pytest.raises(
        ValueError, match=r"layer '1' \(_Residual\).*subclass defining \['forward'\]"
    ):
        certify(pb.prune(res, "magnitude", 0.5), radius=1.0)
    tweak = nn.Sequential(nn.Linear(4, 4), _Tweaked(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(_Tweaked\)"):
        certify(pb.prune(tweak, "magnitude", 0.5), radius=1.0)
    own = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    own[1].forward = lambda x: torch.relu(x) + 1  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"layer '1' \(ReLU\) has an instance-level forward"):
        certify(own, radius=1.0)


def test_inert_subclasses_are_their_torch_class() -> None:
    torch.manual_seed(0)
    model = _Block(_InitOnly(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.normal_()
    pb.prune(model, "magnitude", 0.5)
    assert_sound(certify(model, radius=1.0).bound, worst_gap(model, input_shape=(4,)))


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU], ids=["gelu", "relu"])
def test_token_wise_linear_counts_its_bias_at_every_token(act: type[nn.Module]) -> None:
    # defect 4: a Linear on a (T, d) sample counted its bias once; ReLU crashed in relax
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), act(), nn.Linear(8, 2), nn.Flatten()).eval()
    with torch.no_grad():
        model[0].bias.mul_(20)
    pb.prune(model, "magnitude", 0.6)
    cert = certify(model, radius=0.5, input_shape=(5, 3))
    assert_sound(cert.bound, worst_gap(model, radius=0.5, input_shape=(5, 3)))
    one = certify(model, radius=0.5, input_shape=(1, 3))
    assert cert.output_scale > 2 * one.output_scale  # the bias of 5 tokens, not of 1


def test_hooks_are_refused_and_torch_prune_models_point_to_the_importer() -> None:
    # defect 11: torch.nn.utils.prune's pre-hook recomputes weight: certificate 0.0 was returned
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"layer '0'.*hooks.*import_torch_prune"):
        certify(model, radius=1.0)
    pb.import_torch_prune(model)
    assert_sound(certify(model, radius=1.0).bound, worst_gap(model, input_shape=(4,)))
    handle = model[1].register_forward_hook(lambda mod, inp, out: out * 3)
    with pytest.raises(ValueError, match=r"layer '1' \(ReLU\) has forward hooks"):
        certify(model, radius=1.0)
    handle.remove()
    handle = model.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    with pytest.raises(ValueError, match=r"layer '<model>'.*hooks"):
        certify(model, radius=1.0)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda mod, inp, out: out)
    try:
        with pytest.raises(ValueError, match="global forward hooks"):
            certify(model, radius=1.0)
    finally:
        handle.remove()
    certify(model, radius=1.0)  # all hooks gone: accepted again


def test_max_pool_with_indices_is_a_clear_refusal() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.MaxPool1d(2, return_indices=True))
    with pytest.raises(ValueError, match=r"layer '1' \(MaxPool1d\).*return_indices"):
        certify(model, radius=1.0, input_shape=(1, 6))


def test_a_bound_above_the_output_bound_is_flagged_vacuous() -> None:
    # defect 6: 194.25 vs r_L 179.56 was reported as a certificate
    torch.manual_seed(0)
    model = pb.prune(pb.models.lenet_300_100(in_features=64).eval(), "magnitude", 0.9)
    cert = certify(model, radius=1.0)
    assert cert.bound >= cert.output_scale and cert.vacuous
    assert "VACUOUS" in str(cert) and any(
        "no better than the trivial bound" in n for n in cert.notes
    )
    mild = certify(pb.prune(pb.models.lenet_300_100(in_features=64).eval(), "magnitude", 0.1))
    assert not mild.vacuous and "VACUOUS" not in str(mild)


def test_low_precision_models_say_the_bound_is_for_exact_arithmetic() -> None:
    # defect 13: fp16 rounding noise reached 0.86x the certificate at 0.1% pruning
    torch.manual_seed(0)
    model = pb.prune(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), "magnitude", 0.001
    )
    half = copy.deepcopy(model).half()
    note = next(n for n in certify(half, radius=1.0).notes if "exact-arithmetic" in n)
    assert "float16" in note and "not negligible here" in note
    note32 = next(n for n in certify(model, radius=1.0).notes if "exact-arithmetic" in n)
    assert "float32" in note32 and "not negligible" not in note32


def test_certificate_of_a_retrained_model_says_what_its_reference_is() -> None:
    torch.manual_seed(0)
    model = pb.prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "magnitude", 0.5)
    assert not any("trained after pruning" in n for n in certify(model).notes)
    with torch.no_grad():
        original_weight(model[0]).add_(0.01)
    assert any("'0'" in n and "trained after pruning" in n for n in certify(model).notes)


def test_a_plan_applies_only_to_the_shapes_it_was_made_for() -> None:
    # defect 5: a 784-300-100-10 plan was applied to 784-400-100-10 without a word
    p = pb.theory.plan([784, 300, 100, 10], eps=0.5, delta=0.05)
    with pytest.raises(
        ValueError, match=r"plan layer '1' has weight shape \(300, 784\).*\(400, 784\)"
    ):
        pb.prune(pb.models.mlp([784, 400, 100, 10]), plan=p)
    with pytest.raises(ValueError, match=r"plan layer '5' has weight shape \(10, 100\)"):
        pb.prune(pb.models.mlp([784, 300, 100, 50, 10]), plan=p)
    four = nn.Sequential(*(nn.Linear(784 if i == 0 else 10, 10) for i in range(4)))
    with pytest.raises(ValueError, match="plan is for 3 prunable layers"):
        pb.prune(four, plan=p)
    # a user's own Sequential names its layers '0', '2', '4': matched by position and shape
    own = nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    pb.prune(own, plan=p)
    assert {n: int((~m).sum()) for n, m in pb.masks(own).items()} == {
        "0": p.counts["1"],
        "2": p.counts["3"],
        "4": p.counts["5"],
    }
    untouched = pb.models.mlp([784, 400, 100, 10])
    with pytest.raises(ValueError):
        pb.prune(untouched, plan=p)
    assert not pb.masks(untouched)


def _plan_warns(model: nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pb.theory.plan(model, eps=0.5, delta=0.05)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_a_prior_law_plan_of_a_model_off_the_law_warns_and_names_the_alternatives() -> None:
    # defect 7: the only sign was Plan.notes
    torch.manual_seed(0)
    model = pb.models.mlp([64, 32, 16, 10])
    with torch.no_grad():
        model[3].weight.mul_(4)  # as training moves weights off their initial law
    (msg,) = _plan_warns(model)
    assert "['3']" in msg and "law='trained'" in msg and "data_certificate" in msg


def test_the_law_check_holds_its_level_on_fresh_default_init_models() -> None:
    # defect 7: about 3 in 20 fresh models raised a false alarm (5% per layer, 3 layers)
    alarms = 0
    for seed in range(100):
        torch.manual_seed(seed)
        alarms += bool(_plan_warns(pb.models.mlp([64, 32, 16, 10])))
    assert alarms <= 10  # the level is 5%: P(Binomial(100, 0.05) > 10) < 1.2%


def _strided_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # the law: PyTorch's default init, U[-1/sqrt(fan_in), 1/sqrt(fan_in)]
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 3),
    ).eval()


CNN_SHAPE = (1, 10, 10)


@pytest.mark.parametrize("seed", [0, 2])
def test_tightened_trained_plan_holds_at_attained_points(seed: int) -> None:
    # defect 12: tighten=True used the constant-dropping slope decomposition (9x eps on seed 0)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(16, 3),
    ).eval()  # fmt: skip
    scale_biases(model, 30.0)
    p = pb.theory.plan(model, eps=0.1, delta=0.05, law="trained", tighten=True, radius=0.5)
    assert p.total_pruned > 0
    pruned = pb.prune(copy.deepcopy(model), plan=p)
    found = worst_gap(pruned, model, radius=0.5, input_shape=(4,))
    assert_sound(p.eps, found, "tightened plan eps")


def test_tightened_trained_plan_of_a_strided_cnn_holds() -> None:
    model = _strided_cnn(0)
    p = pb.theory.plan(
        model, eps=0.1, delta=0.05, input_shape=CNN_SHAPE, law="trained", tighten=True
    )
    pruned = pb.prune(copy.deepcopy(model), plan=p)
    assert_sound(p.eps, worst_gap(pruned, model, input_shape=CNN_SHAPE), "tightened plan eps")


def _violations(p: pb.theory.Plan, build, shape: tuple[int, ...], n: int) -> int:  # type: ignore[no-untyped-def]
    """Networks drawn from the plan's law (seeds 1000..), pruned by the plan, whose worst gap
    found exceeds eps."""
    out = 0
    for seed in range(1000, 1000 + n):
        model = build(seed)
        pruned = pb.prune(copy.deepcopy(model), plan=p)
        out += worst_gap(pruned, model, input_shape=shape, starts=16, steps=40) > p.eps
    return out


def _allowance(n: int, delta: float) -> int:
    """Largest violation count a valid plan (rate <= delta) shows with probability >= 0.999."""
    return int(stats.binom.ppf(0.999, n, delta))


def test_sampled_plan_of_a_strided_cnn_is_valid_on_fresh_networks() -> None:
    theorem = pb.theory.plan(_strided_cnn(0), eps=0.5, delta=0.2, input_shape=CNN_SHAPE)
    p = pb.sampled_plan(theorem).plan
    assert p.total_pruned > 0
    assert _violations(p, _strided_cnn, CNN_SHAPE, 25) <= _allowance(25, 0.2)


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize(
    ("widths", "delta"), [([20, 500, 30, 3], 0.01), ([100] * 5 + [10], 0.2)], ids=["wide", "deep"]
)
def test_theorem_plans_outside_the_benchmark_grid_are_valid(
    widths: list[int], delta: float, method: str
) -> None:
    p = pb.theory.plan(widths, eps=0.5, delta=delta, method=method)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return pb.models.mlp(widths).eval()

    assert _violations(p, build, (widths[0],), 12) <= _allowance(12, delta)


def test_neuron_plans_are_valid_on_fresh_networks() -> None:
    """Whole neurons (docs §4.5): fresh default-init networks pruned by the plan stay within
    eps at the worst gap the harness finds."""
    widths, delta = [20, 500, 30, 3], 0.01
    p = pb.theory.plan(widths, eps=1.5, delta=delta, method="neuron")
    assert p.total_pruned > 0 and p.counts["5"] == 0

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return pb.models.mlp(widths).eval()

    assert _violations(p, build, (widths[0],), 12) <= _allowance(12, delta)


def test_leaky_relu_slopes_are_exact_in_float64() -> None:
    # defect 9: torch.where on Python scalars gave float32 slopes (0.1 -> 0.10000000149):
    # tight certificates fell 1e-9 to 1e-7 (relative) below attained gaps
    from prunebound.theory.network import extract
    from prunebound.theory.slopes import _slopes

    step = extract(nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.1))).steps[1]
    lo = torch.tensor([-2.0, 1.0, -0.25], dtype=torch.float64)  # below, above, across 0
    mid, hw = _slopes(step, lo, lo + 0.5)
    assert mid.dtype == torch.float64
    # float32's 0.1 is 1.5e-8 off; (mid, hw) themselves round at 1e-16 (the margin covers it)
    assert (mid - hw).tolist() == pytest.approx([0.1, 1.0, 0.1], rel=1e-14, abs=0)
    assert (mid + hw).tolist() == pytest.approx([0.1, 1.0, 1.0], rel=1e-14, abs=0)


def test_an_exactly_tight_leaky_certificate_is_above_its_float64_gap() -> None:
    torch.manual_seed(22)
    gen = torch.Generator().manual_seed(22)
    c = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(3)]
    model = nn.Sequential(
        nn.Conv1d(c[0], c[1], 2), nn.LeakyReLU(0.1), nn.Identity(),
        nn.Conv1d(c[1], c[2], 2), nn.LeakyReLU(0.1), nn.Identity(), nn.Flatten(),
    ).eval()  # fmt: skip
    model.append(nn.Linear(model(torch.zeros(1, c[0], 6)).shape[1], 3))
    scale_biases(model, 30.0)
    pb.prune(model, "neuron", 0.9, layers=["7"])  # the output layer, named
    cert = certify(model, radius=1e-3, input_shape=(c[0], 6))
    found = worst_gap(model, radius=1e-3, input_shape=(c[0], 6))
    assert cert.candidates["slopes"] >= found * (1 - 1e-11)  # exact arithmetic, before the margin
    assert cert.bound >= found
