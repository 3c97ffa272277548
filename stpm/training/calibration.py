"""The threshold and the score normalisation (stpm.bundle.calibration.Calibration) from held-out good
images, and what to expect of it: the false-positive rate on good parts (a tail estimate,
stpm.training.tail) and the recall on synthetic anomalies of those images. numpy + scipy.

Rules (CalibrationOptions.method):
  - `target_fpr` (the default): the threshold whose expected false-positive rate on good parts is
    `target_fpr`, from a fitted tail of the good scores (TAIL_FAMILY on TAIL_TRANSFORM, predictive;
    chosen by benchmarks/calibration_estimators.py), not from their sample maximum; where there are
    scores enough for a conformal bound (n >= (1 - target) / target) and significantly more of them reach
    the fitted threshold than the family allows (its tail is heavier), the conformal bound, whose rate is
    exact whatever the distribution;
  - `synthetic_f1`: the threshold maximising F1 on the held-out good images against their synthetic
    anomalies (false positives counted by the fitted tail), among those whose expected false-positive
    rate is at most `target_fpr`;
  - `max_margin`: the highest good score plus `margin` x their spread (the former default);
  - `quantile`: the `quantile` of the good scores plus `margin` x their spread.
With fewer than MIN_TAIL_IMAGES good scores the tail rules fall back to `max_margin` and say so. Every
rule's threshold is floored at the median good score (calibration without anomalies never flags half of
the good parts), and every calibration records the expected false-positive rate of its threshold under
the tail fit, with an interval. `low` is normalised 0, the threshold 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from stpm.bundle.calibration import Calibration
from stpm.options import CalibrationOptions
from stpm.training.tail import INTERVAL, TailFit, fit_tail

REL_SPREAD_FLOOR = 0.05
MIN_TAIL_IMAGES = 5  # fewer held-out good scores: no tail estimate (max_margin, recorded)
TAIL_FAMILY = "gumbel"  # chosen by measurement: benchmarks/calibration_estimators.py, docs/BENCHMARKS.md
TAIL_TRANSFORM = "identity"
TAIL_RULES = ("target_fpr", "synthetic_f1")
HEAVY_TAIL_P = 0.05  # this few good scores reaching the fitted threshold by chance: the tail is heavier


def _spread(s: np.ndarray) -> float:
    """The good scores' spread: sets max_margin's margin and the normalisation scale. Few (or identical)
    scores say little about the tail, so it never drops below their std or 5 % of the score scale."""
    hi, med = float(s.max()), float(np.median(s))
    return max(hi - med, float(s.std()), REL_SPREAD_FLOOR * abs(hi), 1e-12)


def _checked(scores: Any, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what} contain NaN or inf")
    return s


def _synthetic_f1_threshold(fit: TailFit, floor: float, synthetic: np.ndarray, n_good: int) -> float:
    """Max F1 of n_good good images (expected false positives from the tail) against the synthetic ones,
    over thresholds >= floor (the target-FPR threshold): the floor, or a synthetic score above it."""
    cands = np.r_[floor, np.sort(synthetic[synthetic > floor])]
    tp = np.array([np.sum(synthetic >= t) for t in cands], dtype=np.float64)
    fp = np.array([n_good * fit.expected_fpr(float(t)) for t in cands])
    f1 = 2 * tp / np.maximum(2 * tp + fp + (synthetic.size - tp), 1e-12)
    return float(cands[int(np.argmax(f1))])  # the first (lowest) among equals


def conformal_rank(n: int, alpha: float) -> int | None:
    """k = ceil((n + 1)(1 - alpha)): a good part scores above the k-th smallest of n good scores with
    probability (n - k + 1) / (n + 1) <= alpha, whatever their distribution (split-conformal); None when
    k > n (too few scores for this alpha: n < (1 - alpha) / alpha, e.g. 99 at 1 %)."""
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    return k if k <= n else None


Guard = tuple[int, str]  # a distribution-free bound that set the threshold: (its rank k of n, which test fired)
LARGEST, COUNT = "largest score", "count"


def _target_threshold(s: np.ndarray, fit: TailFit, alpha: float) -> tuple[float, Guard | None]:
    """The tail fit's threshold for `alpha`; where the scores show the tail is heavier than the fitted family,
    the higher of it and a distribution-free bound -> (threshold, (the bound's conformal rank k, the test
    that showed the heavier tail: LARGEST or COUNT) when the bound set it, else None). With scores enough
    for a conformal bound at alpha (n >= (1 - alpha) / alpha), heavier means more of them reach the fitted
    threshold than the family allows (binomial p < HEAVY_TAIL_P) and the bound is the k-th smallest. Where
    that bound would be the largest score (k = n) or there is none, a count cannot show a heavier tail; the
    sign left is a largest score further out than the family puts the largest of n (TailFit.max_p_value <
    HEAVY_TAIL_P), and the bound is that largest score, whose rate is 1 / (n + 1): within alpha where k = n,
    above it (and said to be) where there is no bound."""
    thr, k = fit.threshold(alpha), conformal_rank(s.size, alpha)
    if k is None or k == s.size:  # no bound at alpha, or the bound is the largest score: a count cannot tell
        if fit.max_p_value() < HEAVY_TAIL_P and float(s.max()) > thr:
            return float(s.max()), (s.size, LARGEST)  # the n-th of n: a rate of 1 / (n + 1), whatever the law
        if k is None:
            return thr, None
    if stats.binom.sf(int(np.sum(s >= thr)) - 1, s.size, alpha) >= HEAVY_TAIL_P:
        return thr, None
    bound = float(np.sort(s)[k - 1])
    return (bound, (k, COUNT)) if bound > thr else (thr, None)


def _rule_threshold(s: np.ndarray, cfg: CalibrationOptions, fit: TailFit | None,
                    synthetic: np.ndarray) -> tuple[float, Guard | None]:
    """The rule's threshold, and the distribution-free bound when that set it (tail rules only)."""
    if cfg.method == "quantile":
        return float(np.quantile(s, cfg.quantile)) + cfg.margin * _spread(s), None
    if cfg.method == "max_margin" or fit is None:
        return float(s.max()) + cfg.margin * _spread(s), None
    thr, guard = _target_threshold(s, fit, cfg.target_fpr)
    if cfg.method == "synthetic_f1" and synthetic.size:
        best = _synthetic_f1_threshold(fit, thr, synthetic, s.size)
        thr, guard = best, (guard if best == thr else None)
    return thr, guard


