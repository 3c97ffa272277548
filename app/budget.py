"""The per-request budgets of /score, counted from the image headers and the model's geometry before any
pixel is decoded: memory (decoded pixels plus heatmap pixels) and work (tiles x tile^2 pixels of model input).

A request holds every decoded image (3 bytes a pixel) until it is scored, and every heatmap it asks
for is rendered at its size (overlay and map PNGs, base64 in the JSON). The per-image pixel limit
alone lets 32 images of 40 Mpx through (3.8 GB decoded); this budget caps their sum. Each image counts
its pixels once, and once more per heatmap (`overlay`, `map`; `both` is two) at the heatmap's size:
the input's (`heatmap_size=input`) or the model's (`model`: the image's tile plan, made once when the
Scorer read its header). benchmarks/memory.py measures the peak RSS of the largest request the default
budget accepts.

The work budget: a model's scale and tile count turn a small image into many tiles (a model with scale 4
and 64 px tiles makes 4,096 tiles of a 770 x 770 image), whose cost the pixel budget does not see. Each
image counts its tiles x tile^2 (what the graph runs on; the tiles cover the image at the model's scale,
so this also bounds the resized copy), and the request's sum is capped by max_request_tile_pixels.
benchmarks/request_limits.py measures what a refused request costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import APIError
from stpm.runtime.images import PreparedImage


@dataclass(frozen=True)
class PixelCount:
    decoded: int
    heatmaps: int

    @property
    def total(self) -> int:
        return self.decoded + self.heatmaps


def count_pixels(images: Sequence[PreparedImage], heatmaps: int, at_model_scale: bool) -> PixelCount:
    """images: read (header size and plan), not yet decoded; an unreadable header counts 0 (decoding then
    names the problem). heatmaps: outputs per image (0, 1 or 2), at each input's size, or at the model's
    scale (a tiled model keeps the aspect ratio: the plan's scaled size, not S x S; an image the geometry
    refuses counts 0 there, refused with its own message)."""
    known = [im for im in images if im.size is not None]
    decoded = sum(im.size[0] * im.size[1] for im in known)
    per_map = sum(im.scaled_pixels() for im in known) if at_model_scale else decoded
    return PixelCount(decoded, heatmaps * per_map)


def check(count: PixelCount, n_images: int, limit: int) -> None:
    """Raise 413 `too_many_pixels` naming what the request needs and what to change."""
    if count.total <= limit:
        return
    hint = ("send fewer or smaller images per request" if count.heatmaps == 0 else
            "send fewer or smaller images per request, or ask for heatmap=none or heatmap_size=model")
    raise APIError(
        413, "too_many_pixels",
        f"the request needs {count.total} pixels ({n_images} image(s): {count.decoded} decoded + "
        f"{count.heatmaps} of heatmaps); at most {limit} per request (setting max_request_pixels): {hint}",
    )


def check_tiles(images: Sequence[PreparedImage], limit: int) -> None:
    """Raise 413 `too_many_tiles` when the request's tiles x tile^2 (model input pixels) exceed `limit`."""
    planned = [im for im in images if im.plan is not None]
    total = sum(im.tile_pixels() for im in planned)
    if total <= limit:
        return
    tiles = sum(im.plan.n_tiles for im in planned)
    sizes = sorted({im.plan.tile for im in planned})
    raise APIError(
        413, "too_many_tiles",
        f"the request needs {tiles} tiles of {'/'.join(map(str, sizes))} px at this model's scale ({total} pixels "
        f"of model input); at most {limit} per request (setting max_request_tile_pixels): send fewer or smaller "
        "images per request",
    )
