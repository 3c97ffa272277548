"""Image scores from anomaly maps: the one function evaluation, calibration and the runtime share.
numpy only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ScoreMethod = Literal["max", "topk_mean"]
SCORE_METHODS: tuple[str, ...] = ("max", "topk_mean")


@dataclass(frozen=True)
class ImageScore:
    """How an image score comes from its (stitched) map: "max", or "topk_mean": the mean of the
    `topk` highest values (topk < 1: that fraction of the map's pixels; topk >= 1: that many pixels)."""

    method: ScoreMethod = "max"
    topk: float = 0.01

    def __post_init__(self):
        if self.method not in SCORE_METHODS:
            raise ValueError(f"image score must be one of {', '.join(SCORE_METHODS)}, got {self.method!r}")
        if not (math.isfinite(self.topk) and self.topk > 0):
            raise ValueError(f"topk must be > 0, got {self.topk}")
        if self.topk >= 1 and int(self.topk) != self.topk:
            raise ValueError(f"topk >= 1 counts pixels and must be a whole number, got {self.topk}")


def image_score(amap: np.ndarray, spec: ImageScore = ImageScore()) -> float:
    """An image's score from its map (any shape). The one function evaluation, calibration and the
    runtime use, so they agree."""
    v = np.asarray(amap, dtype=np.float32).ravel()
    if v.size == 0:
        raise ValueError("empty map")
    if spec.method == "max":
        return float(v.max())
    k = int(spec.topk) if spec.topk >= 1 else int(math.ceil(spec.topk * v.size))
    k = min(max(k, 1), v.size)
    return float(np.partition(v, v.size - k)[v.size - k:].mean(dtype=np.float64))


def image_scores(maps: Sequence[np.ndarray], spec: ImageScore = ImageScore()) -> np.ndarray:
    """float64 [N]: image_score of each map."""
    return np.array([image_score(m, spec) for m in maps], dtype=np.float64)


__all__ = ["SCORE_METHODS", "ImageScore", "ScoreMethod", "image_score", "image_scores"]
