"""Tests for prunebound.data: digits, IDX parsing, Fashion-MNIST and the dispatcher."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunebound.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    Dataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx,
    read_idx,
)

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: Path, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny 5-train / 3-test IDX directory of 4x6 images; return the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(5, 4, 6), dtype=np.uint8),
        "train_labels": np.array([0, 3, 1, 2, 3], dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(3, 4, 6), dtype=np.uint8),
        "test_labels": np.array([2, 0, 1], dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, base in IDX_NAMES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (directory / f"{base}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / base).write_bytes(data)
    return arrays


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_digits_shapes_and_ranges(digits: Dataset) -> None:
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.x_test.shape == (450, 64)  # ceil(0.25 * 1797)
    assert digits.input_shape == (64,)
    assert digits.num_classes == 10
    assert digits.x_train.dtype == torch.float32
    assert digits.y_train.dtype == torch.int64
    assert float(digits.x_train.min()) == 0.0
    assert float(digits.x_train.max()) == 1.0
    assert set(digits.y_test.tolist()) == set(range(10))


def test_digits_deterministic_and_seed_dependent(digits: Dataset) -> None:
    again = load_digits()
    assert torch.equal(again.x_train, digits.x_train)
    assert torch.equal(again.y_test, digits.y_test)
    other = load_digits(seed=1)
    assert not torch.equal(other.x_train, digits.x_train)


def test_digits_split_is_stratified(digits: Dataset) -> None:
    train = torch.bincount(digits.y_train, minlength=10).double()
    test = torch.bincount(digits.y_test, minlength=10).double()
    ratio = test / (train + test)
    assert torch.all((ratio - 0.25).abs() < 0.02), ratio


def test_digits_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        load_digits(test_fraction=1.5)


def test_flat_and_image_views(digits: Dataset) -> None:
    img = digits.image()
    assert img.input_shape == (1, 8, 8)
    assert img.x_train.shape == (digits.x_train.shape[0], 1, 8, 8)
    back = img.flat()
    assert back.input_shape == (64,)
    assert torch.equal(back.x_train, digits.x_train)
    assert img.image() is img


def test_image_rejects_non_square() -> None:
    x = torch.zeros(2, 10)
    y = torch.zeros(2, dtype=torch.int64)
    data = Dataset("odd", x, y, x, y, 2, (10,))
    with pytest.raises(ValueError, match="10 is not a perfect square"):
        data.image()


def test_dataset_checks_shapes() -> None:
    x = torch.zeros(3, 4)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="3 inputs but labels of shape"):
        Dataset("bad", x, y, x, y, 2, (4,))


def test_loaders_batches_and_shuffle_seeded(digits: Dataset) -> None:
    def first_labels(seed: int) -> torch.Tensor:
        train, _ = digits.loaders(32, seed=seed)
        return next(iter(train))[1]

    train, test = digits.loaders(32)
    xb, yb = next(iter(test))
    assert xb.shape == (32, 64)
    assert torch.equal(yb, digits.y_test[:32])  # test loader keeps order
    assert sum(len(b[1]) for b in train) == digits.x_train.shape[0]
    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        digits.loaders(0)


def test_subsample_deterministic(digits: Dataset) -> None:
    a = digits.subsample(100, 20, seed=3)
    b = digits.subsample(100, 20, seed=3)
    assert a.x_train.shape == (100, 64)
    assert a.x_test.shape == (20, 64)
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, digits.subsample(100, seed=4).x_train)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dir(tmp_path, gz=gz)
    data = load_idx(tmp_path, name="tiny")
    assert data.name == "tiny"
    assert data.input_shape == (1, 4, 6)
    assert data.num_classes == 4
    expected = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0)
    assert torch.equal(data.x_train[:, 0], expected)
    assert torch.equal(data.y_train, torch.tensor([0, 3, 1, 2, 3]))
    assert torch.equal(data.y_test, torch.tensor([2, 0, 1]))
    assert data.x_test.shape == (3, 1, 4, 6)


def test_read_idx_exact(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    assert np.array_equal(read_idx(tmp_path / "a"), a)


def test_idx_truncated_names_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: IDX file truncated"):
        load_idx(tmp_path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x00", "bad magic number"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "unsupported IDX dtype code 0x0d"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\x00", "has trailing bytes"),
    ],
)
def test_idx_corrupt_header(tmp_path: Path, payload: bytes, message: str) -> None:
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        load_idx(tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(info.value)


def test_idx_corrupt_gzip_names_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=True)
    f = tmp_path / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cannot decompress IDX file .*train-labels-idx1-ubyte"):
        load_idx(tmp_path)


def test_idx_subdirectory_layout(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "raw", gz=True)
    assert load_idx(tmp_path).x_train.shape == (5, 1, 4, 6)


def test_idx_missing_directory_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*--data-dir"):
        load_idx(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nope")


def test_idx_missing_file_named(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\[\.gz\] missing"):
        load_idx(tmp_path)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert load_dataset("digits", max_train=50).x_train.shape == (50, 64)
    write_idx_dir(tmp_path, gz=True)
    mnist = load_dataset("mnist", data_dir=tmp_path)
    assert mnist.name == "mnist"
    assert mnist.num_classes == 10
    assert load_dataset("idx", data_dir=tmp_path).num_classes == 4
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid names: digits, fashion"):
        load_dataset("cifar")
    assert DATASETS == ("digits", "fashion-mnist", "mnist", "idx")


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST not at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_installed() -> None:
    data = load_fashion_mnist()
    assert data.x_train.shape == (60000, 1, 28, 28)
    assert data.x_test.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10
    assert torch.equal(torch.bincount(data.y_test), torch.full((10,), 1000))
    assert float(data.x_test.min()) >= 0.0
    assert float(data.x_test.max()) <= 1.0
    small = load_dataset("fashion_mnist", max_train=1000, max_test=100)
    assert small.x_train.shape == (1000, 1, 28, 28)
    assert small.x_test.shape == (100, 1, 28, 28)
