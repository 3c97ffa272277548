"""The per-request memory budget of /score: decoded pixels plus heatmap pixels, counted from the image
headers before anything is decoded.

A request holds every decoded image (3 bytes a pixel) until it is scored, and every heatmap it asks
for is rendered at its size (overlay and map PNGs, base64 in the JSON). The per-image pixel limit
alone lets 32 images of 40 Mpx through (3.8 GB decoded); this budget caps their sum. Each image counts
its pixels once, and once more per heatmap (`overlay`, `map`; `both` is two) at the heatmap's size:
the input's (`heatmap_size=input`) or the model's (`model`: the image's tile plan, made once when the
Scorer read its header). benchmarks/memory.py measures the peak RSS of the largest request the default
budget accepts.
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
