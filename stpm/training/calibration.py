"""The threshold and the score normalisation (stpm.bundle.calibration.Calibration) from held-out good
images. numpy only.

`low` is the smallest good score (normalised 0) and the threshold normalised 0.5. Without labelled
anomalies the threshold sits above the good-score distribution (never below its median), so calibration
cannot collapse into flagging everything.
"""

from __future__ import annotations

import numpy as np

from stpm.bundle.calibration import Calibration
from stpm.options import CalibrationOptions


REL_SPREAD_FLOOR = 0.05


def calibrate(good_scores: np.ndarray, cfg: CalibrationOptions = CalibrationOptions()) -> Calibration:
    """Good image scores [N] -> Calibration. Needs at least one score; two or more for a spread."""
    s = np.asarray(good_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("calibration needs at least one held-out good image score")
    if not np.all(np.isfinite(s)):
        raise ValueError("calibration scores contain NaN or inf")
    lo, med, hi = float(s.min()), float(np.median(s)), float(s.max())
    # The spread sets the margin and the normalisation scale. Few (or identical) scores say little
    # about the tail, so it never drops below their std or 5 % of the score scale.
    spread = max(hi - med, float(s.std()), REL_SPREAD_FLOOR * abs(hi), 1e-12)
    if cfg.method == "quantile":
        if not 0.5 <= cfg.quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0.5, 1], got {cfg.quantile}")
        thr = float(np.quantile(s, cfg.quantile)) + cfg.margin * spread
    elif cfg.method == "max_margin":
        thr = hi + cfg.margin * spread
    else:
        raise ValueError(f"unknown calibration method {cfg.method!r}")
    thr = max(thr, med + 1e-12)
    low = min(lo, thr - spread)  # keep thr - low > 0 even with a single score
    stats = {"min": lo, "median": med, "max": hi, "mean": float(s.mean()), "std": float(s.std())}
    return Calibration(threshold=thr, low=low, method=cfg.method, quantile=cfg.quantile, margin=cfg.margin,
                       n_images=int(s.size), good_stats=stats)


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 given labelled anomalies (labels 1 = anomalous)."""
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise ValueError("F1-optimal threshold needs both good and anomalous images")
    p, r, t = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64))
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    i = int(np.argmax(f1[:-1]))
    return float(t[i]), float(f1[i])
