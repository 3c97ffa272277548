"""Image geometry: how an image of any size becomes model tiles, and tile maps become one map again.

The one place geometry lives; training, calibration, evaluation, export parity and the runtime all
call it. numpy + Pillow only (the torch-free runtime imports it).

A bundle's `Geometry` fixes a physical scale: every input is resized by `scale` (aspect ratio kept),
then covered by square S x S tiles (S = the model input, `tile`) that overlap by at least `overlap`
of a tile, evenly spaced, the first at 0 and the last flush with the far edge. The model maps each
tile; `stitch` averages the overlaps back into one map at the scaled size h x w; that map is resized
to the input size for display. A `Geometry` in mode "squash" is the legacy path (every image resized
to S x S, one tile): bundles without a `tiling` section in their manifest score exactly as before.

An image whose scaled side is shorter than a tile (`small_images="pad"`, bundle format 3) is not
enlarged: it is centred on a canvas of at least one tile per side, the rest filled by reflecting the
image (np.pad "reflect": the texture continues across the border, no artificial edge, so the
features of the image's own pixels near its border look like those of interior pixels). Every tile
knows which of its pixels are the image's own (`tile_boxes`, `valid_grid`): training takes no feature
position whose receptive centre lies in the padding, and `stitch` crops the map to the image's own
h x w, so the padding never scores. Bundles of formats 1-2 (`small_images="upscale"`) upscale such an
image by at most `max_upscale` and refuse smaller ones, exactly as before.

    g = Geometry(tile=256, scale=1.024)
    p = plan(630, 250, g)                    # 630 x 250 image -> 645 x 256, 4 tiles along the height
    maps = tile_fn(tiles(image, p).transpose(0, 3, 1, 2))   # [4, 256, 256]
    amap = stitch(maps, p)                   # [645, 256]
    q = plan(120, 200, g)                    # 123 x 205: centred on one 256 x 256 tile, reflect-padded
    stitch(tile_fn(...), q).shape            # (123, 205): the image's own pixels only
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from stpm.imaging.decode import resize_rgb

GeometryMode = Literal["tile", "squash"]
SmallImages = Literal["upscale", "pad"]
SMALL_IMAGES: tuple[str, ...] = ("pad", "upscale")
PAD_MODE = "reflect"  # np.pad mode of the canvas around a small image (see the module docstring)
DEFAULT_OVERLAP = 0.25  # minimum overlap of neighbouring tiles, fraction of a tile
DEFAULT_MAX_UPSCALE = 2.0
DEFAULT_MAX_TILES = 64
# the default scale maps the training images' short side at this quantile to the resolution (benchmarks/mixed_scale.py)
DEFAULT_SCALE_QUANTILE = 0.5

# tile_fn: uint8 tiles [N, 3, S, S] (RGB, NCHW) -> float32 anomaly maps [N, S, S]
TileFn = Callable[[np.ndarray], np.ndarray]


class TilingError(ValueError):
    """An image this model's geometry cannot cover (too small for a tile, or too many tiles).
    The message names the image size and the limit."""


@dataclass(frozen=True)
class Geometry:
    """A bundle's image geometry (manifest["tiling"]). mode "squash": resize to tile x tile (legacy)."""

    tile: int  # S, the model input (ModelOptions.image_size)
    scale: float = 1.0  # input pixels -> model pixels, the same for every image of this bundle
    overlap: float = DEFAULT_OVERLAP  # minimum overlap of neighbouring tiles, fraction of a tile
    max_upscale: float = DEFAULT_MAX_UPSCALE  # extra uniform upscaling allowed for small inputs
    max_tiles: int = DEFAULT_MAX_TILES
    mode: GeometryMode = "tile"
    # an image whose scaled side is shorter than a tile: "pad" (format 3) or "upscale" by at most
    # max_upscale, else refused (formats 1-2, whose manifests do not have this field)
    small_images: SmallImages = "upscale"

    def __post_init__(self):
        if self.mode not in ("tile", "squash"):
            raise ValueError(f"geometry mode must be 'tile' or 'squash', got {self.mode!r}")
        if self.small_images not in SMALL_IMAGES:
            raise ValueError(f"small_images must be 'pad' or 'upscale', got {self.small_images!r}")
        if int(self.tile) != self.tile or self.tile < 1:
            raise ValueError(f"tile size must be a positive integer, got {self.tile}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        if not self.max_upscale >= 1.0:
            raise ValueError(f"max_upscale must be >= 1, got {self.max_upscale}")
        if int(self.max_tiles) != self.max_tiles or self.max_tiles < 1:
            raise ValueError(f"max_tiles must be a positive integer, got {self.max_tiles}")

    @classmethod
    def squash(cls, tile: int) -> Geometry:
        return cls(tile=int(tile), mode="squash")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tiling field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie. Input height x width -> scaled h x w (the image's own pixels,
    the size of its stitched map), placed at (top, left) on a canvas of canvas_h x canvas_w (larger
    than h x w only where a side is shorter than a tile: padding); tile origins ys, xs on the canvas."""

    height: int
    width: int
    h: int
    w: int
    tile: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    top: int = 0
    left: int = 0

    @property
    def canvas_h(self) -> int:
        return max(self.h, self.tile)

    @property
    def canvas_w(self) -> int:
        return max(self.w, self.tile)

    @property
    def padded(self) -> bool:
        return (self.canvas_h, self.canvas_w) != (self.h, self.w)

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) of every tile, row-major: the order of `tiles` and of `stitch`'s input."""
        return [(y, x) for y in self.ys for x in self.xs]


def axis_origins(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Evenly spaced origins covering [0, length) with tiles of `tile`, neighbours overlapping by at
    least `overlap * tile`; the first at 0, the last at length - tile. Needs length >= tile."""
    if length < tile:
        raise ValueError(f"length {length} is shorter than a tile ({tile})")
    if length == tile:
        return (0,)
    stride = tile * (1.0 - overlap)
    n = math.ceil((length - tile) / stride - 1e-9) + 1
    return tuple(int(round(i * (length - tile) / (n - 1))) for i in range(n))


def _size(width: int, height: int) -> str:
    return f"{width} x {height}"


def plan(height: int, width: int, geometry: Geometry) -> TilePlan:
    """The tile plan of a height x width image. Raises TilingError naming the size and the limit."""
    height, width, s = int(height), int(width), int(geometry.tile)
    if height < 1 or width < 1:
        raise TilingError(f"image {_size(width, height)} has no pixels")
    if geometry.mode == "squash":
        return TilePlan(height, width, s, s, s, (0,), (0,))
    if geometry.small_images == "upscale":
        h, w = _upscaled_size(height, width, geometry)
    else:
        h, w = max(1, int(round(height * geometry.scale))), max(1, int(round(width * geometry.scale)))
    ch, cw = max(h, s), max(w, s)
    ys, xs = axis_origins(ch, s, geometry.overlap), axis_origins(cw, s, geometry.overlap)
    n = len(ys) * len(xs)
    if n > geometry.max_tiles:
        raise TilingError(
            f"image {_size(width, height)} (width x height) needs {n} tiles ({len(ys)} x {len(xs)} tiles of {s} px "
            f"at this model's scale, where it is {_size(w, h)}) but at most {geometry.max_tiles} are allowed "
            f"(max_tiles)")
    return TilePlan(height, width, h, w, s, ys, xs, (ch - h) // 2, (cw - w) // 2)


def _upscaled_size(height: int, width: int, geometry: Geometry) -> tuple[int, int]:
    """Formats 1-2: the scaled size, a short side below a tile upscaled to it by at most max_upscale."""
    s, scale = int(geometry.tile), geometry.scale
    short = min(height, width) * scale
    if round(short) < s:
        up = s / short
        if up > geometry.max_upscale + 1e-9:
            need = math.ceil(s / (scale * geometry.max_upscale))
            raise TilingError(
                f"image {_size(width, height)} (width x height) is smaller than one tile at this model's scale: "
                f"its short side of {min(height, width)} px becomes {short:.1f} px at scale {scale:.4g}, and filling "
                f"the {s} px tile would need {up:.2f}x upscaling (at most {geometry.max_upscale:g}x, max_upscale); "
                f"send images at least {need} px on the short side")
        scale *= up
    return max(s, int(round(height * scale))), max(s, int(round(width * scale)))


def tiles(image: np.ndarray, p: TilePlan) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [T, S, S, 3], resized to p.h x p.w as stpm.imageio.resize_rgb does
    (then reflect-padded to the canvas where the plan pads)."""
    if image.shape[:2] != (p.height, p.width):
        raise ValueError(f"image is {image.shape[1]} x {image.shape[0]} but the plan is for {p.width} x {p.height}")
    scaled = resize_rgb(image, (p.h, p.w))
    if p.padded:
        bottom, right = p.canvas_h - p.h - p.top, p.canvas_w - p.w - p.left
        scaled = np.pad(scaled, ((p.top, bottom), (p.left, right), (0, 0)), mode=PAD_MODE)
    s = p.tile
    return np.ascontiguousarray(np.stack([scaled[y:y + s, x:x + s] for y, x in p.origins]))


def tile_boxes(p: TilePlan) -> np.ndarray:
    """int64 [T, 4]: per tile (row-major, as `tiles`), the box of the image's own pixels in tile
    coordinates, (y0, y1, x0, x1) half-open; (0, S, 0, S) for a tile without padding."""
    s = p.tile
    return np.array([(max(p.top - y, 0), min(p.top + p.h - y, s), max(p.left - x, 0), min(p.left + p.w - x, s))
                     for y, x in p.origins], dtype=np.int64).reshape(-1, 4)


def valid_grid(boxes: np.ndarray, tile: int, grid: tuple[int, int]) -> np.ndarray:
    """bool [T, gh, gw]: which positions of a gh x gw feature grid over an S x S tile have their
    receptive centre (the tile pixel floor((i + 0.5) * S / g)) inside the tile's box of own pixels."""
    gh, gw = grid
    cy = np.floor((np.arange(gh) + 0.5) * tile / gh).astype(np.int64)
    cx = np.floor((np.arange(gw) + 0.5) * tile / gw).astype(np.int64)
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    rows = (cy[None, :] >= b[:, 0:1]) & (cy[None, :] < b[:, 1:2])
    cols = (cx[None, :] >= b[:, 2:3]) & (cx[None, :] < b[:, 3:4])
    return rows[:, :, None] & cols[:, None, :]


def stitch(tile_maps: np.ndarray, p: TilePlan) -> np.ndarray:
    """float [T, S, S] -> float32 [h, w]; where tiles overlap their values are averaged; the padding of a
    small image is cropped away (the map covers the image's own pixels only)."""
    tile_maps = np.asarray(tile_maps, dtype=np.float32)
    s = p.tile
    if tile_maps.shape != (p.n_tiles, s, s):
        raise ValueError(f"expected tile maps of shape {(p.n_tiles, s, s)}, got {tile_maps.shape}")
    if p.n_tiles == 1 and (p.canvas_h, p.canvas_w) == (s, s):
        return tile_maps[0, p.top:p.top + p.h, p.left:p.left + p.w].copy()
    acc = np.zeros((p.canvas_h, p.canvas_w), dtype=np.float32)
    count = np.zeros((p.canvas_h, p.canvas_w), dtype=np.float32)
    for m, (y, x) in zip(tile_maps, p.origins):
        acc[y:y + s, x:x + s] += m
        count[y:y + s, x:x + s] += 1.0
    if p.padded:
        acc, count = acc[p.top:p.top + p.h, p.left:p.left + p.w], count[p.top:p.top + p.h, p.left:p.left + p.w]
    return acc / count


@dataclass
class TiledImages:
    """The tiles of several images, concatenated: image i owns tiles[offsets[i]:offsets[i + 1]]."""

    tiles: np.ndarray  # uint8 [T, S, S, 3]
    plans: list[TilePlan]
    offsets: np.ndarray = field(default=None)  # int64 [N + 1]

    def __post_init__(self):
        if self.offsets is None:
            self.offsets = np.concatenate([[0], np.cumsum([p.n_tiles for p in self.plans])]).astype(np.int64)
        if int(self.offsets[-1]) != len(self.tiles):
            raise ValueError(f"{len(self.tiles)} tiles but the plans hold {int(self.offsets[-1])}")

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def padded(self) -> bool:
        """Whether any tile holds padding (an image smaller than a tile at this scale)."""
        return any(p.padded for p in self.plans)

    def boxes(self) -> np.ndarray:
        """int64 [T, 4]: every tile's box of own pixels (`tile_boxes`), in the order of `tiles`."""
        return np.concatenate([tile_boxes(p) for p in self.plans]) if self.plans else np.zeros((0, 4), np.int64)

    def subset(self, indices: Sequence[int]) -> TiledImages:
        parts = [self.tiles[self.offsets[i]:self.offsets[i + 1]] for i in indices]
        s = self.tiles.shape[1:] if len(self.tiles) else (0, 0, 3)
        t = np.concatenate(parts) if parts else np.zeros((0, *s), np.uint8)
        return TiledImages(t, [self.plans[i] for i in indices])


def tile_images(images: Sequence[np.ndarray], geometry: Geometry) -> TiledImages:
    """uint8 RGB images of any sizes -> their tiles and plans. Raises TilingError (the first misfit)."""
    plans = [plan(im.shape[0], im.shape[1], geometry) for im in images]
    parts = [tiles(im, p) for im, p in zip(images, plans)]
    s = geometry.tile
    return TiledImages(np.concatenate(parts) if parts else np.zeros((0, s, s, 3), np.uint8), plans)


def batch_tiles(tile_groups: Iterable[np.ndarray], max_batch: int = 16) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Tiles of several images, in order (uint8 [T_i, S, S, 3] each, drawn from the iterable only when
    needed) -> batches for a tile model: (uint8 [B, 3, S, S] NCHW with B <= max_batch, the index of the
    group each of its tiles came from). Tiles of consecutive images share a batch."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    parts: list[np.ndarray] = []
    owners: list[int] = []
    for i, group in enumerate(tile_groups):
        start = 0
        while start < len(group):
            take = min(max_batch - len(owners), len(group) - start)
            parts.append(group[start:start + take])
            owners += [i] * take
            start += take
            if len(owners) == max_batch:
                yield np.ascontiguousarray(np.concatenate(parts).transpose(0, 3, 1, 2)), owners
                parts, owners = [], []
    if owners:
        yield np.ascontiguousarray(np.concatenate(parts).transpose(0, 3, 1, 2)), owners


def run_tiles(tile_fn: TileFn, tile_batch: np.ndarray, max_batch: int = 16) -> np.ndarray:
    """uint8 [T, S, S, 3] -> float32 maps [T, S, S], `max_batch` tiles per call of tile_fn."""
    out = [np.asarray(tile_fn(x), dtype=np.float32) for x, _ in batch_tiles([tile_batch], max_batch)]
    if not out:
        s = tile_batch.shape[1]
        return np.zeros((0, s, s), np.float32)
    return np.concatenate(out)


def stitch_all(tile_maps: np.ndarray, tiled: TiledImages) -> list[np.ndarray]:
    """Maps of all tiles [T, S, S] -> one stitched map [h_i, w_i] per image."""
    o = tiled.offsets
    return [stitch(tile_maps[o[i]:o[i + 1]], p) for i, p in enumerate(tiled.plans)]


def predict_maps(tile_fn: TileFn, tiled: TiledImages, max_batch: int = 16) -> list[np.ndarray]:
    """The whole image path for any per-tile model: tiles (batched across images) -> maps -> stitched
    maps, one float32 [h_i, w_i] per image. `tile_fn` is the method: STPM in torch, an ONNX session,
    or any other scorer of S x S tiles."""
    return stitch_all(run_tiles(tile_fn, tiled.tiles, max_batch), tiled)


__all__ = [
    "DEFAULT_SCALE_QUANTILE",
    "Geometry",
    "PAD_MODE",
    "SMALL_IMAGES",
    "SmallImages",
    "TileFn",
    "TilePlan",
    "TiledImages",
    "TilingError",
    "axis_origins",
    "batch_tiles",
    "plan",
    "predict_maps",
    "run_tiles",
    "stitch",
    "stitch_all",
    "tile_boxes",
    "tile_images",
    "tiles",
    "valid_grid",
]
