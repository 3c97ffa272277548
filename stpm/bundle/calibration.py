"""A bundle's calibration (manifest["calibration"]): the decision threshold and the [0, 1] normalisation
of scores and maps, in one object. numpy + pydantic only.

The normalisation is affine and clipped: `low` maps to 0, `threshold` to 0.5 (the decision boundary) and
`threshold + (threshold - low)` to 1; the same mapping applies to image scores and to anomaly maps, so a
heatmap's 0.5 level is the decision boundary. How the threshold was chosen is recorded beside it
(stpm.training.calibration makes it): the rule, its target, the false-positive rate on good parts to
expect (a tail estimate, with an interval), the recall on synthetic anomalies, the scores it came from
(so a threshold can be moved without retraining) and where they came from. Calibrations written before
these fields existed load with them empty.
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
    target_fpr: float | None = None  # the rule's target false-positive rate on good parts (target_fpr, synthetic_f1)
    estimator: str | None = None  # the tail estimate behind expected_fpr, e.g. "lognormal predictive"
    expected_fpr: float | None = None  # false-positive rate on good parts to expect at the threshold
    expected_fpr_interval: tuple[float, float] | None = None  # its central interval (interval_level)
    interval_level: float | None = None
    synthetic: dict[str, Any] | None = None  # recall on synthetic anomalies: n_images, recall, recall_by_kind
    notes: list[str] = []  # what the rule had to do differently (too few images, floored at the median)
    good_scores: list[float] = []  # the raw held-out good scores the threshold came from
    synthetic_scores: list[float] = []  # the raw scores of their synthetic anomalies
    synthetic_kinds: list[str] = []
    source: dict[str, Any] | None = None  # where the scores came from (training run, or stpm calibrate)

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

    def expectation(self) -> dict[str, Any]:
        """What the calibration promises, for people: the rule and its target, the threshold, the
        false-positive rate on good parts to expect (with its interval), the recall on synthetic
        anomalies, and how many images each came from. None where a calibration predates a field."""
        syn = self.synthetic or {}
        return {"rule": self.method, "target_fpr": self.target_fpr, "threshold": self.threshold,
                "expected_fpr": self.expected_fpr, "expected_fpr_interval": self.expected_fpr_interval,
                "interval_level": self.interval_level, "estimator": self.estimator, "n_good_images": self.n_images,
                "synthetic_recall": syn.get("recall"), "synthetic_recall_by_kind": syn.get("recall_by_kind"),
                "n_synthetic_images": syn.get("n_images"), "notes": list(self.notes),
                "source": (self.source or {}).get("kind")}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls.model_validate(d)


__all__ = ["MIN_SPAN", "Calibration"]
