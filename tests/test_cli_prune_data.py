"""`prunebound prune` with calibration data: data-aware methods, --coupled and --refit (digits)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import with_bn_stats

import prunebound as pb
from prunebound.cli import main
from prunebound.data import load_dataset

pytest.importorskip("torch_pruning")

MLP = ["--model", "lenet_300_100", "--model-arg", "in_features=64"]
CNN = ["--model", "resnet_small", "--model-arg", "widths=[4,8,8]"]


def test_data_aware_method_reads_the_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = pb.save(pb.models.lenet_300_100(in_features=64), tmp_path / "dense.safetensors")
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["prune", str(ckpt), *MLP, "--method", "wanda", "--amount", "0.5"])
    assert e.value.code == 2
    assert "method 'wanda' needs calibration data: pass --dataset" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    out = tmp_path / "w.safetensors"
    args = ["--method", "wanda", "--amount", "0.5", "--dataset", "digits", "--out", str(out)]
    assert main(["prune", str(ckpt), *MLP, *args]) == 0
    fresh = pb.load(pb.models.lenet_300_100(in_features=64), out)
    assert pb.sparsity(fresh).sparsity == pytest.approx(0.5, abs=1e-3)


def test_coupled_refit_prunes_whole_units_and_follows_the_original(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = load_dataset("digits").image()
    x = data.x_train[:256]
    torch.manual_seed(0)
    dense = with_bn_stats(pb.models.resnet_small(widths=(4, 8, 8)), x)
    ckpt = pb.save(dense, tmp_path / "dense.safetensors")
    common = ["--method", "filter_group", "--amount", "0.5", "--coupled", "--dataset", "digits"]
    plain, fitted = tmp_path / "plain.safetensors", tmp_path / "refit.safetensors"
    assert main(["prune", str(ckpt), *CNN, *common, "--out", str(plain)]) == 0
    assert main(["prune", str(ckpt), *CNN, *common, "--refit", "--out", str(fitted)]) == 0
    models = [pb.load(pb.models.resnet_small(widths=(4, 8, 8)), p).eval() for p in (plain, fitted)]
    a, b = pb.masks(models[0]), pb.masks(models[1])
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    assert int((~a["0"]).flatten(1).all(1).sum()) == 2  # half of the stream's 4 channels
    with torch.no_grad():
        ref = dense.eval()(x)
        gaps = [float((m(x) - ref).square().mean()) for m in models]
        small = pb.shrink(copy.deepcopy(models[1]), x)
        torch.testing.assert_close(small(x), models[1](x), rtol=1e-4, atol=1e-5)
    assert gaps[1] < 0.5 * gaps[0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["prune", str(ckpt), *CNN, "--amount", "0.5", "--coupled"])
    assert e.value.code == 2 and "--coupled needs calibration data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["prune", str(ckpt), *CNN, "--method", "filter_group", "--amount", "0.5"])
    assert e.value.code == 2 and "pass --coupled" in capsys.readouterr().err
    bad = ["--method", "magnitude", "--amount", "0.5", "--coupled", "--dataset", "digits"]
    assert main(["prune", str(ckpt), *CNN, *bad]) == 1
    assert "coupled=True needs a structured ranking method" in capsys.readouterr().err
