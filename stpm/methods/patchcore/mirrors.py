"""Mirror averaging for PatchCore (ModelOptions.mirrors): the memory bank also holds the patch features of each
good tile's mirror images, and a tile's map is the mean of its own map and its mirrors' maps, each mirrored back
onto the tile first. The teacher's features are not mirror-symmetric (strided convolutions sample one phase), so
the views are an ensemble: the mean map is smoother on good surfaces and sharper at defects. Averaged over a
whole mirror group the map is exactly mirror-equivariant: a mirrored tile gets the mirrored map.

Measured (docs/BENCHMARKS.md, "Mirror averaging"): pixel AUROC up on every shared set, at 2x (h, v) or 4x (hv)
the features and the search per tile. Not for parts whose mirror image is itself a defect (a part mounted the
wrong way round looks normal to a bank that holds mirrored good parts)."""

from __future__ import annotations

import numpy as np
import torch

from stpm.methods.patchcore.spec import MIRRORS


def mirror_dims(name: str) -> tuple[tuple[int, ...], ...]:
    """The flips of a mirrors option; an unknown name is refused with the choices."""
    if name not in MIRRORS:
        raise ValueError(f"mirrors={name!r}: choose one of {', '.join(MIRRORS)}")
    return MIRRORS[name]


def views(x: torch.Tensor, dims: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """float [N, C, S, S] -> [(1 + len(dims)) * N, C, S, S]: the tiles, then each mirror of them."""
    return torch.cat([x] + [x.flip(d) for d in dims]) if dims else x


def mean_of_views(maps: torch.Tensor, dims: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """[(1 + len(dims)) * N, H, W] maps of `views` -> [N, H, W]: each view's map mirrored back, then the mean."""
    if not dims:
        return maps
    per_view = maps.reshape(1 + len(dims), -1, *maps.shape[1:])
    total = per_view[0]
    for i, d in enumerate(dims, start=1):
        total = total + per_view[i].flip(d)
    return total / (1 + len(dims))


def mirror_tiles(tiles: np.ndarray, d: tuple[int, ...]) -> np.ndarray:
    """uint8 [T, S, S, 3] tiles mirrored as a [T, C, S, S] tensor's dims `d` would be (a view, no copy)."""
    axes = {-2: 1, -1: 2}  # the tensor's rows / columns are the array's axes 1 / 2
    out = tiles
    for a in d:
        out = np.flip(out, axis=axes[a])
    return out


def mirror_boxes(boxes: np.ndarray, tile: int, d: tuple[int, ...]) -> np.ndarray:
    """int [T, 4] boxes of own pixels (y0, y1, x0, x1, half-open) of the tiles mirrored by `d`."""
    b = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    if -2 in d:
        b[:, 0], b[:, 1] = tile - b[:, 1], tile - b[:, 0]
    if -1 in d:
        b[:, 2], b[:, 3] = tile - b[:, 3], tile - b[:, 2]
    return b


__all__ = ["MIRRORS", "mean_of_views", "mirror_boxes", "mirror_dims", "mirror_tiles", "views"]
