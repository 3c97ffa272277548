"""Datasets for distillation: full MNIST, CIFAR-10 (JPEG tarballs), scikit-learn digits, ImageFolder.

Every loader returns a `Split`: training, optional validation and test tensors, normalised, with the
facts that identify the split (`SplitInfo`) and a fingerprint of the training set, so that a teacher's
checkpoint can be checked against the split a student is distilled on.
MNIST and CIFAR-10 keep their official test sets; the split seed draws the validation images and the
(optional) training subset from the official training set. digits and ImageFolder data are split by the
seed into training, validation and test.
The shared data folder is the project checkout's sibling `shared/data` (override: STPM_SHARED_DATA).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

DATASETS = ("mnist", "cifar10", "digits", "folder")
MNIST_FILES = {  # md5 of the gzipped files in shared/data/mnist_full (rebuilt losslessly, see its README)
    "train-images-idx3-ubyte.gz": "56f11203c65dcbeead45b51e76a4d637",
    "train-labels-idx1-ubyte.gz": "e7b6794769634574359eea14a747abe8",
    "t10k-images-idx3-ubyte.gz": "a3ecf3149c20433655c67fbfd8a8d3a4",
    "t10k-labels-idx1-ubyte.gz": "4134d8bfaa6f217c1c831e48c83339aa",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
UNLABELED = -1


@dataclass(frozen=True)
class SplitInfo:
    """What identifies a split: data set, split seed and the sizes drawn."""

    data: str
    split_seed: int
    n_train: int
    n_val: int
    n_test: int


@dataclass(frozen=True)
class Split:
    """Normalised images [N, C, H, W] float32 and labels [N] int64; validation tensors are empty when n_val = 0."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    description: str
    info: SplitInfo

    def fingerprint(self) -> dict:
        """SplitInfo plus sha256 of the training images and labels: equal iff the training set is the same."""
        h = hashlib.sha256()
        h.update(self.y_train.numpy().tobytes())
        h.update(self.x_train.numpy().tobytes())
        return {**asdict(self.info), "train_sha256": h.hexdigest()}


