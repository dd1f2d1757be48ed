"""Checkpoints (safetensors), snapshots/rewind and torch.nn.utils.prune interop."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import make_cnn, make_mlp
from torch import nn
from torch.nn.utils import prune as tp

import prunebound as pb


def test_save_load_round_trip_into_fresh_model(tmp_path: Path) -> None:
    model = make_cnn(0)
    pb.prune(model, "magnitude", 0.6)
    path = pb.save(model, tmp_path / "m.safetensors")
    fresh = make_cnn(1)  # other weights, no masks
    pb.load(fresh, path)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for k, v in pb.masks(model).items():
        assert torch.equal(pb.masks(fresh)[k], v)
    pb.reset(fresh), pb.reset(model)  # underlying values came along too
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_file_has_dense_keys_plus_masks(tmp_path: Path) -> None:
    model = make_mlp()
    pb.prune(model, "magnitude", 0.5, layers=["0"])
    pb.save(model, tmp_path / "m.safetensors")
    keys = set(safetensors.torch.load_file(tmp_path / "m.safetensors"))
    assert keys == set(make_mlp().state_dict()) | {"__mask__.0.weight", "__pruned__.0.weight"}
    dense = make_mlp(3)
    safetensors.torch.save_file(dense.state_dict(), tmp_path / "dense.safetensors")
    pb.load(model, tmp_path / "dense.safetensors")  # a dense file clears the masks
    assert not pb.is_pruned(model)


def test_remove_round_trip_identical_outputs(tmp_path: Path) -> None:
    model = make_mlp()
    pb.prune(model, "random", 0.5, seed=0)
    x = torch.randn(2, 12)
    out = model(x)
    pb.remove(model)
    pb.save(model, tmp_path / "baked.safetensors")
    fresh = pb.load(make_mlp(5), tmp_path / "baked.safetensors")
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def _snapshot_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = pb.snapshot(model)
    return all(torch.equal(now[k], v) for k, v in state.items()) and pb.masks(model).keys() == set()


def test_bad_checkpoints_leave_model_unchanged(tmp_path: Path) -> None:
    model = make_mlp()
    state = pb.snapshot(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pb.load(model, tmp_path / "missing.safetensors")
    other = make_mlp(0, (12, 10, 3))
    pb.save(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="another architecture"):
        pb.load(model, tmp_path / "other.safetensors")
    same_keys = make_mlp(0, (12, 16, 8, 4))
    pb.save(same_keys, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        pb.load(model, tmp_path / "shape.safetensors")
    good = tmp_path / "good.safetensors"
    pb.prune(make_mlp(), "magnitude", 0.5)
    pb.save(pb.prune(make_mlp(), "magnitude", 0.5), good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        pb.load(model, tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        pb.load(model, tmp_path / "garbage.safetensors")
    assert _snapshot_equal(model, state)


def test_snapshot_rewind_restores_values_keeps_masks() -> None:
    model = make_mlp()
    init = pb.snapshot(model)
    pb.prune(model, "magnitude", 0.5)
    keep = {k: v.clone() for k, v in pb.masks(model).items()}
    with torch.no_grad():
        for m in pb.prunable_layers(model).values():
            pb.original_weight(m).add_(1.0)
    pb.rewind(model, init)
    assert {k: torch.equal(v, keep[k]) for k, v in pb.masks(model).items()} == dict.fromkeys(
        keep, True
    )
    for name, m in pb.prunable_layers(model).items():
        assert torch.equal(pb.original_weight(m), init[f"{name}.weight"])
    with pytest.raises(ValueError, match="does not match"):
        pb.rewind(model, {"0.weight": init["0.weight"]})


def test_import_from_torch_prune() -> None:
    ref = make_cnn()
    for m in pb.prunable_layers(ref).values():
        tp.l1_unstructured(m, "weight", amount=0.4)
    masks_ref = {n: m.weight_mask.bool().clone() for n, m in pb.prunable_layers(ref).items()}
    x = torch.randn(2, 1, 8, 8)
    out = ref(x)
    pb.import_torch_prune(ref)
    assert not any(hasattr(m, "weight_orig") for m in ref.modules())
    torch.testing.assert_close(ref(x), out, rtol=0, atol=0)
    for k, v in pb.masks(ref).items():
        assert torch.equal(v, masks_ref[k])
    pb.reset(ref)
    torch.testing.assert_close(ref(x), make_cnn()(x), rtol=0, atol=0)  # originals preserved


def test_export_to_torch_prune() -> None:
    model = make_mlp()
    pb.prune(model, "magnitude", 0.3)
    keep = {k: v.clone() for k, v in pb.masks(model).items()}
    x = torch.randn(2, 12)
    out = model(x)
    pb.export_torch_prune(model)
    assert not pb.is_pruned(model)
    for name, m in pb.prunable_layers(model).items():
        assert tp.is_pruned(m)
        assert torch.equal(m.weight_mask.bool(), keep[name])
        assert torch.equal(m.weight_orig, make_mlp().get_submodule(name).weight)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_no_pickle_anywhere() -> None:
    src = Path(pb.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}: {line.strip()}"
        assert "import pickle" not in text, f


def test_plain_safetensors_loader_gets_the_sparse_model(tmp_path: Path) -> None:
    model = make_mlp()
    pb.prune(model, "magnitude", 0.9)
    path = pb.save(model, tmp_path / "m.safetensors")
    plain = make_mlp(7)
    result = plain.load_state_dict(safetensors.torch.load_file(path), strict=False)
    assert not result.missing_keys
    assert sorted(result.unexpected_keys) == sorted(
        f"{p}{n}.weight" for n in ("0", "2", "4") for p in ("__mask__.", "__pruned__.")
    )
    x = torch.randn(4, 12)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    assert pb.sparsity(plain).zeros == pb.sparsity(model).zeros  # zeros, not dense weights
    for name, keep in pb.masks(model).items():
        behind = pb.original_weight(model.get_submodule(name))[~keep]
        assert torch.equal(safetensors.torch.load_file(path)[f"__pruned__.{name}.weight"], behind)


def test_exact_round_trip_of_underlying_weights_and_retraining(tmp_path: Path) -> None:
    model = make_mlp()
    pb.prune(model, "random", 0.7, seed=1)
    with torch.no_grad():  # a layer whose pruned values are all zero stores no __pruned__
        w = pb.original_weight(model[2])
        w.mul_(pb.masks(model)["2"])
    path = pb.save(model, tmp_path / "m.safetensors")
    assert "__pruned__.2.weight" not in safetensors.torch.load_file(path)
    fresh = pb.load(make_mlp(9), path)
    for k, v in pb.snapshot(model).items():
        assert torch.equal(pb.snapshot(fresh)[k], v), k
    assert pb.masks(fresh).keys() == pb.masks(model).keys()


def test_old_layout_files_still_load(tmp_path: Path) -> None:
    """Layout 1 (before 2026-12): unmasked weights under the plain keys, no "layout" key."""
    model = make_mlp()
    pb.prune(model, "magnitude", 0.6)
    tensors = {k: t.detach().clone() for k, t in pb.snapshot(model).items()}
    for name, keep in pb.masks(model).items():
        tensors[f"__mask__.{name}.weight"] = keep.clone()
    meta = {"format": "prunebound", pb.checkpoint.DIGEST_KEY: pb.checkpoint.digest(tensors)}
    safetensors.torch.save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    fresh = pb.load(make_mlp(4), tmp_path / "old.safetensors")
    for k, v in pb.snapshot(model).items():
        assert torch.equal(pb.snapshot(fresh)[k], v), k
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module."])
def test_wrapped_model_checkpoints_load_into_the_plain_model(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_mlp()
    pb.prune(model, "magnitude", 0.5)
    wrapper = nn.Module()
    wrapper.add_module(prefix.rstrip("."), model)  # the key layout of compile / DataParallel
    path = pb.save(wrapper, tmp_path / "wrapped.safetensors")
    assert all(k.startswith(prefix) for k in pb.checkpoint.read(path)[0])
    with caplog.at_level("WARNING", logger="prunebound.checkpoint"):
        fresh = pb.load(make_mlp(3), path)
    assert f"stripped the key prefix {prefix!r}" in caplog.text
    x = torch.randn(2, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert pb.masks(fresh).keys() == pb.masks(model).keys()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = pb.save(make_mlp(), tmp_path / "m.safetensors")
        pb.save(make_mlp(), path)  # overwritten (atomic replace): same mode
        pruned = pb.prune(make_mlp(), "magnitude", 0.5)
        export = pb.save_export(pb.export(pruned, "dense"), tmp_path / "e.safetensors")
        (tmp_path / "plain.txt").write_text("")  # what open() gives: the reference
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (path, export, tmp_path / "plain.txt")}
    assert modes == {0o666 & ~umask}


def test_pruned_values_can_be_left_out(tmp_path: Path) -> None:
    model = make_mlp()
    pb.prune(model, "magnitude", 0.9)
    full = pb.save(model, tmp_path / "full.safetensors")
    small = pb.save(model, tmp_path / "small.safetensors", pruned_values=False)
    assert not any(k.startswith("__pruned__.") for k in safetensors.torch.load_file(small))
    assert small.stat().st_size < full.stat().st_size
    fresh = pb.load(make_mlp(2), small)
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert pb.masks(fresh).keys() == pb.masks(model).keys()
    pb.reset(fresh)  # the values behind the masks were not stored: zeros come back
    assert pb.sparsity(fresh).zeros == pb.sparsity(model).zeros
