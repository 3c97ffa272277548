"""Anomaly-detection metrics on numpy arrays: image/pixel AUROC, AUPRO, F1-max, calibrated P/R.

Pixel-level inputs may be one array [N, H, W] or a list of maps of different sizes (images that
keep their aspect ratio): every pixel counts once either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve


def flat(x: np.ndarray | Sequence[np.ndarray], dtype=None) -> np.ndarray:
    """An array, or a list of arrays of any shapes -> one 1-D array of all their values."""
    if isinstance(x, np.ndarray):
        return x.ravel() if dtype is None else x.astype(dtype, copy=False).ravel()
    parts = [np.asarray(a, dtype=dtype).ravel() for a in x]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype or np.float64)


def auroc(labels: np.ndarray | Sequence[np.ndarray], scores: np.ndarray | Sequence[np.ndarray]) -> float | None:
    """ROC AUC; None when only one class is present. Pixel level: masks and maps, arrays or lists."""
    labels = flat(labels).astype(np.uint8)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, flat(scores, np.float64)))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, that threshold)."""
    p, r, t = precision_recall_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64))
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    i = int(np.argmax(f1[:-1]))
    return float(f1[i]), float(t[i])


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall, F1, false-positive rate of the decision `score >= threshold` (as served)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / (fp + tn) if fp + tn else 0.0, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def aupro(
    masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray | Sequence[np.ndarray], fpr_limit: float = 0.3
) -> float | None:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    masks: bool [N, H, W] or a list of bool [H_i, W_i]; maps: float, the same shapes. Each connected
    ground-truth region (8-connectivity, per image) weighs the same however large it is. Exact: pixels
    are sorted once; for a threshold the PRO is the mean over regions of their covered fraction and
    the FPR counts normal pixels.
    """
    masks = [np.asarray(m, dtype=bool) for m in masks]
    maps = [np.asarray(m) for m in maps]
    if len(masks) != len(maps) or any(a.shape != b.shape for a, b in zip(masks, maps)):
        raise ValueError("masks and maps must pair up with identical shapes")
    if not any(m.any() for m in masks):
        return None
    parts = []
    n_comp = 0
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        parts.append(np.where(lab > 0, lab + n_comp, 0).ravel())
        n_comp += n
    comp = np.concatenate(parts)
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1).astype(np.float64)
    weight = np.where(comp.ravel() > 0, 1.0 / sizes[comp.ravel()], 0.0)
    normal = (comp.ravel() == 0).astype(np.float64)
    values = flat(maps, np.float64)
    order = np.argsort(-values, kind="stable")
    s = values[order]
    fpr = np.cumsum(normal[order]) / max(normal.sum(), 1.0)
    pro = np.cumsum(weight[order]) / n_comp
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # one point per distinct threshold
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    if fpr[-1] < fpr_limit:  # cannot happen with the lowest threshold, kept for safety
        fpr_limit = float(fpr[-1])
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    pro_at = np.interp(fpr_limit, fpr[: k + 1], pro[: k + 1]) if k < fpr.size else pro[-1]
    x, y = np.r_[fpr[:k], fpr_limit], np.r_[pro[:k], pro_at]
    return float(np.trapezoid(y, x) / fpr_limit)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64))
    return fpr, tpr