def shared_data_dir() -> Path:
    """STPM_SHARED_DATA if set, else <repo root>/../shared/data."""
    env = os.environ.get("STPM_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


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


def load_mnist(raw_dir: Path | None = None, check_md5: bool = True) -> tuple[np.ndarray, ...]:
    """Full MNIST as uint8 arrays: train images [60000, 28, 28], labels [60000], test [10000, 28, 28], [10000]."""
    raw = raw_dir or shared_data_dir() / "mnist_full" / "MNIST" / "raw"
    for name, md5 in MNIST_FILES.items():
        p = raw / name
        if not p.is_file():
            raise FileNotFoundError(f"MNIST file missing: {p}")
        if check_md5 and md5sum(p) != md5:
            raise ValueError(f"md5 mismatch for {p}")
    arrays = [read_idx_gz(raw / n) for n in MNIST_FILES]
    if len(arrays[0]) != len(arrays[1]) or len(arrays[2]) != len(arrays[3]):
        raise ValueError(f"{raw}: image and label counts differ")
    return tuple(arrays)


def read_cifar10_tar(path: Path, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All `<split>/<class>/<n>.jpg` members of a CIFAR-10 JPEG tarball (or the first `per_class` of each class,
    for quick runs), decoded with Pillow, in name order.

    -> uint8 images [N, 32, 32, 3], int64 labels [N] (index into CIFAR10_CLASSES).
    """
    from PIL import Image

    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        if per_class is not None:
            members = [m for m in members if int(Path(m.name).stem) < per_class]
        for m in members:
            cls = Path(m.name).parent.name
            if cls not in CIFAR10_CLASSES:
                raise ValueError(f"{path}: unknown class folder {cls!r} in {m.name}")
            with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(CIFAR10_CLASSES.index(cls))
    if not images:
        raise ValueError(f"{path}: no JPEG members")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_cifar10(root: Path | None = None, cache: Path | None = None,
                 per_class: int | None = None) -> tuple[np.ndarray, ...]:
    """CIFAR-10 from shared/data/cifar10_jpeg: train [50000, 32, 32, 3] uint8, labels, test [10000, ...], labels.

    Decoding the 60,000 JPEGs takes ~30 s of CPU; `cache` (an .npz path) keeps the decoded arrays for reuse.
    per_class: only the first images of each class in each split (quick runs; never cached).
    """
    if per_class is not None:
        root = root or shared_data_dir() / "cifar10_jpeg"
        return tuple(a for split in ("train", "test") for a in read_cifar10_tar(root / f"{split}.tar.gz", per_class))
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    root = root or shared_data_dir() / "cifar10_jpeg"
    out = []
    for split in ("train", "test"):
        p = root / f"{split}.tar.gz"
        if not p.is_file():
            raise FileNotFoundError(f"CIFAR-10 tarball missing: {p}")
        out += list(read_cifar10_tar(p))
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_suffix(".tmp.npz")
        np.savez(tmp, x_train=out[0], y_train=out[1], x_test=out[2], y_test=out[3])
        tmp.replace(cache)
    return tuple(out)


def pool_split(n_pool: int, n_train: int | None, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of range(n_pool): the first n_val indices for validation, the next n_train for
    training (all the rest when n_train is None). Disjoint by construction."""
    if n_val < 0 or n_val >= n_pool:
        raise ValueError(f"n_val must lie in [0, {n_pool}), got {n_val}")
    rest = n_pool - n_val
    n_train = rest if n_train is None else n_train
    if not 0 < n_train <= rest:
        raise ValueError(f"n_train must lie in [1, {rest}] (pool {n_pool} minus {n_val} validation), got {n_train}")
    perm = np.random.default_rng(seed).permutation(n_pool)
    return perm[n_val:n_val + n_train], perm[:n_val]


def deterministic_split(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random permutation: the first n_train for training, the rest for testing."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train:]


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W], (x / 255 - mean) / std per channel."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def _from_pool(name: str, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int,
               n_train: int | None, n_val: int, split_seed: int, what: str) -> Split:
    tr, va = pool_split(len(y), n_train, n_val, split_seed)
    info = SplitInfo(name, split_seed, len(tr), len(va), len(y_test))
    desc = (f"{what}: {len(tr)} train / {len(va)} validation (from the official training set, split seed "
            f"{split_seed}) / {len(y_test)} official test")
    return Split(x[tr], y[tr], x[va], y[va], x_test, y_test, num_classes, desc, info)


def mnist_split(n_train: int | None = None, n_val: int = 0, split_seed: int = 0,
                raw_dir: Path | None = None) -> Split:
    """Full MNIST: train/validation drawn from the 60,000 training digits; the official 10,000 test digits."""
    xtr, ytr, xte, yte = load_mnist(raw_dir)
    norm = lambda a: _normalise(a, (MNIST_MEAN,), (MNIST_STD,))  # noqa: E731
    return _from_pool("mnist", norm(xtr), torch.from_numpy(ytr.astype(np.int64)), norm(xte),
                      torch.from_numpy(yte.astype(np.int64)), 10, n_train, n_val, split_seed, "MNIST")


def cifar10_split(n_train: int | None = None, n_val: int = 0, split_seed: int = 0, root: Path | None = None,
                  cache: Path | None = None, per_class: int | None = None) -> Split:
    """CIFAR-10 (JPEG q75 copy): train/validation drawn from the 50,000 training images; the official 10,000 test
    (per_class: the first images of each class of both splits only, for quick runs)."""
    xtr, ytr, xte, yte = load_cifar10(root, cache, per_class)
    norm = lambda a: _normalise(a, CIFAR10_MEAN, CIFAR10_STD)  # noqa: E731
    return _from_pool("cifar10", norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte), 10,
                      n_train, n_val, split_seed, "CIFAR-10 (JPEG q75)")