def _expected(s: np.ndarray, fit: TailFit | None, thr: float,
              k: int | None) -> tuple[str | None, float | None, tuple[float, float] | None]:
    """(estimator, expected false-positive rate at thr, its INTERVAL interval). At a conformal threshold (the
    k-th of n good scores) the rate is exact and distribution-free: Beta(n - k + 1, k), mean (n-k+1)/(n+1)."""
    if fit is None:
        return None, None, None
    if k is None:
        return f"{fit.name} predictive", fit.expected_fpr(thr), fit.fpr_interval(thr)
    a, b = s.size - k + 1, k
    lo, hi = stats.beta.ppf([(1 - INTERVAL) / 2, (1 + INTERVAL) / 2], a, b)
    return f"conformal ({k}-th of {s.size} good scores)", a / (s.size + 1), (float(lo), float(hi))


def _notes(s: np.ndarray, cfg: CalibrationOptions, fit: TailFit | None, thr: float, floored: bool,
           synthetic: np.ndarray, guard: Guard | None) -> list[str]:
    notes = []
    if guard is not None and fit is not None and guard[1] == LARGEST:
        far = (f"the highest good score ({float(s.max()):.4g}) lies further out than the fitted {fit.name} puts the "
               f"largest of {s.size} scores (p = {fit.max_p_value():.2g}): the tail is heavier")
        if conformal_rank(s.size, cfg.target_fpr) is None:
            notes.append(f"{far}, and {s.size} scores are too few for a distribution-free bound at "
                         f"{100 * cfg.target_fpr:g} % (that needs {math.ceil((1 - cfg.target_fpr) / cfg.target_fpr - 1e-9)}); "
                         f"the threshold is that highest score, which lets about 1 in {s.size + 1} good parts through")
        else:
            notes.append(f"{far}; the threshold is the conformal bound, here that highest score (about 1 in "
                         f"{s.size + 1} good parts, within the target)")
    elif guard is not None and fit is not None:
        k = guard[0]
        above = int(np.sum(s >= fit.threshold(cfg.target_fpr)))
        notes.append(f"the good scores' tail is heavier than the fitted {fit.name}: {above} of {s.size} reach its "
                     f"threshold where {cfg.target_fpr * s.size:.1f} were expected; the threshold is the conformal "
                     f"bound instead (the {k}-th of the {s.size} good scores)")
    if cfg.method in TAIL_RULES and fit is None:
        notes.append(f"{s.size} good calibration score(s), fewer than the {MIN_TAIL_IMAGES} a tail estimate needs: "
                     f"max_margin used instead of {cfg.method}")
    if cfg.method == "synthetic_f1" and not synthetic.size:
        notes.append("no synthetic anomaly scores: the target_fpr threshold is used")
    if floored:
        notes.append("the rule's threshold lay below the median good score and was raised to it")
    if fit is not None and thr < float(s.max()):
        n_above = int(np.sum(s >= thr))
        notes.append(f"{n_above} of the {s.size} good calibration images (held out or out of fold) score at or "
                     "above the threshold")
    return notes


