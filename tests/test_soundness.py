"""Soundness: every certificate bounds the worst gap the shared harness finds, or is refused
with a message naming the module (issue 9). The harness is `tests/soundness.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from soundness import architectures, assert_sound, worst_gap
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunebound as pb
from prunebound.masks import original_weight, set_mask
from prunebound.theory.certify import certify


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
