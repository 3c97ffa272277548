import numpy as np
import pytest
from scipy import ndimage

from stpm.evaluation.metrics import aupro, at_threshold, auroc, f1_max


def brute_force_aupro(masks, maps, limit=0.3, n_thr=4000):
    """Reference: PRO and FPR at many thresholds, per-image components, trapezoid to `limit`."""
    comps = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        comps.append([(lab == i) for i in range(1, n + 1)])
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.sort(np.unique(maps))[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & c).sum() / c.sum() for i, cs in enumerate(comps) for c in cs]))
    fprs, pros = np.array(fprs), np.array(pros)
    x = np.r_[fprs[fprs <= limit], limit]
    y = np.r_[pros[fprs <= limit], np.interp(limit, fprs, pros)]
    return np.trapezoid(y, x) / limit


def test_aupro_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:10, 7:11] = True
    masks[1, 6:12, 0:3] = True
    maps = rng.random((3, 12, 12)) + 0.8 * masks
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


def test_aupro_extremes():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0)
    assert aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))) is None


def test_auroc_and_f1():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0], [0.1, 0.2]) is None
    f1, thr = f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]))
    assert f1 == 1.0 and thr == pytest.approx(0.3)
    r = at_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.3, 0.4]), 0.35)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 1) and r["precision"] == 0.5
