"""End-to-end CLI runs on digits, via main([...])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prunebound as pb
from prunebound.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_demo_writes_results_and_prints_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["demo", "--out", str(tmp_path), "--quick"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "random" in out and "final acc" in out
    assert "round 2: sparsity  90.0%" in out and "summary: at 90.0% sparsity" in out
    for method in ("magnitude", "random"):
        d = json.loads((tmp_path / method / "results.json").read_text())
        assert d["rounds"][-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert (tmp_path / method / "rounds.csv").is_file()
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 1000


def test_prune_and_report_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = pb.models.lenet_300_100(in_features=64)
    ckpt = pb.save(model, tmp_path / "dense.safetensors")
    rc = main(
        [
            "prune",
            str(ckpt),
            "--model",
            "lenet_300_100",
            "--model-arg",
            "in_features=64",
            "--amount",
            "0.25",
            "--out",
            str(tmp_path / "p.safetensors"),
        ]
    )
    assert rc == 0
    fresh = pb.load(pb.models.lenet_300_100(in_features=64), tmp_path / "p.safetensors")
    assert pb.sparsity(fresh).sparsity == pytest.approx(0.25, abs=1e-3)
    out = capsys.readouterr().out
    assert "compression 1.33x" in out and "25.0%" in out
    few = ["--epochs", "1", "--retrain-epochs", "0", "--rounds", "1", "--quiet"]
    rc = main(["demo", "--out", str(tmp_path / "d"), *few])
    assert rc == 0
    (tmp_path / "d" / "magnitude" / "layer_sparsity.png").unlink()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "(iterative magnitude)" in out and "(iterative random)" in out
    assert "90.0%" in out and "all" in out  # per-round and per-layer tables
    assert (tmp_path / "d" / "magnitude" / "layer_sparsity.png").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "no results.json" in capsys.readouterr().err


def test_run_command(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[model]\nargs = { in_features = 64 }\n[train]\nepochs = 1\n[schedule]\nrounds = 1\nretrain_epochs = 0\n"
    )
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert d["config"]["train"]["epochs"] == 1 and len(d["rounds"]) == 2
    assert d["final_sparsity"]["sparsity"] == pytest.approx(d["rounds"][-1]["sparsity"])


def test_help_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ([], ["demo"], ["run"], ["prune"], ["report"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["prune", "x", "--model", "mlp", "--amount", "1.5", "--out", "y"])
    assert e.value.code == 2
    assert "expected a number in [0, 1], got '1.5'" in capsys.readouterr().err
    assert main(["demo", "--sparsity", "1.0", "--out", str(tmp_path / "z"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sparsity must be in [0, 1), got 1.0" in err
    assert (
        main(
            [
                "prune",
                str(tmp_path / "missing.safetensors"),
                "--model",
                "lenet_300_100",
                "--amount",
                "0.5",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nname = "mnist"\ndata_dir = "/nonexistent/mnist"\n')
    assert main(["run", str(cfg), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "/nonexistent/mnist" in err and len(err.strip().splitlines()) == 1


def test_missing_data_dir_gives_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "no")]
    rc = main(["demo", *data, "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "no") in err and "apt-get install dataset-fashion-mnist" in err


def test_bad_config_key_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[schedule]\nround = 3\n")
    assert main(["run", str(cfg)]) == 1
    assert "unknown key 'schedule.round'" in capsys.readouterr().err


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION}")
def test_run_fashion_config_subsampled(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        '[data]\nname = "fashion-mnist"\nmax_train = 3000\nmax_test = 1000\n'
        "[train]\nepochs = 2\nbatch_size = 128\n"
        "[schedule]\nrounds = 2\ntarget_sparsity = 0.8\nretrain_epochs = 1\n"
    )
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert d["rounds"][0]["accuracy"] > 0.6 and d["rounds"][-1]["sparsity"] == pytest.approx(
        0.8, abs=1e-3
    )