def synthetic_recall(threshold: float, scores: np.ndarray, kinds: Sequence[str]) -> dict[str, Any] | None:
    """Recall of the threshold on synthetic anomalies, overall and per kind (None without any)."""
    if not scores.size:
        return None
    hit = scores >= threshold
    by_kind = {k: round(float(np.mean(hit[np.asarray(kinds) == k])), 4) for k in dict.fromkeys(kinds)}
    return {"n_images": int(scores.size), "recall": round(float(hit.mean()), 4), "recall_by_kind": by_kind}


def calibrate(good_scores: Any, cfg: CalibrationOptions = CalibrationOptions(), synthetic_scores: Any = (),
              synthetic_kinds: Sequence[str] = (), source: dict[str, Any] | None = None) -> Calibration:
    """Good image scores [N >= 1] (and their synthetic anomalies' scores, with each one's kind) ->
    Calibration, recording the scores so that the threshold can be moved later (stpm calibrate)."""
    s = _checked(good_scores, "calibration scores")
    syn = _checked(synthetic_scores, "synthetic anomaly scores")
    if s.size == 0:
        raise ValueError("calibration needs at least one held-out good image score")
    if cfg.method == "quantile" and not 0.5 <= cfg.quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0.5, 1], got {cfg.quantile}")
    if len(synthetic_kinds) not in (0, syn.size):
        raise ValueError(f"{len(synthetic_kinds)} synthetic kinds for {syn.size} synthetic scores")
    fit = fit_tail(s, TAIL_FAMILY, TAIL_TRANSFORM) if s.size >= MIN_TAIL_IMAGES else None
    med = float(np.median(s))
    rule_thr, guard = _rule_threshold(s, cfg, fit, syn)
    thr = max(rule_thr, med + 1e-12)
    guard = guard if thr == rule_thr else None
    estimator, expected_fpr, interval = _expected(s, fit, thr, None if guard is None else guard[0])
    low = min(float(s.min()), thr - _spread(s))  # keep thr - low > 0 even with a single score
    kinds = list(synthetic_kinds) or ["synthetic"] * syn.size
    stats = {"min": float(s.min()), "median": med, "max": float(s.max()), "mean": float(s.mean()),
             "std": float(s.std())}
    return Calibration(
        threshold=thr, low=low, method=cfg.method, quantile=cfg.quantile, margin=cfg.margin, n_images=int(s.size),
        good_stats=stats, target_fpr=cfg.target_fpr if cfg.method in TAIL_RULES else None,
        estimator=estimator, expected_fpr=expected_fpr, expected_fpr_interval=interval,
        interval_level=INTERVAL if fit is not None else None,
        synthetic=synthetic_recall(thr, syn, kinds), notes=_notes(s, cfg, fit, thr, rule_thr < thr, syn, guard),
        good_scores=s.tolist(), synthetic_scores=syn.tolist(), synthetic_kinds=kinds if syn.size else [],
        source=source)


def recalibrate(calibration: Calibration, cfg: CalibrationOptions, source: dict[str, Any]) -> Calibration:
    """A new calibration from the scores a calibration recorded (stpm calibrate MODEL --target-fpr ...)."""
    if not calibration.good_scores:
        raise ValueError("this bundle's calibration records no held-out scores (it predates them): "
                         "calibrate on a folder of good images instead (stpm calibrate MODEL DIR)")
    return calibrate(calibration.good_scores, cfg, calibration.synthetic_scores, calibration.synthetic_kinds, source)


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


__all__ = ["MIN_TAIL_IMAGES", "TAIL_FAMILY", "TAIL_TRANSFORM", "calibrate", "conformal_rank", "f1_optimal_threshold", "recalibrate",
           "synthetic_recall"]
