"""`pb.compress`: the sparsest pruning certified on a held-out split (issue 13)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

import prunebound as pb
from prunebound.certified import search as search_module
from prunebound.certified.search import needed_samples
from prunebound.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, pb.data.Dataset]:
    data = pb.data.load_dataset("digits").flat()
    model = pb.models.build_model("lenet_300_100", in_features=64, seed=0)
    pb.train(model, data, pb.TrainConfig(epochs=4, lr=2e-3), seed=0)
    return model.eval(), data


def _splits(data: pb.data.Dataset) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    return (data.x_train, data.y_train), (data.x_test, data.y_test)


def test_compress_certifies_on_the_certify_split_only(trained: tuple[nn.Module, object]) -> None:
    model, data = trained
    before = copy.deepcopy(model.state_dict())
    search, certify = _splits(data)
    res = pb.compress(model, search, certify, max_flip_rate=0.1, method="magnitude")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert not pb.is_pruned(model)
    assert res.accepted and res.sparsity >= 0.3 and res.certificate is not None
    # the certificate, recomputed by hand: flips against the original on the certify split,
    # exact Clopper-Pearson at the attempt level (Bonferroni over the attempts)
    with torch.no_grad():
        flips = int((res.model(certify[0]).argmax(1) != model(certify[0]).argmax(1)).sum())
    n = certify[0].shape[0]
    assert res.certificate.flips == flips and res.certificate.n == n
    upper = (
        1.0 if flips == n else float(stats.beta.ppf(1 - res.attempt_level, flips + 1, n - flips))
    )
    assert res.certificate.flip_upper == pytest.approx(upper, rel=1e-12)
    assert res.attempt_level == pytest.approx(0.05 / 2) and upper <= 0.1
    assert sum(res.counts.values()) == round(
        res.sparsity * sum(m.weight.numel() for m in pb.prunable_layers(model).values())
    )
    assert "compress:" in str(res) and "P(argmax changes)" in str(res)


def test_search_never_reads_the_certify_split(trained: tuple[nn.Module, object]) -> None:
    model, data = trained
    search, certify = _splits(data)
    other = (certify[0].flip(1).contiguous(), certify[1])  # other inputs, same size
    a = pb.compress(model, search, certify, max_flip_rate=0.1, method="magnitude")
    b = pb.compress(model, search, other, max_flip_rate=0.1, method="magnitude")
    strip = [(t.sparsity, t.val_flips, t.predicted_upper) for t in a.history]
    assert strip == [(t.sparsity, t.val_flips, t.predicted_upper) for t in b.history]


def test_nothing_certified_returns_the_unpruned_model(trained: tuple[nn.Module, object]) -> None:
    model, data = trained
    search, certify = _splits(data)
    res = pb.compress(
        model, search, certify, max_flip_rate=0.05, method="magnitude", sparsities=(0.995,)
    )
    assert not res.accepted and res.certificate is None and not pb.is_pruned(res.model)
    assert "NOTHING certified" in str(res) and any("unpruned" in n for n in res.notes)


def test_needed_samples_is_the_zero_event_limit() -> None:
    n = needed_samples(0.01, 0.025)
    assert stats.beta.ppf(1 - 0.025, 1, n) <= 0.01 < stats.beta.ppf(1 - 0.025, 1, n - 1)


def test_bad_input_is_refused_and_leaves_the_model(trained: tuple[nn.Module, object]) -> None:
    model, data = trained
    search, certify = _splits(data)
    x, y = search
    cases = [
        ({"search": search, "certify": (x[:100], y[:100])}, "disjoint"),
        ({"search": search, "certify": (certify[0][:50], certify[1][:50])}, "needs at least"),
        ({"search": (x.clone().fill_(float("nan")), y), "certify": certify}, "finite"),
        ({"search": (x[:, :10], y), "certify": certify}, "do not fit the model"),
        ({"search": (x.long(), y), "certify": certify}, "float tensor"),
        ({"search": search, "certify": certify, "max_gap_rate": 0.1}, "exactly one"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pb.compress(model, method="magnitude", **kwargs)  # type: ignore[arg-type]
    regression = nn.Sequential(nn.Linear(64, 1))
    with pytest.raises(ValueError, match="needs a classifier"):
        pb.compress(regression, search, certify)
    assert not pb.is_pruned(model)


def test_compress_command(tmp_path: Path, trained: tuple[nn.Module, object]) -> None:
    model, _ = trained
    pb.save(model, tmp_path / "dense.safetensors")
    args = ["compress", str(tmp_path / "dense.safetensors"), "--model", "lenet_300_100"]
    args += ["--model-arg", "in_features=64", "--max-flip-rate", "0.15", "--method", "magnitude"]
    assert main([*args, "--certify", "300", "--out", str(tmp_path / "c")]) == 0
    d = json.loads((tmp_path / "c" / "results.json").read_text())
    assert d["accepted"] and d["certificate"]["n"] == 300 and d["certificate"]["flip_upper"] <= 0.15
    assert set(d["accuracy"]) == {"original", "compressed"}
    again = pb.load(
        pb.models.build_model("lenet_300_100", in_features=64), tmp_path / "c" / "model.safetensors"
    )
    assert pb.sparsity(again).sparsity == pytest.approx(d["sparsity"], abs=1e-6)
    with pytest.raises(SystemExit) as e:
        main([*args, "--distill"])
    assert e.value.code == 2


def test_retrained_candidates_are_certified_against_the_original(
    trained: tuple[nn.Module, object],
) -> None:
    model, data = trained
    search, certify = _splits(data)
    cfg = pb.TrainConfig(epochs=1, lr=5e-4, objective="distill")
    res = pb.compress(
        model, search, certify, max_flip_rate=0.1, method="magnitude", retrain=cfg,
        sparsities=(0.5, 0.8, 0.9),
    )  # fmt: skip
    assert res.accepted and res.certificate is not None
    with torch.no_grad():
        flips = int((res.model(certify[0]).argmax(1) != model(certify[0]).argmax(1)).sum())
    assert res.certificate.flips == flips  # against the original, not a retrained reference
    assert len(res.history) >= 2 and any(t.retrained for t in res.history)
    with pytest.raises(ValueError, match="labelled search data"):
        pb.compress(model, search[0], certify, method="magnitude", retrain=cfg)


def test_gap_rate_budget_for_regression_outputs(trained: tuple[nn.Module, object]) -> None:
    _, data = trained
    torch.manual_seed(0)  # test-only: default init
    reg = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)).eval()
    search, certify = _splits(data)
    res = pb.compress(
        reg, search[0], certify[0], max_flip_rate=None, max_gap_rate=0.1, eps=0.05,
        method="magnitude",
    )  # fmt: skip
    assert res.accepted and res.certificate is not None and res.sparsity > 0
    with torch.no_grad():
        gaps = (res.model(certify[0]) - reg(certify[0])).norm(dim=1)
    k, n = int((gaps > 0.05).sum()), certify[0].shape[0]
    assert res.certificate.exceed == k
    assert res.certificate.exceed_upper == pytest.approx(
        float(stats.beta.ppf(1 - res.attempt_level, k + 1, n - k)), rel=1e-12
    )
    assert res.certificate.exceed_upper <= 0.1


def test_no_forward_pass_reads_the_certify_split_before_certification(
    trained: tuple[nn.Module, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A global forward hook watches every module call: no input shares storage with the
    certify split until the final certification starts."""
    model, data = trained
    search, certify = _splits(data)
    storage = certify[0].untyped_storage().data_ptr()
    phase, reads = ["search"], []

    def hook(module: nn.Module, args: tuple[object, ...]) -> None:
        for a in args:
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage:
                reads.append(phase[0])

    real = search_module.data_certificate

    def certifying(*args: object, **kwargs: object) -> object:
        phase[0] = "certify"
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search_module, "data_certificate", certifying)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        cfg = pb.TrainConfig(epochs=1, lr=5e-4, objective="distill")
        res = pb.compress(model, search, certify, max_flip_rate=0.1, method="obs", retrain=cfg)
    finally:
        handle.remove()
    assert res.accepted and reads and set(reads) == {"certify"}
