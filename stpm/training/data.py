"""Data folders: MVTec layout and plain folders of good images, decoded and tiled once into memory.
Torch-free (numpy + Pillow)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stpm.bundle import fingerprint  # noqa: F401  (re-exported: part of the data API)
from stpm.imaging.decode import DataError
from stpm.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    is_image_path,
    read_image,
    read_image_size,
    resize_rgb,
)
from stpm.options import TilingOptions
from stpm.imaging.geometry import DEFAULT_SCALE_QUANTILE, Geometry, TiledImages, TilingError, plan, tiles


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type folder name
    mask: Path | None  # ground-truth mask (anomalous samples of an MVTec layout)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (and its sub-folders when recursive), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory")
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_image_path(p))


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
        raise _bad_files_error(bad)
    if not arrays:
        raise DataError("no readable images")
    return np.stack(arrays), kept, bad


def _bad_files_error(bad: list[tuple[Path, str]], what: str = "unreadable image(s)") -> DataError:
    lines = "\n".join(f"  {p}: {reason}" for p, reason in bad)
    return DataError(f"{len(bad)} {what} (use --skip-bad to leave them out):\n{lines}")


def read_sizes(
    paths: list[Path], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[tuple[int, int]], list[Path], list[tuple[Path, str]]]:
    """(height, width) of every readable path from its header -> (sizes, kept paths, bad (path, reason))."""
    sizes, kept, bad = [], [], []
    for p in paths:
        try:
            sizes.append(read_image_size(p, max_pixels))
            kept.append(p)
        except ImageDecodeError as e:
            bad.append((p, e.reason))
    return sizes, kept, bad


def load_tiled(
    paths: list[Path], geometry: Geometry, skip_bad: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[TiledImages, list[Path], list[tuple[Path, str]]]:
    """Decode every path and cut it into the geometry's tiles -> (TiledImages, kept paths, skipped).

    Undecodable files and images the geometry cannot cover (TilingError) raise one DataError naming
    all of them, unless skip_bad, which reports them instead. One image is held at full size at a time.
    """
    parts, plans, kept, bad = [], [], [], []
    for p in paths:
        try:
            im = read_image(p, max_pixels)
            tp = plan(im.shape[0], im.shape[1], geometry)
        except ImageDecodeError as e:
            bad.append((p, e.reason))
            continue
        except TilingError as e:
            bad.append((p, str(e)))
            continue
        parts.append(tiles(im, tp))
        plans.append(tp)
        kept.append(p)
    if bad and not skip_bad:
        raise _bad_files_error(bad, "image(s) that cannot be used")
    if not parts:
        raise DataError("no readable images")
    return TiledImages(np.concatenate(parts), plans), kept, bad


def load_training_tiles(
    paths: list[Path], tile: int, cfg: TilingOptions, skip_bad: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[TiledImages, Geometry, list[Path], list[tuple[Path, str]], list[tuple[int, int]]]:
    """Good training images -> (tiles, the Geometry chosen from their sizes, kept paths, skipped, sizes).

    The scale comes from the images' header sizes (stpm.tiling.resolve); then each image is decoded
    and tiled. Every unusable file is named in one DataError unless skip_bad."""
    sizes, readable, bad = read_sizes(paths, max_pixels)
    if not sizes:
        raise _bad_files_error(bad) if bad and not skip_bad else DataError("no readable images")
    geometry = choose_geometry(cfg, tile, sizes)
    tiled, kept, bad_tiles = load_tiled(readable, geometry, skip_bad=True, max_pixels=max_pixels)
    order = {p: i for i, p in enumerate(paths)}
    bad = sorted(bad + bad_tiles, key=lambda b: order[b[0]])
    if bad and not skip_bad:
        raise _bad_files_error(bad, "image(s) that cannot be used")
    size_of = dict(zip(readable, sizes))
    return tiled, geometry, kept, bad, [size_of[p] for p in kept]


def choose_scale(tile: int, sizes: Sequence[tuple[int, int]], resolution: int | None = None,
                 quantile: float = DEFAULT_SCALE_QUANTILE) -> float:
    """Default scale: resolution (default: the tile size) / the training images' short side at `quantile`
    (0.5: the median)."""
    if not sizes:
        raise ValueError("no image sizes to choose a scale from")
    res = tile if resolution is None else resolution
    if res < 1:
        raise ValueError(f"resolution must be >= 1, got {res}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"scale quantile must be within 0..1, got {quantile}")
    return float(res / np.quantile([min(h, w) for h, w in sizes], quantile))


def choose_geometry(cfg: TilingOptions, tile: int, sizes: Sequence[tuple[int, int]]) -> Geometry:
    """A training run's TilingOptions + tile size + its images' (height, width) -> the bundle's Geometry."""
    if cfg.mode == "squash":
        return Geometry.squash(tile)
    scale = float(cfg.scale) if cfg.scale is not None else choose_scale(tile, sizes, cfg.resolution, cfg.scale_quantile)
    return Geometry(tile=int(tile), scale=scale, overlap=float(cfg.overlap), max_upscale=float(cfg.max_upscale),
                    max_tiles=int(cfg.max_tiles), mode="tile", small_images=cfg.small_images)


def load_mask(path: Path | None, image_size: int | tuple[int, int]) -> np.ndarray:
    """Ground-truth mask -> bool [S, S] or [h, w] (nearest-neighbour resize); None -> all False."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if path is None:
        return np.zeros((h, w), dtype=bool)
    m = Image.open(path).convert("L").resize((w, h), Image.NEAREST)
    return np.asarray(m) > 127
