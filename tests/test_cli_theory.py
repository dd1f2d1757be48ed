"""CLI commands of the theory: plan, certify, verify (via main([...]))."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunebound as pb
from prunebound.cli import main
from prunebound.theory import plan


def test_plan_table_and_json_match_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--widths", "64,32,10", "--eps", "0.3", "--delta", "0.05"]
    assert main([*args, "--method", "magnitude"]) == 0
    table = capsys.readouterr().out
    expected = plan([64, 32, 10], 0.3, 0.05, method="magnitude")
    assert "eps share" in table and f"pruned {expected.total_pruned} weights" in table
    assert main([*args, "--method", "random", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = plan([64, 32, 10], 0.3, 0.05, method="random")
    assert got["counts"] == ref.counts and got["method"] == "random"
    assert got["relative_eps"] == pytest.approx(0.3 / ref.output_scale)
    neurons = ["plan", "--widths", "20,500,30,3", "--eps", "1.5", "--delta", "0.01"]
    assert main([*neurons, "--method", "neuron"]) == 0
    expected = plan([20, 500, 30, 3], 1.5, 0.01, method="neuron")
    assert expected.total_pruned > 0
    assert f"pruned {expected.total_pruned} neurons" in capsys.readouterr().out


def test_plan_relative_eps_and_conv(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--widths", "64,32,10", "--rel-eps", "0.1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["relative_eps"] == pytest.approx(0.1)
    conv = ["plan", "--conv", "2,4,4", "--in-size", "9,9", "--stride", "2", "--padding", "1"]
    assert main([*conv, "--rel-eps", "0.3", "--method", "random", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["stride"] for s in got["specs"]] == [[2, 2], [2, 2]]
    with pytest.raises(SystemExit) as e:  # no --in-size: a usage error (issue 10 item 11)
        main(["plan", "--conv", "2,4", "--eps", "1"])
    assert e.value.code == 2 and "--in-size" in capsys.readouterr().err


def test_plan_bad_input_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # a bad value is a usage error
        main(["plan", "--widths", "64,32,10", "--eps", "0.3", "--delta", "1.5"])
    assert e.value.code == 2
    assert "expected a number in (0, 1), got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--widths", "64,x", "--eps", "0.3"])
    with pytest.raises(SystemExit):
        main(["plan", "--widths", "64,10"])  # eps missing


def test_certify_a_pruned_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = pb.models.build_model("lenet_300_100", in_features=64, seed=0)
    pb.prune(model, "magnitude", 0.5)
    path = tmp_path / "lenet.safetensors"
    pb.save(model, path)
    common = ["certify", str(path), "--model", "lenet_300_100", "--model-arg", "in_features=64"]
    assert main([*common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = pb.theory.certify(model.eval(), radius=1.0)
    assert got["bound"] == pytest.approx(ref.bound, rel=1e-6)
    assert [t["pruned"] for t in got["layers"]] == [r.zeros for r in pb.sparsity(model).layers]
    x = torch.randn(256, 64)
    x = x / x.norm(dim=1, keepdim=True)
    dense = pb.reset(pb.models.build_model("lenet_300_100", in_features=64, seed=0))
    with torch.no_grad():
        gap = (model(x) - dense(x)).norm(dim=1).max()
    assert 0 < gap <= got["bound"]
    assert main([*common, "--radius", "2"]) == 0
    out = capsys.readouterr().out
    assert "||Delta||" in out and "sup_{||x||<=2}" in out
    assert "VACUOUS" not in out and not got["vacuous"]
    # issue 9 defect 6: at 90% the bound exceeds sup ||F||: the CLI says it is vacuous
    heavy = pb.prune(
        pb.models.build_model("lenet_300_100", in_features=64, seed=0), "magnitude", 0.9
    )
    pb.save(heavy, tmp_path / "heavy.safetensors")
    assert main(["certify", str(tmp_path / "heavy.safetensors"), *common[2:]]) == 0
    assert "VACUOUS: the bound is no better than the trivial bound" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # no --model and no results.json beside it
        main(["certify", str(path)])
    assert e.value.code == 2 and "pass --model" in capsys.readouterr().err


def test_verify_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v"
    args = ["verify", "--widths", "64,32,10", "--rel-eps", "0.1", "--trials", "50"]
    search = ["--samples", "16", "--restarts", "2", "--steps", "8", "--quiet"]
    assert main([*args, *search, "--out", str(out), "--largest", "10"]) == 0
    text = capsys.readouterr().out
    assert "0/50 violations" in text and "tightness" in text
    d = json.loads((out / "verify.json").read_text())
    assert d["verify"]["trials"] == 50 and len(d["verify"]["gaps"]) == 50
    ref = plan([64, 32, 10], 0.1 * d["plan"]["output_scale"], 0.05)
    assert d["verify"]["violations"] == 0 and d["plan"]["counts"] == ref.counts
    assert d["largest_fraction"]["trials"] == 10
    assert (out / "gaps.png").stat().st_size > 1000


def test_plan_sampled_bound_matches_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--widths", "16,12,8,4", "--eps", "0.4", "--method", "random", "--json"]
    assert main([*args, "--bound", "sampled"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)  # stdout holds the JSON alone; the search is shown on stderr
    assert "sampled plan: search on 32 networks" in out.err
    ref = pb.sampled_plan(plan([16, 12, 8, 4], 0.4, 0.05, method="random")).plan
    assert got["counts"] == ref.counts and got["guarantee"] == "sampled"
    assert ref.total_pruned > plan([16, 12, 8, 4], 0.4, 0.05, method="random").total_pruned


def test_plan_largest_prints_planned_vs_empirical(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--widths", "64,32,10", "--rel-eps", "0.2", "--largest", "12"]
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    lf = d["largest_fraction"]
    planned = [lp["fraction"] for lp in d["layers"]]
    assert lf["planned"] == pytest.approx(planned)
    for e, p, r in zip(lf["empirical"], lf["planned"], lf["ratio"], strict=True):
        assert 0 <= e <= 1 and (r is None if p == 0 else r == pytest.approx(e / p))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "empirically largest fractions along the plan" in out and "ratio" in out


def test_plan_of_a_trained_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = pb.models.build_model("lenet_300_100", in_features=64, seed=0)
    path = tmp_path / "dense.safetensors"
    pb.save(model, path)
    common = ["plan", "--checkpoint", str(path), "--model", "lenet_300_100"]
    common += ["--model-arg", "in_features=64", "--eps", "0.5"]
    assert main([*common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = plan(model, 0.5, 0.05, law="trained")
    assert got["guarantee"] == "trained" and got["counts"] == ref.counts
    assert sum(ref.counts.values()) > 0
    assert main(common) == 0
    assert "guarantee (trained): for these trained weights" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # a law needs sampled networks: not a trained model
        main([*common, "--bound", "sampled"])
    assert e.value.code == 2 and "not with --law trained" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--widths", "784", "--eps", "0.1"], "expected at least two widths"),
        (["--widths", "8,4", "--eps", "-1"], "expected a number > 0, got '-1'"),
        (["--widths", "8,4", "--eps", "0.1", "--law", "trained"], "--law trained needs"),
        (["--conv", "1,4", "--eps", "0.1"], "--conv needs --in-size"),
    ],
)
def test_plan_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_data_certificate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = pb.models.build_model("lenet_300_100", in_features=64, seed=0)
    pruned = pb.prune(
        pb.models.build_model("lenet_300_100", in_features=64, seed=0), "magnitude", 0.6
    )
    pb.save(pruned, tmp_path / "pruned.safetensors")
    pb.save(dense, tmp_path / "dense.safetensors")
    common = ["data-certificate", str(tmp_path / "pruned.safetensors"), "--model", "lenet_300_100"]
    common += ["--model-arg", "in_features=64", "--eps", "0.05", "--confidence", "0.9"]
    assert main([*common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    digits = pb.data.load_dataset("digits").flat()
    ref = pb.theory.data_certificate(
        pruned.eval(), (digits.x_test, digits.y_test), 0.05, confidence=0.9
    )
    assert got == json.loads(json.dumps(ref.to_dict()))
    assert got["n"] == digits.x_test.shape[0] and got["flips"] is not None
    assert main([*common, "--reference", str(tmp_path / "dense.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"<= {ref.exceed_upper:.4g}" in out and "confidence 0.9" in out
