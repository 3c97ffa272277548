"""Anomaly-detection metrics on numpy arrays: image/pixel AUROC, AUPRO, F1-max, calibrated P/R."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC; None when only one class is present."""
    labels = np.asarray(labels).ravel().astype(np.uint8)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


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


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    masks: bool [N, H, W], maps: float [N, H, W]. Each connected ground-truth region (8-connectivity,
    per image) weighs the same however large it is. Exact: pixels are sorted once; for a threshold
    the PRO is the mean over regions of their covered fraction and the FPR counts normal pixels.
    """
    masks = np.asarray(masks, dtype=bool)
    if not masks.any():
        return None
    comp = np.zeros(masks.shape, dtype=np.int64)
    n_comp = 0
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        comp[i] = np.where(lab > 0, lab + n_comp, 0)
        n_comp += n
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1).astype(np.float64)
    weight = np.where(comp.ravel() > 0, 1.0 / sizes[comp.ravel()], 0.0)
    normal = (comp.ravel() == 0).astype(np.float64)
    order = np.argsort(-np.asarray(maps, dtype=np.float64).ravel(), kind="stable")
    s = np.asarray(maps, dtype=np.float64).ravel()[order]
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
