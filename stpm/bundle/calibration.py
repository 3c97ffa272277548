"""A bundle's calibration (manifest["calibration"]): the decision threshold and the [0, 1] normalisation
of scores and maps, in one object. numpy + pydantic only.

The normalisation is affine and clipped: `low` maps to 0, `threshold` to 0.5 (the decision boundary) and
`threshold + (threshold - low)` to 1; the same mapping applies to image scores and to anomaly maps, so a
heatmap's 0.5 level is the decision boundary. How the threshold was chosen is recorded beside it
(stpm.training.calibration makes it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

MIN_SPAN = 1e-12  # threshold - low never below this (one held-out image, identical scores)


class Calibration(BaseModel):
    """Threshold and normalisation; fields beyond these (how they were chosen) are kept as recorded."""

    model_config = ConfigDict(frozen=True, extra="allow")

    threshold: float
    low: float  # maps to normalised 0
    method: str = "max_margin"
    quantile: float = 0.99
    margin: float = 0.1
    n_images: int = 0
    good_stats: dict[str, float] = {}  # min, median, max, mean, std of the held-out good scores

    @property
    def scale(self) -> float:
        """Normalised units per raw unit."""
        return 0.5 / max(self.threshold - self.low, MIN_SPAN)

    def normalise(self, x: Any, dtype: type = np.float64) -> np.ndarray:
        """Raw scores or maps -> [0, 1] (low -> 0, threshold -> 0.5), computed in `dtype` (the runtime uses
        float32, as the exported graph does)."""
        t, s = dtype(self.threshold), dtype(self.scale)
        return np.clip(dtype(0.5) + (np.asarray(x, dtype=dtype) - t) * s, 0.0, 1.0)

    def is_anomaly(self, raw: Any) -> Any:
        """The decision: raw score >= threshold (elementwise on arrays)."""
        return np.asarray(raw) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls.model_validate(d)


__all__ = ["MIN_SPAN", "Calibration"]
