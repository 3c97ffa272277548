"""Datasets: MVTec layout and plain folders of good images, decoded once into memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from stpm.bundle import fingerprint  # noqa: F401  (re-exported: part of the data API)
from stpm.imageio import DataError
from stpm.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, is_image_path, read_image, resize_rgb


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type folder name
    mask: Path | None  # ground-truth mask (anomalous samples of an MVTec layout)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory")
    return sorted(p for p in folder.iterdir() if is_image_path(p))


def good_train_dir(data: str | Path) -> Path:
    """The folder of good training images: `<data>/train/good` (MVTec layout) or `<data>` itself."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data} does not exist")
    mvtec = data / "train" / "good"
    if mvtec.is_dir():
        return mvtec
    if data.is_dir() and list_images(data):
        return data
    raise DataError(f"{data} holds no images: expected <data>/train/good/*.png (MVTec layout) or images directly")


def test_samples(data: str | Path) -> list[Sample]:
    """Labelled test samples of an MVTec-layout folder: test/good and test/<defect> with ground_truth masks."""
    root = Path(data)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root} has no test/ folder (MVTec layout: <data>/test/<good|defect>/*.png)")
    samples = []
    for d in sorted(p for p in test.iterdir() if p.is_dir()):
        for img in list_images(d):
            if d.name == "good":
                samples.append(Sample(img, 0, "good", None))
            else:
                mask = root / "ground_truth" / d.name / f"{img.stem}_mask.png"
                samples.append(Sample(img, 1, d.name, mask if mask.is_file() else None))
    if not samples:
        raise DataError(f"{test} contains no images")
    return samples


def load_images(
    paths: list[Path], image_size: int, skip_bad: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Decode and resize every path -> (uint8 [N, S, S, 3], kept paths, skipped (path, reason)).

    Bad files raise one DataError naming all of them, unless skip_bad, which reports them instead.
    """
    arrays, kept, bad = [], [], []
    for p in paths:
        try:
            arrays.append(resize_rgb(read_image(p, max_pixels), image_size))
            kept.append(p)
        except ImageDecodeError as e:
            bad.append((p, e.reason))
    if bad and not skip_bad:
        lines = "\n".join(f"  {p}: {reason}" for p, reason in bad)
        raise DataError(f"{len(bad)} unreadable image(s) (use --skip-bad to leave them out):\n{lines}")
    if not arrays:
        raise DataError("no readable images")
    return np.stack(arrays), kept, bad


def load_mask(path: Path | None, image_size: int) -> np.ndarray:
    """Ground-truth mask -> bool [S, S] (nearest-neighbour resize); None -> all False."""
    if path is None:
        return np.zeros((image_size, image_size), dtype=bool)
    m = Image.open(path).convert("L").resize((image_size, image_size), Image.NEAREST)
    return np.asarray(m) > 127


class ImageArrayDataset(Dataset):
    """uint8 [N, S, S, 3] -> float tensors [3, S, S] in [0, 1] (the model normalises)."""

    def __init__(self, images: np.ndarray, augment: bool = False):
        self.images = images
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            # Photometric jitter only: geometric changes can be anomalies on a production line.
            g = torch.empty(1).uniform_(0.9, 1.1)
            x = (x * g).clamp_(0.0, 1.0)
        return x


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, S, S] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
