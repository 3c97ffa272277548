"""A mixed-size data set from an MVTec-layout folder: every image replaced by one random crop of 0.2-1x
its height and (independently) its width, as real inspection sets are crops of varying size and shape.

Defective test images are cropped around a random pixel of their defect, so the crop holds part of it,
and their masks are cropped with them. Deterministic given the seed: each file's crop depends only on
the seed and the file's path inside the set (not on which other files are built). Written as PNG
(lossless) into a folder the caller chooses (tests and benchmarks: a temporary one; never committed).

    info = build_mixed_set(Path("../shared/data/mvtec_ad_bottle_512/bottle"), tmp / "bottle", seed=0)
    stpm train tmp/bottle --name bottle-mixed; stpm eval bottle-mixed tmp/bottle

Torch-free (numpy + Pillow).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from stpm.training.data import Sample, list_images, test_samples

LOW, HIGH = 0.2, 1.0  # a crop's side as a fraction of the source image's side


@dataclass
class MixedSet:
    """What was built: the folder (MVTec layout) and every image's (height, width) by role."""

    root: Path
    train_sizes: list[tuple[int, int]] = field(default_factory=list)
    test_sizes: list[tuple[int, int]] = field(default_factory=list)
    n_defective: int = 0

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self.train_sizes + self.test_sizes


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def crop_box(size: tuple[int, int], rng: np.random.Generator, anchor: tuple[int, int] | None = None,
             low: float = LOW, high: float = HIGH, reference: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """A random crop (top, left, height, width) of an image of `size` (height, width): each side low..high
    of the image's (or of `reference`'s, at most the image's); anywhere, or (anchor given) so that it holds
    the anchor pixel (y, x)."""
    big_h, big_w = size
    ref_h, ref_w = reference or size
    h = min(big_h, max(1, int(round(rng.uniform(low, high) * ref_h))))
    w = min(big_w, max(1, int(round(rng.uniform(low, high) * ref_w))))
    if anchor is None:
        return int(rng.integers(0, big_h - h + 1)), int(rng.integers(0, big_w - w + 1)), h, w
    y, x = anchor
    top = int(rng.integers(max(0, y - h + 1), min(y, big_h - h) + 1))
    left = int(rng.integers(max(0, x - w + 1), min(x, big_w - w) + 1))
    return top, left, h, w


def _defect_pixel(mask: Image.Image, rng: np.random.Generator) -> tuple[int, int] | None:
    ys, xs = np.nonzero(np.asarray(mask.convert("L")) > 127)
    if ys.size == 0:
        return None
    i = int(rng.integers(0, ys.size))
    return int(ys[i]), int(xs[i])


def _crop_to(src: Path, dst: Path, box: tuple[int, int, int, int]) -> tuple[int, int]:
    top, left, h, w = box
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.crop((left, top, left + w, top + h)).save(dst)
    return h, w


def _crop_sample(source: Path, out: Path, s: Sample, seed: int) -> tuple[int, int]:
    """One test image (and its mask) cropped into `out`; -> the crop's (height, width)."""
    rel = s.path.relative_to(source)
    rng = _rng(seed, rel.as_posix())
    with Image.open(s.path) as im:
        size = (im.height, im.width)
    anchor, mask = None, None
    if s.mask is not None:
        mask = Image.open(s.mask)
        anchor = _defect_pixel(mask, rng)
    box = crop_box(size, rng, anchor)
    if mask is not None:
        top, left, h, w = box
        dst = out / s.mask.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        mask.crop((left, top, left + w, top + h)).save(dst)
        mask.close()
    return _crop_to(s.path, out / rel, box)


def build_mixed_set(source: str | Path, out: str | Path, seed: int = 0, limit: int | None = None) -> MixedSet:
    """Crop every image of an MVTec-layout `source` (train/good, test/*, ground_truth/*) into `out`.
    limit: at most this many images per folder (the first by name; tests keep sets small)."""
    source, out = Path(source), Path(out)
    built = MixedSet(out)
    for p in list_images(source / "train" / "good")[:limit]:
        rng = _rng(seed, p.relative_to(source).as_posix())
        with Image.open(p) as im:
            box = crop_box((im.height, im.width), rng)
        built.train_sizes.append(_crop_to(p, out / p.relative_to(source), box))
    per_folder: dict[str, int] = {}
    for s in test_samples(source):
        per_folder[s.defect] = per_folder.get(s.defect, 0) + 1
        if limit is not None and per_folder[s.defect] > limit:
            continue
        built.test_sizes.append(_crop_sample(source, out, s, seed))
        built.n_defective += s.label
    return built


__all__ = ["HIGH", "LOW", "MixedSet", "build_mixed_set", "crop_box"]
