"""Image scores from anomaly maps: the one function evaluation, calibration and the runtime share.
numpy (and stpm.imaging.render's map resize, for a position prior).

An image score may discount a position prior (`PositionPrior`): what good images score at each position of
the image, in coordinates relative to the image's size, subtracted from the map before the maximum or the
top-k mean. On parts photographed in a fixed framing some positions score high on every good part (an
edge, a bright rim); the prior keeps them from deciding. Training chooses it (stpm.training.position_prior).
The map itself stays the model's own (what localises a defect); it is shown on the threshold's scale less
the prior's mean (`ImageScore.map_offset`), so a good part's heatmap keeps its level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from stpm.imaging.render import resize_map

ScoreMethod = Literal["max", "topk_mean"]
SCORE_METHODS: tuple[str, ...] = ("max", "topk_mean")


PRIOR_SHAPES_CACHED = 64  # resized priors kept per PositionPrior (one per map size seen)


@dataclass(frozen=True, eq=False)
class PositionPrior:
    """What good images score at each position, on a grid over the image in relative coordinates: float32
    [gh, gw], in the map's raw units. `at(shape)` is the grid resized to a map's size (bilinear,
    stpm.imaging.render.resize_map; cached per size)."""

    values: np.ndarray
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        v = np.asarray(self.values, dtype=np.float32)
        if v.ndim != 2 or min(v.shape) < 1:
            raise ValueError(f"a position prior is a 2-D grid, got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("a position prior holds NaN or inf")
        v.setflags(write=False)
        object.__setattr__(self, "values", v)

    @property
    def mean(self) -> float:
        return float(self.values.mean(dtype=np.float64))

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])

    def at(self, shape: tuple[int, int]) -> np.ndarray:
        key = (int(shape[0]), int(shape[1]))
        out = self._cache.get(key)
        if out is None:
            out = resize_map(self.values, key)
            out.setflags(write=False)
            if len(self._cache) >= PRIOR_SHAPES_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out
        return out

    def to_record(self) -> dict[str, Any]:
        """manifest["position_prior"]'s grid and values: row-major, each the shortest decimal that reads back
        as the same float32 (so a bundle's prior is the training run's, bit for bit)."""
        return {"grid": list(self.grid),
                "values": [float(np.format_float_positional(x, unique=True)) for x in self.values.ravel()]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PositionPrior:
        gh, gw = (int(x) for x in record["grid"])
        if gh < 1 or gw < 1:
            raise ValueError(f"a position prior's grid must be at least 1 x 1, got {gh} x {gw}")
        values = np.asarray(record["values"], dtype=np.float32)
        if values.size != gh * gw:
            raise ValueError(f"a {gh} x {gw} position prior needs {gh * gw} values, got {values.size}")
        return cls(values.reshape(gh, gw))


@dataclass(frozen=True)
class ImageScore:
    """How an image score comes from its (stitched) map: "max", or "topk_mean": the mean of the
    `topk` highest values (topk < 1: that fraction of the map's pixels; topk >= 1: that many pixels),
    of the map less its `prior` where there is one."""

    method: ScoreMethod = "max"
    topk: float = 0.01
    prior: PositionPrior | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.method not in SCORE_METHODS:
            raise ValueError(f"image score must be one of {', '.join(SCORE_METHODS)}, got {self.method!r}")
        if not (math.isfinite(self.topk) and self.topk > 0):
            raise ValueError(f"topk must be > 0, got {self.topk}")
        if self.topk >= 1 and int(self.topk) != self.topk:
            raise ValueError(f"topk >= 1 counts pixels and must be a whole number, got {self.topk}")

    @property
    def map_offset(self) -> float:
        """What a map is lowered by before it is shown on the threshold's scale: the prior's mean (0 without),
        so a map keeps its level while the threshold is in discounted units."""
        return 0.0 if self.prior is None else self.prior.mean


def image_score(amap: np.ndarray, spec: ImageScore = ImageScore()) -> float:
    """An image's score from its map (any shape; [h, w] where the spec has a position prior). The one
    function evaluation, calibration and the runtime use, so they agree."""
    a = np.asarray(amap, dtype=np.float32)
    if a.size == 0:
        raise ValueError("empty map")
    if spec.prior is not None:  # less what good images score at each position
        a = a.reshape(a.shape[-2:]) - spec.prior.at(a.shape[-2:])
    v = a.ravel()
    if spec.method == "max":
        return float(v.max())
    k = int(spec.topk) if spec.topk >= 1 else int(math.ceil(spec.topk * v.size))
    k = min(max(k, 1), v.size)
    return float(np.partition(v, v.size - k)[v.size - k:].mean(dtype=np.float64))


def image_scores(maps: Sequence[np.ndarray], spec: ImageScore = ImageScore()) -> np.ndarray:
    """float64 [N]: image_score of each map."""
    return np.array([image_score(m, spec) for m in maps], dtype=np.float64)


__all__ = ["SCORE_METHODS", "ImageScore", "PositionPrior", "ScoreMethod", "image_score", "image_scores"]
