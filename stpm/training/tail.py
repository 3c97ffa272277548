"""Tail estimates of the good-score distribution: which threshold lets a fraction `alpha` of good parts
through, and which false-positive rate a given threshold should be expected to give. numpy + scipy.

A `TailFit` is a location-scale family (normal or Gumbel) on the scores or on their logarithm, fitted by
the sample mean and standard deviation. The threshold is a *predictive* one, not a plug-in quantile:
`mean + k * std` with `k` chosen so that the false-positive rate the threshold realises, averaged over
the samples of n scores it could have been fitted on, is `alpha`. For a location-scale family that
average does not depend on the true location and scale (mean and std are equivariant), so `k` and the
spread of the realised rate (an interval) follow from simulating the standard family once, with a fixed
seed: deterministic. For the normal family this `k` is the classic prediction bound
t_{n-1, 1-alpha} * sqrt(1 + 1/n). A plug-in quantile (k = the family's own quantile) realises more than
alpha on average at small n; the sample maximum realises 1/(n + 1) on average, i.e. 2.4 % at n = 40.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize, stats

Family = Literal["normal", "gumbel"]
Transform = Literal["log", "identity"]
FAMILIES: dict[str, stats.rv_continuous] = {"normal": stats.norm, "gumbel": stats.gumbel_r}
MIN_SCORES = 3  # below this a standard deviation says nothing about a tail
SIMULATIONS = 20_000  # standard samples per (family, n): the Monte-Carlo error of alpha = 0.01 is ~1 %
SIM_SEED = 20250
REL_STD_FLOOR = 0.01  # the std (of logs, or relative to the mean) never below 1 %: identical scores
INTERVAL = 0.9  # the central interval of the realised false-positive rate that is reported


@lru_cache(maxsize=64)
def _pivots(family: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, max) of SIMULATIONS standard samples of size n of `family` (fixed seed)."""
    z = FAMILIES[family].rvs(size=(SIMULATIONS, n), random_state=np.random.default_rng(SIM_SEED + n))
    return z.mean(axis=1), z.std(axis=1, ddof=1), z.max(axis=1)


def _realised(family: str, n: int, c: float) -> np.ndarray:
    """The false-positive rate a threshold `mean + c * std` realises on each simulated sample (in the
    family's standard units, which is what the rate is in any units)."""
    m, s, _ = _pivots(family, n)
    return FAMILIES[family].sf(m + c * s)


@lru_cache(maxsize=64)
def _studentized_maxima(family: str, n: int) -> np.ndarray:
    """(max - mean) / std of each of the SIMULATIONS standard samples of size n (those of _pivots), sorted:
    the law of how far the largest of n scores lies above their mean, in their standard deviation, for any
    location and scale of `family`."""
    m, s, top = _pivots(family, n)
    return np.sort((top - m) / s)


@lru_cache(maxsize=256)
def k_factor(family: str, n: int, alpha: float) -> float:
    """c with mean(_realised(family, n, c)) == alpha: the predictive threshold's distance in stds."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    if n < MIN_SCORES:
        raise ValueError(f"a tail estimate needs at least {MIN_SCORES} scores, got {n}")
    return float(optimize.brentq(lambda c: _realised(family, n, c).mean() - alpha, -5.0, 1e4, xtol=1e-9))


@dataclass(frozen=True)
class TailFit:
    """A fitted tail: `family` on the scores (`transform` identity) or on their logarithms."""

    family: Family
    transform: Transform
    n: int
    mean: float  # of the transformed scores
    std: float  # ditto, floored (REL_STD_FLOOR)
    max_distance: float = 0.0  # (max - mean) / std of the transformed scores (their own std, not floored)

    @property
    def name(self) -> str:
        return ("log" if self.transform == "log" else "") + self.family

    def _to(self, x: float) -> float:
        return float(np.log(x)) if self.transform == "log" else float(x)

    def _from(self, y: float) -> float:
        return float(np.exp(y)) if self.transform == "log" else float(y)

    def threshold(self, alpha: float) -> float:
        """The predictive threshold: an expected false-positive rate of `alpha` on good parts."""
        return self._from(self.mean + k_factor(self.family, self.n, alpha) * self.std)

    def _c(self, threshold: float) -> float:
        if self.transform == "log" and threshold <= 0:
            return -np.inf
        return (self._to(threshold) - self.mean) / self.std

    def expected_fpr(self, threshold: float) -> float:
        """The false-positive rate to expect at `threshold` (the average over the fits it could be)."""
        return float(_realised(self.family, self.n, self._c(threshold)).mean())

    def max_p_value(self) -> float:
        """How probable a largest score at least this far above the mean (in stds) is among n scores of the
        fitted family: small when one score is far beyond what the family puts in a sample of n, i.e. the
        tail is heavier. Exact for the family whatever its location and scale (the statistic is
        studentized; simulated like the k factor); it needs no more scores than the fit."""
        t = _studentized_maxima(self.family, self.n)
        return float((t.size - np.searchsorted(t, self.max_distance, side="left") + 1) / (t.size + 1))

    def fpr_interval(self, threshold: float, level: float = INTERVAL) -> tuple[float, float]:
        """The central `level` interval of the rate a calibration like this one realises at `threshold`'s
        distance from the mean (its spread over the n-score samples it could have been fitted on)."""
        r = _realised(self.family, self.n, self._c(threshold))
        lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)


def fit_tail(scores: np.ndarray, family: Family = "normal", transform: Transform = "log") -> TailFit:
    """Good scores [n >= MIN_SCORES] -> TailFit. Scores <= 0 cannot take a log: the identity is used."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size < MIN_SCORES:
        raise ValueError(f"a tail estimate needs at least {MIN_SCORES} scores, got {s.size}")
    if family not in FAMILIES:
        raise ValueError(f"unknown tail family {family!r}; choose from {', '.join(FAMILIES)}")
    if transform == "log" and np.any(s <= 0):
        transform = "identity"
    y = np.log(s) if transform == "log" else s
    floor = REL_STD_FLOOR * (1.0 if transform == "log" else max(abs(float(y.mean())), 1e-12))
    sd = float(y.std(ddof=1))
    distance = (float(y.max()) - float(y.mean())) / sd if sd > 0 else 0.0
    return TailFit(family, transform, int(s.size), float(y.mean()), max(sd, floor), distance)


__all__ = ["FAMILIES", "INTERVAL", "MIN_SCORES", "TailFit", "fit_tail", "k_factor"]
