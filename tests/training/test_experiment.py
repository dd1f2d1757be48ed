"""Experiments from TOML, and the results directory they write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import prunebound as pb
from prunebound.training.config import Experiment
from prunebound.training.experiment import run

CONFIG = """
seed = 1
out_dir = "{out}"
[model]
name = "lenet_300_100"
args = {{ in_features = 64 }}
[data]
name = "digits"
[train]
epochs = 3
batch_size = 64
lr = 0.002
[schedule]
kind = "oneshot"
method = "magnitude"
target_sparsity = 0.5
retrain_epochs = 1
"""


def test_toml_run_writes_results_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out"))
    exp = Experiment.from_toml(cfg)
    assert exp.schedule.rounds == 1 and exp.train.lr == 0.002
    res = run(exp)
    out = tmp_path / "out"
    for f in (
        "results.json",
        "rounds.csv",
        "model.safetensors",
        "accuracy_vs_sparsity.png",
        "layer_sparsity.png",
    ):
        assert (out / f).is_file(), f
    d = json.loads((out / "results.json").read_text())
    assert d["config"]["seed"] == 1 and d["config_hash"] == exp.hash()
    assert set(d["versions"]) >= {"prunebound", "torch", "numpy"}
    assert [r["round"] for r in d["rounds"]] == [0, 1]
    assert d["rounds"][1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert d["rounds"][1]["layers"].keys() == {"1", "3", "5"}
    assert d["rounds"][0]["dense_flops"] == 2 * (64 * 300 + 300 * 100 + 100 * 10)
    # the pruned model's deployable form: a CSR export, its size and measured speed
    assert (out / "model.export.safetensors").stat().st_size == d["export"]["bytes"]
    assert d["export"]["size_ratio"] < 1 and d["export"]["speedup"] > 0
    with (out / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and float(rows[1]["accuracy"]) == res.rounds[1].accuracy
    model = pb.models.build_model("lenet_300_100", in_features=64)
    pb.load(model, out / "model.safetensors")
    assert pb.sparsity(model).sparsity == pytest.approx(0.5, abs=1e-3)
    final = d["final_sparsity"]
    assert final["compression"] == pytest.approx(2.0, rel=1e-3)
    assert [ls["name"] for ls in final["layers"]] == ["1", "3", "5"]
    assert final["sparse_flops"] < final["dense_flops"]


def test_same_seed_same_results(tmp_path: Path) -> None:
    """Two runs of one config give identical masks and metrics; another seed does not."""
    text = CONFIG.replace("oneshot", "iterative").replace('"magnitude"', '"random"')
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text.format(out=tmp_path / name).replace("seed = 1", f"seed = {seed}"))
        res = run(Experiment.from_toml(cfg), write_plots=False)
        model = pb.models.build_model("lenet_300_100", in_features=64)
        pb.load(model, tmp_path / name / "model.safetensors")
        outs.append(([(r.accuracy, r.loss, r.layers) for r in res.rounds], pb.masks(model)))
    assert outs[0][0] == outs[1][0]
    assert all(torch.equal(v, outs[1][1][k]) for k, v in outs[0][1].items())
    assert not all(torch.equal(v, outs[2][1][k]) for k, v in outs[0][1].items())


def test_toml_numbers_and_arrays(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[train]\nlr = 1\nlr_horizon = 30\n"
        '[schedule]\nsteps = [0.5, 0.9]\nlast_layer_scale = 1\nretrain_lr = "restart"\n'
        "[data]\nmax_train = 100\n"
    )
    exp = Experiment.from_toml(cfg)
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float)
    assert exp.train.lr_horizon == 30
    assert exp.schedule.steps == (0.5, 0.9) and exp.schedule.rounds == 2
    assert exp.schedule.retrain_lr == "restart" and exp.data.max_train == 100
    assert Experiment.from_dict(exp.to_dict()) == exp  # to_dict round-trips
    assert exp.hash() != Experiment().hash()


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ("[train]\nepochz = 3\n", "unknown key 'train.epochz'"),
        ("colour = 1\n", "unknown key 'colour'"),
        ('[schedule]\nrounds = "five"\n', "schedule.rounds has the wrong type"),
        ("[model]\nname = 3\n", "model.name has the wrong type"),
        ("seed = 1.5\n", "seed has the wrong type"),
        ('[schedule]\nretrain_lr = "warm"\n', "schedule.retrain_lr has the wrong type"),
        ("[schedule]\nsteps = [0.5, true]\n", "schedule.steps has the wrong type"),
        ("[train]\nepochs = -1\n", r"train\.epochs must be an int >= 0, got -1"),
        ("model = 3\n", "model must be a table"),
        ("[data]\nmax_train = 0\n", r"data\.max_train must be an int >= 1 or None, got 0"),
        ("seed = -2\n", "seed must be an int >= 0, got -2"),
        # model.args are checked against the builder when parsing, not when the run starts
        (
            '[model]\nargs = { in_features = "x" }\n',
            r"model\.args\.in_features has the wrong type or value: 'x'",
        ),
        ("[model]\nargs = { in_featurez = 64 }\n", r"unknown key 'model\.args\.in_featurez'"),
        ("[model]\nargs = { in_features = 0 }\n", r"model\.args\.in_features: widths must be"),
        ('[model]\nname = "mlp"\n', r"model\.args\.widths is required"),
        ('[model]\nname = "mlp"\nargs = { widths = [64, "a"] }\n', r"model\.args\.widths has"),
        ('[model]\nname = "vgg_small"\nargs = { image_size = 4 }\n', r"model\.args\.image_size"),
        ('[model]\nname = "vgg_small"\nargs = { batch_norm = 1 }\n', r"model\.args\.batch_norm"),
        ('[model]\nname = "lenet"\n', r"model\.name: unknown model 'lenet'"),
        ('[data]\nname = "cifar10"\n', r"data\.name must be one of .*got 'cifar10'"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, patch: str, match: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(patch)
    with pytest.raises(ValueError, match=match):
        Experiment.from_toml(cfg)


def test_missing_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Experiment.from_toml(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("seed = = 1")
    with pytest.raises(ValueError, match="invalid TOML"):
        Experiment.from_toml(tmp_path / "bad.toml")


def test_shipped_configs_parse() -> None:
    configs = sorted(Path(__file__).parents[2].glob("configs/*.toml"))
    assert len(configs) >= 3  # the configs/ folder of the repository, not an empty glob
    for cfg in configs:
        Experiment.from_toml(cfg)


def test_model_args_check_is_cheap_and_leaves_rng_alone(tmp_path: Path) -> None:
    """The parse-time build happens on the meta device: a huge model costs no memory."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nname = "mlp"\nargs = { widths = [200000, 200000, 10] }\n')
    state = torch.get_rng_state()
    exp = Experiment.from_toml(cfg)
    assert exp.model.args == {"widths": [200000, 200000, 10]}
    assert torch.equal(torch.get_rng_state(), state)
    cfg.write_text('[data]\nname = "fashion_mnist"\n[model]\nname = "lenet5"\n')
    assert Experiment.from_toml(cfg).data.name == "fashion_mnist"  # as load_dataset spells it
