"""End-to-end CLI runs on digits, via main([...])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import write_idx_dir

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
    assert "24.8% of all parameters zero" in out  # 12,550 of 50,610: the biases stay
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
    with pytest.raises(SystemExit) as e:  # a bad value is a usage error: exit 2, not 1
        main(["demo", "--sparsity", "1.0", "--out", str(tmp_path / "z"), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --sparsity: expected a number in [0, 1), got '1.0'" in err
    assert not (tmp_path / "z").exists()
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "c", "--method", "bogus", "--amount", "0.5"], "method must be one of"),
        (["prune", "c", "--model", "nope", "--amount", "0.5"], "unknown model 'nope'"),
        (["demo", "--sparsity", "1.0"], "argument --sparsity: expected a number in [0, 1)"),
        (["demo", "--sparsity", "-0.1"], "argument --sparsity"),
        (["demo", "--rounds", "0"], "argument --rounds: expected an int >= 1, got '0'"),
        (["demo", "--epochs", "-1"], "argument --epochs: expected an int >= 0"),
        (["demo", "--seed", "-1"], "argument --seed: expected an int >= 0"),
        (["run", "c.toml", "--nproc", "0"], "argument --nproc: expected an int >= 1"),
        (
            ["run", "c.toml", "--dist-timeout", "0"],
            "argument --dist-timeout: expected a number > 0",
        ),
        (["--threads", "0", "demo"], "argument --threads: expected an int >= 1"),
        (["export", "c", "--batch-size", "0"], "argument --batch-size: expected an int >= 1"),
        (["export", "c", "--model", "nope"], "unknown model 'nope'"),
        (["certify", "c", "--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_option_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prunebound") and message in err, err


def test_prune_infers_model_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = pb.save(
        pb.models.build_model("lenet_300_100", seed=0, in_features=64),
        run_dir / "model.safetensors",
    )
    config = {"model": {"name": "lenet_300_100", "args": {"in_features": 64}}}
    (run_dir / "results.json").write_text(json.dumps({"config": config}))
    before = ckpt.read_bytes()
    assert main(["prune", str(ckpt), "--method", "magnitude", "--amount", "0.5"]) == 0
    out = run_dir / "model.pruned.safetensors"
    assert f"saved {out}" in capsys.readouterr().out
    assert ckpt.read_bytes() == before  # the input is never overwritten
    fresh = pb.load(pb.models.lenet_300_100(in_features=64), out)
    assert pb.sparsity(fresh).sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(SystemExit) as e:  # --out naming the input is refused
        main(["prune", str(ckpt), "--amount", "0.5", "--out", str(ckpt)])
    assert e.value.code == 2 and "is the input checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    (run_dir / "results.json").unlink()
    with pytest.raises(SystemExit) as e:  # nothing to infer the model from
        main(["prune", str(ckpt), "--amount", "0.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no results.json next to" in err and "pass --model" in err
    (run_dir / "results.json").write_text(json.dumps({"rounds": []}))
    with pytest.raises(SystemExit) as e:  # a results.json without config.model
        main(["prune", str(ckpt), "--amount", "0.5"])
    assert e.value.code == 2 and "pass --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ('{"config": {}}', "'config.schedule'"),
        ("{}", "'config'"),
        ('{"config": {"schedule": {"kind": "oneshot"}}}', "'config.schedule.method'"),
        ('{"config": {"schedule": {"kind": "oneshot", "method": "m"}}}', "'rounds'"),
        ('{"config": {"schedule": {"kind": "o", "method": "m"}}, "rounds": [{}]}', "rounds[0]"),
        ("[1, 2]", "not a JSON object"),
        ("not json", "invalid JSON"),
    ],
)
def test_report_on_a_malformed_results_file_exits_1(
    tmp_path: Path, content: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "results.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "is not a prunebound results file" in err and key in err, err


def test_prune_layers_exclude_counts_and_norm(tmp_path: Path) -> None:
    ckpt = pb.save(pb.models.lenet_300_100(in_features=64), tmp_path / "dense.safetensors")
    model = ["--model", "lenet_300_100", "--model-arg", "in_features=64"]

    def pruned_rows(*flags: str) -> dict[str, int]:
        out = tmp_path / "p.safetensors"
        assert (
            main(["prune", str(ckpt), *model, "--method", "neuron", *flags, "--out", str(out)]) == 0
        )
        fresh = pb.load(pb.models.lenet_300_100(in_features=64), out)
        return {k: int((~v.any(dim=1)).sum()) for k, v in pb.masks(fresh).items()}

    assert pruned_rows("--amount", "0.5", "--norm", "1") == {"1": 150, "3": 50}  # not the head
    assert pruned_rows("--amount", "0.5", "--layers", "1,3", "--layers", "5") == {
        "1": 150, "3": 50, "5": 5
    }  # fmt: skip
    assert pruned_rows("--amount", "0.5", "--exclude", "3") == {"1": 150}
    assert pruned_rows("--amount", "0.5", "--layers", "*", "--exclude", "1") == {"3": 50}
    assert pruned_rows("--counts", "5=2", "--counts", "1=7") == {"1": 7, "5": 2}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--amount", "0.5", "--counts", "1=2"], "give exactly one of --amount or --counts"),
        ([], "give exactly one of --amount or --counts"),
        (["--counts", "1=x"], "expected LAYER=N with N an int >= 0, got '1=x'"),
        (["--amount", "0.5", "--norm", "3"], "argument --norm: invalid choice: 3"),
        (["--amount", "0.5", "--exclude", "nope"], "--exclude 'nope' matches none of the layers"),
    ],
)
def test_prune_selection_usage_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = pb.save(pb.models.lenet_300_100(in_features=64), tmp_path / "dense.safetensors")
    argv = ["prune", str(ckpt), "--model", "lenet_300_100", "--model-arg", "in_features=64"]
    try:
        rc = main([*argv, *flags, "--out", str(tmp_path / "p.safetensors")])
    except SystemExit as e:
        rc = e.code  # type: ignore[assignment]
    assert rc == 2
    assert message in capsys.readouterr().err


def test_data_that_does_not_fit_the_model_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_idx_dir(tmp_path / "idx", gz=False)  # 4x6 images: 24 features, the config wants 64
    out = tmp_path / "o"
    config = Path(__file__).parents[1] / "configs" / "lenet_digits.toml"
    argv = ["run", str(config), "--dataset", "idx", "--data-dir"]
    with pytest.raises(SystemExit) as e:  # the flag is at fault: a usage error
        main([*argv, str(tmp_path / "idx"), "--out", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "takes 64 input features" in err and "24 features per sample" in err
    assert "in_features" in err and "--dataset" in err and "mat1 and mat2" in err
    assert not (out / "checkpoint.safetensors").exists()  # nothing was trained
    cfg = tmp_path / "c.toml"  # the same mismatch from a config alone: a runtime error
    cfg.write_text(
        f'[model]\nargs = {{ in_features = 64 }}\n[data]\nname = "idx"\n'
        f'data_dir = "{tmp_path / "idx"}"\n'
    )
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 1
    assert "takes 64 input features" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = pb.save(pb.models.lenet_300_100(in_features=64), tmp_path / "m.safetensors")
    bad = [
        ["prune", str(ckpt), "--model", "lenet_300_100", "--model-arg", "in_features=sixty"],
        ["plan", "--widths", "784", "--eps", "1"],
        ["plan", "--widths", "784,10", "--eps", "-1"],
        ["verify", "--widths", "4,3", "--rel-eps", "0"],
    ]
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--amount", "0.5"] if argv[0] == "prune" else argv)
        assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "--model-arg in_features has the wrong type or value: 'sixty'" in err
    assert "invalid literal for int()" not in err
    assert "argument --widths: expected at least two widths" in err
    assert "argument --eps: expected a number > 0, got '-1'" in err


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "90% sparsity" in out and "%%" not in out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(m in out for m in ("magnitude", "random", "neuron", "filter"))


def test_report_reads_a_verify_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "v"
    argv = ["verify", "--widths", "4,3", "--eps", "1", "--trials", "4", "--samples", "4"]
    assert main([*argv, "--restarts", "1", "--steps", "1", "--out", str(d), "--quiet"]) == 0
    (d / "gaps.png").unlink()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0  # found below, as run directories are
    out = capsys.readouterr().out
    assert f"== {d} (verify) ==" in out and "gaps.png" in out
    assert (d / "gaps.png").stat().st_size > 1000


def test_export_does_not_overwrite_the_runs_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = pb.models.build_model("lenet_300_100", seed=0, in_features=64)
    pb.prune(model, "magnitude", 0.9)
    pb.save(model, tmp_path / "model.safetensors")
    config = {"model": {"name": "lenet_300_100", "args": {"in_features": 64}}}
    (tmp_path / "results.json").write_text(json.dumps({"config": config}))
    own = tmp_path / "model.export.safetensors"  # what the run wrote
    own.write_bytes(b"the run's export")
    argv = ["export", str(tmp_path / "model.safetensors"), "--layer", "*=dense"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "exists" in capsys.readouterr().err and own.read_bytes() == b"the run's export"
    assert main([*argv, "--out", str(tmp_path / "mine.safetensors")]) == 0
    assert main([*argv, "--overwrite"]) == 0
    assert pb.load_export(own) is not None
