"""ONNX: torch.onnx.export of a pruned (masked) model and of a CSR-exported one; onnxruntime
runs both (test extras onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cnn
from torch import nn

import prunebound as pb

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'prunebound[test]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's exporter) is not installed")


def _run_onnx(model: nn.Module, x: torch.Tensor, path: Path, **kw: object) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], **kw)
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["x"]  # the input is in the graph
    return session.run(None, {"x": x.numpy()})[0]


def _pruned_cnn() -> nn.Module:
    model = make_cnn()
    pb.prune(model, "magnitude", 0.9)
    return model.eval()


def test_masked_model_exports_with_its_zeros(tmp_path: Path) -> None:
    model = _pruned_cnn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = _run_onnx(model, x, tmp_path / "masked.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-5, atol=1e-5)
    graph = onnx.load(str(tmp_path / "masked.onnx")).graph
    weights = [
        onnx.numpy_helper.to_array(t) for t in graph.initializer if t.dims and len(t.dims) > 1
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == pb.sparsity(model).zeros  # the sparse weights, not the dense ones


def test_csr_exported_model_exports_dense_with_its_input(tmp_path: Path) -> None:
    model = _pruned_cnn()
    exported = pb.export(model, layers={"*": "sparse"}, input_shape=(1, 8, 8))
    assert sum(isinstance(m, pb.SparseLinear | pb.SparseConv2d) for m in exported.modules()) == 3
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = _run_onnx(exported, x, tmp_path / "csr.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y, exported(x).numpy(), rtol=1e-4, atol=1e-4)


def test_dense_weight_rebuilds_the_layer_and_legacy_exporter_is_refused(tmp_path: Path) -> None:
    lin = nn.Linear(20, 7)
    with torch.no_grad():
        lin.weight[2:4] = 0  # empty rows: several rows end at the same position
        lin.weight[:, ::3] = 0
    sparse = pb.SparseLinear.from_dense(lin, "scipy_csr")
    assert torch.equal(sparse.dense_weight(), lin.weight.detach())
    x = torch.randn(2, 20)
    with pytest.raises(ValueError, match="dynamo=True"):
        _run_onnx(nn.Sequential(sparse), x, tmp_path / "legacy.onnx", dynamo=False)


def test_masked_model_exports_under_no_grad_after_cached_inference(tmp_path: Path) -> None:
    model = _pruned_cnn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).numpy()  # fills the inference cache
        y = _run_onnx(model, x, tmp_path / "nograd.onnx")
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model(x).numpy(), expected, rtol=0, atol=0)  # cache intact
