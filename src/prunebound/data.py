"""Data sets as plain tensors: bundled scikit-learn digits and MNIST-format IDX directories.

Everything is loaded eagerly into memory (digits is 1797 samples, Fashion-MNIST ~190 MB as
float32), which keeps batching trivial and runs reproducible. Randomness (splits, subsampling,
shuffling) comes from an int seed or a `torch.Generator` passed by the caller.
"""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from prunebound._check import Seed, as_generator

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "mnist", "idx")

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Sub-directories other tools put IDX files in (torchvision: <root>/<Name>/raw).
_IDX_SUBDIRS = (".", "raw", "FashionMNIST/raw", "MNIST/raw")
_UBYTE = 0x08

Batches = DataLoader[tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Dataset:
    """A classification data set held in memory.

    Attributes:
        name: Short name, e.g. "digits" or "fashion-mnist".
        x_train, x_test: float32 inputs of shape (N, *input_shape), values in [0, 1].
        y_train, y_test: int64 labels of shape (N,), values in [0, num_classes).
        num_classes: Number of classes.
        input_shape: Per-sample input shape, e.g. (64,) or (1, 28, 28).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise ValueError(
                    f"{self.name} {split}: expected float32 inputs and int64 labels, "
                    f"got {x.dtype} and {y.dtype}"
                )
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name} {split}: {x.shape[0]} inputs but labels of shape {tuple(y.shape)}"
                )
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{self.name} {split}: sample shape {tuple(x.shape[1:])} "
                    f"does not match input_shape={self.input_shape}"
                )

    def flat(self) -> Dataset:
        """Return the same data with every sample flattened to a vector (for MLPs)."""
        d = math.prod(self.input_shape)
        return replace(
            self,
            x_train=self.x_train.reshape(-1, d),
            x_test=self.x_test.reshape(-1, d),
            input_shape=(d,),
        )

    def image(self) -> Dataset:
        """Return the same data with samples shaped (C, H, W) (for CNNs).

        A vector of length s*s becomes (1, s, s) (digits: 1x8x8, MNIST: 1x28x28) and an (H, W)
        sample becomes (1, H, W). Raises ValueError if no square image shape fits.
        """
        shape = self.input_shape
        if len(shape) == 3:
            return self
        if len(shape) == 2:
            chw = (1, shape[0], shape[1])
        else:
            d = math.prod(shape)
            side = math.isqrt(d)
            if side * side != d:
                raise ValueError(
                    f"cannot view {self.name} samples of shape {shape} as a square image: "
                    f"{d} is not a perfect square"
                )
            chw = (1, side, side)
        return replace(
            self,
            x_train=self.x_train.reshape(-1, *chw),
            x_test=self.x_test.reshape(-1, *chw),
            input_shape=chw,
        )

    def subsample(
        self, max_train: int | None = None, max_test: int | None = None, *, seed: int = 0
    ) -> Dataset:
        """Keep at most `max_train` / `max_test` samples, chosen uniformly at random with `seed`.

        For fast runs on large data sets; `None` keeps a split whole. Original order is kept.
        """
        gen = torch.Generator().manual_seed(seed)
        x_train, y_train = _take(self.x_train, self.y_train, max_train, gen, "max_train")
        x_test, y_test = _take(self.x_test, self.y_test, max_test, gen, "max_test")
        return replace(self, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    def loaders(self, batch_size: int, *, seed: Seed = 0) -> tuple[Batches, Batches]:
        """Return (train, test) DataLoaders of (x, y) batches.

        The train loader reshuffles every epoch with the generator `seed` stands for
        (`_check.Seed`: default 0, reproducible); the test loader keeps the stored order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        train = DataLoader(
            TensorDataset(self.x_train, self.y_train),
            batch_size=batch_size,
            shuffle=True,
            generator=as_generator(seed),
        )
        test = DataLoader(
            TensorDataset(self.x_test, self.y_test), batch_size=batch_size, shuffle=False
        )
        return train, test


def _take(
    x: torch.Tensor, y: torch.Tensor, limit: int | None, gen: torch.Generator, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is None or limit >= x.shape[0]:
        return x, y
    if limit < 1:
        raise ValueError(f"{what} must be a positive int or None, got {limit}")
    idx = torch.randperm(x.shape[0], generator=gen)[:limit].sort().values
    return x[idx], y[idx]


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled 8x8 digits (1797 samples, no download).

    Pixels (0..16) are scaled to [0, 1]; the train/test split is stratified by class and
    deterministic in `seed`. Samples are flat vectors of 64 features; use `.image()` for 1x8x8.
    """
    # Imported lazily (allowed in tests/test_architecture.py): scikit-learn adds about a second
    # to `import prunebound` and only digits needs it.
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )

    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a / 16.0).astype(np.float32))

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset("digits", as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te), 10, (64,))


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes into a uint8 array.

    The header is two zero bytes, a dtype code (only 0x08, ubyte, is supported), the number
    of dimensions, then one big-endian uint32 per dimension. Raises ValueError naming the file
    if the header is wrong or the payload is truncated or too long.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"cannot decompress IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex()}")
    if raw[2] != _UBYTE:
        raise ValueError(f"{path}: unsupported IDX dtype code {raw[2]:#04x}, expected 0x08 (ubyte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, ndim={ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {state}: header says dims {dims} ({expected} bytes), "
            f"file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _hint(name: str) -> str:
    if name == "fashion-mnist":
        return (
            "install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
            f"(files go under {FASHION_MNIST_DIR}), or pass an IDX directory with --data-dir"
        )
    return "pass a directory holding the four MNIST-format IDX files with --data-dir"


def _find_idx_file(directory: Path, base: str, name: str) -> Path:
    tried: list[Path] = []
    for sub in _IDX_SUBDIRS:
        for fname in (base, base + ".gz", base.replace("-idx", ".idx")):
            candidate = (directory / sub / fname).resolve()
            if candidate.is_file():
                return candidate
            tried.append(candidate)
    raise FileNotFoundError(
        f"IDX file {base}[.gz] missing from {directory} (tried {len(tried)} paths, "
        f"e.g. {tried[0]}); {_hint(name)}"
    )


def load_idx(
    directory: str | Path, *, name: str = "idx", num_classes: int | None = None
) -> Dataset:
    """Load an MNIST-format IDX directory (train/t10k images and labels, plain or .gz).

    Pixels are scaled to [0, 1] and samples have shape (1, H, W). `num_classes` defaults to
    the largest label plus one. Raises FileNotFoundError (with a hint on getting the data)
    if the directory or a file is missing, ValueError if a file is corrupt or inconsistent.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX directory {directory} does not exist; {_hint(name)}")
    arrays = {k: read_idx(_find_idx_file(directory, base, name)) for k, base in _IDX_FILES.items()}
    tensors: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name} {split}: expected images (N, H, W) and labels (N,), "
                f"got {images.shape} and {labels.shape} in {directory}"
            )
        tensors[f"x_{split}"] = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        tensors[f"y_{split}"] = torch.from_numpy(labels.astype(np.int64))
    if tensors["x_train"].shape[1:] != tensors["x_test"].shape[1:]:
        raise ValueError(
            f"{name}: train images {tuple(tensors['x_train'].shape[1:])} and test images "
            f"{tuple(tensors['x_test'].shape[1:])} differ in size in {directory}"
        )
    top = int(max(tensors["y_train"].max(), tensors["y_test"].max())) + 1
    if num_classes is None:
        num_classes = top
    elif num_classes < top:
        raise ValueError(f"num_classes={num_classes} but {name} has labels up to {top - 1}")
    logger.info(
        "loaded %s from %s: %d train, %d test",
        name,
        directory,
        tensors["x_train"].shape[0],
        tensors["x_test"].shape[0],
    )
    return Dataset(
        name=name,
        num_classes=num_classes,
        input_shape=tuple(tensors["x_train"].shape[1:]),
        **tensors,
    )


def load_fashion_mnist(
    directory: str | Path | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes).

    `directory` defaults to where Debian's `dataset-fashion-mnist` installs the gzipped IDX
    files. `max_train` / `max_test` subsample deterministically with `seed` for fast runs.
    """
    data = load_idx(
        FASHION_MNIST_DIR if directory is None else directory, name="fashion-mnist", num_classes=10
    )
    return data.subsample(max_train, max_test, seed=seed)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name: "digits", "fashion-mnist", "mnist" or "idx".

    "mnist" and "idx" need `data_dir` (any MNIST-format IDX directory); "fashion-mnist" uses
    it if given. `seed` drives the digits split and any `max_train` / `max_test` subsampling.
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key == "digits":
        data = load_digits(seed=seed)
    elif key == "fashion-mnist":
        data = load_fashion_mnist(data_dir)
    else:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs data_dir (an MNIST-format IDX directory)")
        data = load_idx(data_dir, name=key, num_classes=10 if key == "mnist" else None)
    return data.subsample(max_train, max_test, seed=seed)
