"""Datasets for the distillation benchmarks: the local MNIST test10k idx files, sklearn digits, ImageFolder.

The shared data folder is the project checkout's sibling `shared/data` (override: STPM_SHARED_DATA).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

MNIST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
UNLABELED = -1


@dataclass(frozen=True)
class Split:
    """Normalised images [N, C, H, W] float32 and labels [N] int64 for train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    description: str


def shared_data_dir() -> Path:
    """STPM_SHARED_DATA if set, else <repo root>/../shared/data."""
    env = os.environ.get("STPM_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def mnist_raw_dir() -> Path:
    return shared_data_dir() / "mnist_test10k" / "MNIST" / "raw"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_idx_gz(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (MNIST format): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {arr.size}")
    return arr.reshape(dims)


def load_mnist_test10k(raw_dir: Path | None = None, check_md5: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 official MNIST test digits: uint8 images [10000, 28, 28] and labels [10000]."""
    raw = raw_dir or mnist_raw_dir()
    paths = {name: raw / name for name in MNIST_MD5}
    for name, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"MNIST file missing: {p}")
        if check_md5 and md5sum(p) != MNIST_MD5[name]:
            raise ValueError(f"md5 mismatch for {p}")
    images = read_idx_gz(paths["t10k-images-idx3-ubyte.gz"])
    labels = read_idx_gz(paths["t10k-labels-idx1-ubyte.gz"])
    return images, labels


def deterministic_split(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random permutation: the first n_train for training, the rest for testing."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train:]


def mnist_split(n_train: int = 8000, split_seed: int = 0, raw_dir: Path | None = None) -> Split:
    """MNIST test10k split into n_train / 10000 - n_train, normalised with the usual MNIST mean/std."""
    images, labels = load_mnist_test10k(raw_dir)
    tr, te = deterministic_split(len(labels), n_train, split_seed)
    x = (torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(x[tr], y[tr], x[te], y[te], 10,
                 f"MNIST t10k split {n_train}/{len(labels) - n_train} (split seed {split_seed})")


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images [1797, 8, 8] in 0..16, labels [1797]).

    Reads sklearn/datasets/data/digits.csv.gz directly (what load_digits reads) so that importing
    scikit-learn, slow on a busy CPU, is avoided; falls back to load_digits.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digits_split(n_train: int = 1400, split_seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1] then standardised."""
    images, targets = load_sklearn_digits()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(targets.astype(np.int64))
    tr, te = deterministic_split(len(y), n_train, split_seed)
    return Split(x[tr], y[tr], x[te], y[te], 10,
                 f"sklearn digits split {n_train}/{len(y) - n_train} (split seed {split_seed})")


def image_folder_split(root: Path, image_size: int, grayscale: bool, n_train_fraction: float = 0.8,
                       split_seed: int = 0) -> Split:
    """ImageFolder-style data (root/<class>/*.png), loaded into memory, split by a seeded permutation."""
    from torchvision import datasets, transforms

    tf = [transforms.Resize((image_size, image_size))]
    if grayscale:
        tf.append(transforms.Grayscale(1))
    tf += [transforms.ToTensor()]
    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(tf))
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    tr, te = deterministic_split(len(y), int(round(n_train_fraction * len(y))), split_seed)
    return Split(x[tr], y[tr], x[te], y[te], len(ds.classes), f"ImageFolder {root} ({len(ds.classes)} classes)")


def load_split(data: str, n_train: int | None = None, image_size: int = 32, split_seed: int = 0) -> Split:
    """'mnist', 'digits' or a path to an ImageFolder root."""
    if data == "mnist":
        return mnist_split(n_train or 8000, split_seed)
    if data == "digits":
        return digits_split(n_train or 1400, split_seed)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"unknown data {data!r}: use mnist, digits or an ImageFolder directory")
    return image_folder_split(root, image_size, grayscale=False, split_seed=split_seed)


def loader(x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """In-memory loader; shuffling is seeded."""
    g = torch.Generator().manual_seed(seed)
    ds: Dataset = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)