def _three_way(name: str, x: Tensor, y: Tensor, num_classes: int, test_fraction: float, n_train: int | None,
               n_val: int, split_seed: int, what: str) -> Split:
    """Seeded split of one pool into test (test_fraction), validation (n_val) and training (n_train or the rest)."""
    n_test = int(round(test_fraction * len(y)))
    if not 0 < n_test < len(y):
        raise ValueError(f"test_fraction {test_fraction} leaves no test or no training images of {len(y)}")
    perm = np.random.default_rng(split_seed).permutation(len(y))
    te, pool = perm[:n_test], perm[n_test:]
    tr, va = pool_split(len(pool), n_train, n_val, split_seed + 1)
    tr, va = pool[tr], pool[va]
    info = SplitInfo(name, split_seed, len(tr), len(va), len(te))
    desc = f"{what}: {len(tr)} train / {len(va)} validation / {len(te)} test (split seed {split_seed})"
    return Split(x[tr], y[tr], x[va], y[va], x[te], y[te], num_classes, desc, info)


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


def digits_split(n_train: int | None = None, n_val: int = 0, split_seed: int = 0,
                 test_fraction: float = 397 / 1797) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1] then standardised; 397 test images."""
    images, targets = load_sklearn_digits()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(targets.astype(np.int64))
    return _three_way("digits", x, y, 10, test_fraction, n_train, n_val, split_seed, "scikit-learn digits")


def image_folder_split(root: Path, image_size: int, grayscale: bool, test_fraction: float = 0.2,
                       n_train: int | None = None, n_val: int = 0, split_seed: int = 0) -> Split:
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
    return _three_way("folder", x, y, len(ds.classes), test_fraction, n_train, n_val, split_seed,
                      f"ImageFolder {root} ({len(ds.classes)} classes)")


def load_split(data: str, data_dir: Path | None = None, n_train: int | None = None, n_val: int = 0,
               split_seed: int = 0, image_size: int = 32) -> Split:
    """data: mnist | cifar10 | digits | folder (folder needs data_dir, an ImageFolder root).

    data_dir overrides the shared-data location for mnist (the raw/ folder) and cifar10 (the tarballs' folder).
    """
    if data == "mnist":
        return mnist_split(n_train, n_val, split_seed, data_dir)
    if data == "cifar10":
        return cifar10_split(n_train, n_val, split_seed, data_dir)
    if data == "digits":
        return digits_split(n_train, n_val, split_seed)
    if data == "folder":
        if data_dir is None or not Path(data_dir).is_dir():
            raise ValueError(f"--data folder needs --data-dir pointing at an ImageFolder root; got {data_dir}")
        return image_folder_split(Path(data_dir), image_size, grayscale=False, n_train=n_train, n_val=n_val,
                                  split_seed=split_seed)
    raise ValueError(f"unknown data {data!r}: use one of {DATASETS}")


def random_translate(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero padding. [B, C, H, W] -> same."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability 1/2. [B, C, H, W] -> same."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def jitter(max_shift: int) -> Callable[[Tensor], Tensor]:
    """Training-batch augmentation: per-image random translation (Hinton's +-2 px jitter for MNIST)."""
    return lambda x: random_translate(x, max_shift)


def crop_flip(pad: int = 4) -> Callable[[Tensor], Tensor]:
    """Training-batch augmentation for CIFAR: random translation by up to `pad` px (= pad + random crop) and flip."""
    return lambda x: random_flip(random_translate(x, pad))


def augmentation(name: str) -> Callable[[Tensor], Tensor] | None:
    """Training-batch augmentation by name: "none" -> None, "shift<N>" -> jitter(N), "crop-flip" -> crop_flip(4)."""
    if name == "none":
        return None
    if name == "crop-flip":
        return crop_flip(4)
    if name.startswith("shift") and name[5:].isdigit():
        return jitter(int(name[5:]))
    raise ValueError(f"unknown augmentation {name!r}: none | shift<N> | crop-flip")


def loader(x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """In-memory loader; shuffling is seeded."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)


class TensorBatches:
    """Mini-batches cut from in-memory tensors by index: no per-sample collate, and the tensors stay on their
    device (load the data to the GPU once). Seeded: the shuffle order depends only on `seed` and the epoch."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool = True, seed: int = 0) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]
