"""The per-request memory budget of /score: decoded pixels plus heatmap pixels, checked from the image
headers before anything is decoded.

A request holds every decoded image (3 bytes a pixel) until it is scored, and every heatmap it asks
for is rendered at its size (overlay and map PNGs, base64 in the JSON). The per-image pixel limit
alone lets 32 images of 40 Mpx through (3.8 GB decoded); this budget caps their sum. Each image counts
its pixels once, and once more per heatmap (`overlay`, `map`; `both` is two) at the heatmap's size:
the input's (`heatmap_size=input`) or the model's (`model`). benchmarks/memory.py measures the peak
RSS of the largest request the default budget accepts.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from app.errors import APIError


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header (nothing decoded); None when the header is unreadable
    (decoding then names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Exception:  # noqa: BLE001 - any unreadable header: left to the decoder's error
        return None
    return (int(w), int(h)) if w > 0 and h > 0 else None


@dataclass(frozen=True)
class PixelCount:
    decoded: int
    heatmaps: int

    @property
    def total(self) -> int:
        return self.decoded + self.heatmaps


def count_pixels(
    sizes: Sequence[tuple[int, int] | None], heatmaps: int, model_pixels: Callable[[int, int], int] | None
) -> PixelCount:
    """sizes: (w, h) per image (None: unknown, counts 0); heatmaps: outputs per image (0, 1 or 2);
    model_pixels: None for heatmaps at the input size, else (w, h) -> pixels of that image's heatmap at
    the model's scale (a tiled model keeps the aspect ratio: its scaled size, not S x S)."""
    known = [s for s in sizes if s is not None]
    decoded = sum(w * h for w, h in known)
    per_map = decoded if model_pixels is None else sum(model_pixels(w, h) for w, h in known)
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
