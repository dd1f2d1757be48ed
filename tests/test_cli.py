"""End-to-end CLI runs on digits, via main([...])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prunebound as pb
from prunebound.cli import main


def test_demo_writes_results_and_prints_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--epochs",
            "3",
            "--retrain-epochs",
            "1",
            "--rounds",
            "2",
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "random" in out and "final acc" in out
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
    main(
        [
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--epochs",
            "1",
            "--retrain-epochs",
            "0",
            "--rounds",
            "1",
            "--quiet",
        ]
    )
    (tmp_path / "d" / "magnitude" / "layer_sparsity.png").unlink()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "d")]) == 0
    assert "round" in capsys.readouterr().out
    assert (tmp_path / "d" / "magnitude" / "layer_sparsity.png").is_file()


def test_run_command(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[model]\nargs = { in_features = 64 }\n[train]\nepochs = 1\n[schedule]\nrounds = 1\nretrain_epochs = 0\n"
    )
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert (tmp_path / "o" / "results.json").is_file()


def test_help_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ([], ["demo"], ["run"], ["prune"], ["report"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["prune", "x", "--model", "mlp", "--amount", "1.5", "--out", "y"])
    assert e.value.code == 2
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
