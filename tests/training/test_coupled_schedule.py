"""`coupled = true` in a schedule: each round prunes whole coupled units (weight rows, biases,
BatchNorm entries; residual channels together), so the run's `shrink` removes all of it."""

from __future__ import annotations

import copy
import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers import with_bn_stats
from torch import nn

import prunebound as pb
from prunebound.training.config import Experiment
from prunebound.training.experiment import run
from prunebound.training.schedule import Schedule, prune_round

pytest.importorskip("torch_pruning")

CONFIG = """
seed = 3
out_dir = "{out}"
quiet = true
[model]
name = "resnet_small"
args = {{ widths = [8, 16, 16] }}
[data]
name = "digits"
max_train = 256
max_test = 128
[train]
epochs = 1
batch_size = 64
[schedule]
kind = "iterative"
method = "filter"
steps = [0.25, 0.5]
retrain_epochs = 1
coupled = true
shrink = true
"""


def _masked_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_coupled_schedule_prunes_whole_units_and_shrink_removes_them(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out"))
    exp = Experiment.from_toml(cfg)
    assert exp.schedule.coupled and exp.schedule.to_dict()["coupled"] is True
    run(exp, write_plots=False)
    out = tmp_path / "out"
    arch = pb.models.resnet_small(widths=(8, 16, 16))
    masked = pb.load(arch, out / "model.safetensors")
    # whole units: each BatchNorm after a conv is zero (gamma and beta) exactly where the
    # conv's filters are (trained weights are never exactly zero elsewhere)
    mods = [m for m in masked.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    pairs = [
        (a, b) for a, b in pairwise(mods)
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)
    ]  # fmt: skip
    assert len(pairs) >= 6
    total = alive = 0
    with torch.no_grad():
        for conv, bn in pairs:
            rows = conv.weight.flatten(1).ne(0).any(1)
            assert torch.equal(bn.weight.ne(0), rows) and torch.equal(bn.bias.ne(0), rows)
            total, alive = total + rows.numel(), alive + int(rows.sum())
    # two rounds of 25% then to 50% of the units: about half of the channels are gone
    assert 0.35 <= 1 - alive / total <= 0.6
    # shrink removed everything pruned: each conv is as wide as its alive rows
    small = pb.load_shrunk(
        pb.models.resnet_small(widths=(8, 16, 16)), out / "model.shrunk.safetensors"
    )
    small_convs = dict(_masked_convs(small))
    for name, conv in _masked_convs(masked):
        rows = conv.weight.detach().flatten(1).ne(0).any(1)
        assert small_convs[name].out_channels == int(rows.sum()), name
    x = torch.rand(7, 1, 8, 8)
    masked.eval()
    small.eval()
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), rtol=1e-4, atol=1e-5)
    d = json.loads((out / "results.json").read_text())
    assert d["shrink"]["params"]["shrunk"] == sum(p.numel() for p in small.parameters())
    assert d["config"]["schedule"]["coupled"] is True


def test_coupled_needs_a_structured_non_gradual_layer_free_schedule() -> None:
    with pytest.raises(ValueError, match=r"schedule\.coupled needs a structured method"):
        Schedule(method="magnitude", coupled=True)
    with pytest.raises(ValueError, match=r"schedule\.coupled must be true or false"):
        Schedule(method="filter", coupled="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"gradual"):
        Schedule(kind="gradual", method="filter", coupled=True)
    with pytest.raises(ValueError, match=r"last_layer_scale must be 1"):
        Schedule(method="neuron", coupled=True, last_layer_scale=0.5)
    assert "coupled" not in Schedule(method="neuron").to_dict()  # older configs keep their hash


def test_prune_round_of_a_coupled_schedule_needs_example_inputs() -> None:
    model = pb.models.resnet_small(widths=(4, 4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="example_inputs"):
        prune_round(model, Schedule(method="filter", coupled=True, target_sparsity=0.5), 0, 1)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_data_aware_coupled_round_gets_the_calibration_data() -> None:
    torch.manual_seed(0)
    model = pb.models.resnet_small(widths=(4, 4, 4))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    sched = Schedule(method="filter_taylor", coupled=True, target_sparsity=0.5, rounds=1)
    prune_round(model, sched, 0, 1, data=(x, y), example_inputs=x)
    assert (~pb.masks(model)["0"]).flatten(1).all(1).sum() == 2  # half of the stream's 4


def test_refit_rounds_refit_the_survivors_towards_the_model_before_the_prune() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model = with_bn_stats(pb.models.resnet_small(widths=(4, 8, 8)), x)
    plain, fitted = (Schedule(method="filter_group", coupled=True, target_sparsity=0.5,
                              rounds=1, refit=flag) for flag in (False, True))  # fmt: skip
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    prune_round(a, plain, 0, 1, data=(x, y), example_inputs=x)
    prune_round(b, fitted, 0, 1, data=(x, y), example_inputs=x)
    assert pb.masks(a).keys() == pb.masks(b).keys()
    assert all(torch.equal(v, pb.masks(b)[k]) for k, v in pb.masks(a).items())
    with torch.no_grad():
        gap = [float((m(x) - model(x)).square().mean()) for m in (a, b)]
    assert gap[1] < 0.5 * gap[0]
    assert fitted.to_dict()["refit"] is True and "refit" not in plain.to_dict()
    with pytest.raises(ValueError, match=r"schedule\.refit needs calibration data"):
        prune_round(copy.deepcopy(model), fitted, 0, 1, example_inputs=x)
    for kind in ("gradual", "lottery"):
        with pytest.raises(ValueError, match=rf"schedule\.refit does not apply to {kind}"):
            Schedule(kind=kind, method="filter", refit=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"schedule\.method 'filter_group' needs coupled = true"):
        Schedule(method="filter_group")
    with pytest.raises(ValueError, match=r"schedule\.refit must be true or false"):
        Schedule(method="filter", refit="yes")  # type: ignore[arg-type]


def test_a_refit_schedule_runs_end_to_end(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    text = CONFIG.format(out=tmp_path / "out").replace(
        "coupled = true", "coupled = true\nrefit = true"
    )
    cfg.write_text(text.replace('method = "filter"', 'method = "filter_group"'))
    run(Experiment.from_toml(cfg), write_plots=False)
    d = json.loads((tmp_path / "out" / "results.json").read_text())
    assert d["config"]["schedule"]["refit"] is True and d["shrink"]["params"]["shrunk"] > 0
