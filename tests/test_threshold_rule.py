"""The default threshold rule (target_fpr: a predictive tail estimate of the held-out good scores) on score
distributions whose true quantiles are known: the false-positive rate it realises is close to the target
on average, it never falls below the median good score, it stays sane with five scores, it is
deterministic, and what it records round-trips through the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from stpm.bundle.calibration import Calibration
from stpm.options import CalibrationOptions
from stpm.training.calibration import MIN_TAIL_IMAGES, TAIL_FAMILY, TAIL_TRANSFORM, calibrate, recalibrate
from stpm.training.tail import fit_tail, k_factor

TARGET = 0.01
# the family the rule assumes, as a distribution of positive scores
ASSUMED = {("normal", "log"): stats.lognorm(0.3, scale=20.0), ("normal", "identity"): stats.norm(20, 2),
           ("gumbel", "identity"): stats.gumbel_r(20, 2)}
ASSUMED_DIST = ASSUMED[(TAIL_FAMILY, TAIL_TRANSFORM)]


def _realised(dist, n: int, reps: int, seed: int = 0, target: float = TARGET):
    """(true FPR at each calibration's threshold, thresholds, sample medians) over `reps` samples of n."""
    samples = dist.rvs(size=(reps, n), random_state=np.random.default_rng(seed))
    cfg = CalibrationOptions(target_fpr=target)
    thr = np.array([fit_tail(s, TAIL_FAMILY, TAIL_TRANSFORM).threshold(target) if n >= MIN_TAIL_IMAGES
                    else calibrate(s, cfg).threshold for s in samples])
    floor = np.median(samples, axis=1)
    return dist.sf(np.maximum(thr, floor)), thr, floor


@pytest.mark.parametrize("n", [5, 10, 40])
def test_scores_of_the_assumed_family_realise_the_target_on_average(n):
    """The family the rule assumes (TAIL_FAMILY on TAIL_TRANSFORM): the average realised FPR is the target."""
    fpr, _, _ = _realised(ASSUMED_DIST, n, reps=2000)
    assert fpr.mean() == pytest.approx(TARGET, rel=0.15), fpr.mean()


SKEWED = {"gamma": stats.gamma(4, scale=2.5), "gumbel": stats.gumbel_r(10, 1), "lognormal": stats.lognorm(0.4),
          "student_t4": stats.t(4, loc=20), "max_of_500_exp": stats.gumbel_r(np.log(500), 1)}
LIGHT = {"normal": stats.norm(10, 1), "weibull_1.5": stats.weibull_min(1.5, scale=10), "uniform": stats.uniform(5, 5)}


@pytest.mark.parametrize("dist", SKEWED.values(), ids=SKEWED.keys())
def test_right_skewed_shapes_stay_within_a_factor_of_the_target(dist):
    """Right-skewed and heavier-tailed shapes (an image score is a maximum or a top-k mean over a map):
    on average within [target / 4, 2.5 x target] at n = 40 (the max_margin rule it replaces realises
    about 1/(n+1) there, whatever the target)."""
    fpr, _, _ = _realised(dist, 40, reps=1000, seed=1)
    assert TARGET / 4 <= fpr.mean() <= 2.5 * TARGET, fpr.mean()


@pytest.mark.parametrize("dist", LIGHT.values(), ids=LIGHT.keys())
def test_light_tailed_shapes_are_flagged_less_often_than_the_target(dist):
    """Symmetric or light-tailed shapes: the estimate errs on the side of fewer false alarms (the rate
    is over-estimated), never more than the target on average."""
    fpr, _, _ = _realised(dist, 40, reps=1000, seed=1)
    assert fpr.mean() <= TARGET, fpr.mean()


def test_never_below_the_median_good_score():
    """Even a target of 45 % (the rule's threshold below the median) never flags half of the good parts."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        s = rng.lognormal(0, 1, rng.integers(5, 30))
        for method in ("target_fpr", "synthetic_f1"):
            cal = calibrate(s, CalibrationOptions(method=method, target_fpr=0.45), synthetic_scores=s * 1.1)
            assert cal.threshold >= np.median(s)


def test_five_scores_give_a_sane_threshold():
    """n = 5 (a training set of about 25 good images): above the median, and the FPR it realises stays
    below 10 % in 95 % of the samples and below the target on average by no more than a factor of 1.2."""
    fpr, thr, floor = _realised(ASSUMED_DIST, 5, reps=2000, seed=3)
    assert np.all(thr >= floor)
    assert np.quantile(fpr, 0.95) < 0.10 and fpr.mean() <= 1.2 * TARGET
    assert np.all(np.isfinite(thr))


def test_the_normal_factor_is_the_classic_prediction_bound():
    """The simulated factor matches t_{n-1, 1-a} * sqrt(1 + 1/n), the exact one for normal scores."""
    for n in (5, 20, 80):
        exact = stats.t.ppf(1 - TARGET, n - 1) * np.sqrt(1 + 1 / n)
        assert k_factor("normal", n, TARGET) == pytest.approx(exact, rel=0.02)


def test_calibration_is_deterministic_and_independent_of_global_random_state():
    s = np.random.default_rng(4).lognormal(2, 0.2, 30)
    np.random.seed(1)
    a = calibrate(s, synthetic_scores=s + 1.0)
    np.random.seed(2)
    b = calibrate(s, synthetic_scores=s + 1.0)
    assert a.to_dict() == b.to_dict()


def test_what_calibration_records_and_its_expected_rate():
    s = np.random.default_rng(5).lognormal(2, 0.2, 30)
    syn = np.r_[s[:10] * 2.0, s[:10] * 0.9]
    cal = calibrate(s, CalibrationOptions(target_fpr=0.02), syn, ["scar"] * 10 + ["perlin"] * 10)
    assert cal.method == "target_fpr" and cal.target_fpr == 0.02 and cal.n_images == 30
    assert cal.expected_fpr == pytest.approx(0.02, rel=1e-6)
    lo, hi = cal.expected_fpr_interval
    assert lo < 0.02 < hi and cal.interval_level == 0.9
    assert cal.synthetic["n_images"] == 20 and cal.synthetic["recall"] == np.mean(syn >= cal.threshold)
    assert cal.synthetic["recall_by_kind"]["scar"] == 1.0
    assert cal.good_scores == s.tolist() and cal.estimator == f"{fit_tail(s, TAIL_FAMILY, TAIL_TRANSFORM).name} predictive"
    # the former default states what it should be expected to give too
    old = calibrate(s, CalibrationOptions(method="max_margin"))
    assert old.target_fpr is None and 0 < old.expected_fpr < 1
    assert (old.expected_fpr < cal.expected_fpr) == (old.threshold > cal.threshold)  # the rate falls as it rises


def test_synthetic_f1_stays_within_the_target_rate():
    rng = np.random.default_rng(6)
    s = rng.lognormal(2, 0.2, 40)
    syn = rng.lognormal(2.9, 0.1, 40)  # well separated: F1 prefers a threshold above the target's
    tgt = calibrate(s, CalibrationOptions(target_fpr=0.05), syn)
    f1 = calibrate(s, CalibrationOptions(method="synthetic_f1", target_fpr=0.05), syn)
    assert f1.threshold >= tgt.threshold and f1.expected_fpr <= 0.05 + 1e-9
    assert f1.synthetic["recall"] == tgt.synthetic["recall"] == 1.0


def test_moving_the_target_from_the_recorded_scores():
    s = np.random.default_rng(7).lognormal(2, 0.2, 30)
    cal = calibrate(s, synthetic_scores=s * 1.5)
    moved = recalibrate(cal, CalibrationOptions(target_fpr=0.05), {"kind": "test"})
    assert moved.threshold < cal.threshold and moved.good_scores == cal.good_scores
    assert moved.to_dict() == calibrate(s, CalibrationOptions(target_fpr=0.05), s * 1.5,
                                        source={"kind": "test"}).to_dict()
    with pytest.raises(ValueError, match="records no held-out scores"):
        recalibrate(Calibration(threshold=1.0, low=0.0), CalibrationOptions(), {})


def test_calibration_round_trips_through_json():
    s = np.random.default_rng(8).lognormal(2, 0.2, 12)
    cal = calibrate(s, synthetic_scores=s * 2, synthetic_kinds=["scar"] * 12, source={"kind": "training"})
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal and again.expectation() == cal.expectation()


def test_a_calibration_from_before_these_fields_loads_with_them_empty():
    old = {"threshold": 0.82, "low": 0.78, "method": "max_margin", "quantile": 0.99, "margin": 0.1, "n_images": 1,
           "good_stats": {"min": 0.8, "median": 0.8, "max": 0.8, "mean": 0.8, "std": 0.0}}
    cal = Calibration.from_dict(old)
    assert cal.expected_fpr is None and cal.good_scores == [] and cal.synthetic is None
    e = cal.expectation()
    assert e["rule"] == "max_margin" and e["expected_fpr"] is None and e["synthetic_recall"] is None


class _OddFew:
    """Good scores where 3 % of the parts look unlike the rest (normal(30, 1), and normal(40, 2) for the odd
    few): a tail no single fitted family follows, as on KolektorSDD."""

    @staticmethod
    def rvs(size, random_state):
        common, odd = random_state.normal(30, 1, size), random_state.normal(40, 2, size)
        return np.where(random_state.random(size) < 0.03, odd, common)

    @staticmethod
    def sf(t):
        return 0.97 * stats.norm(30, 1).sf(t) + 0.03 * stats.norm(40, 2).sf(t)


def test_a_heavier_tail_than_the_fitted_family_gets_the_conformal_bound():
    """300 good scores with a few odd parts: the fitted threshold alone is exceeded by several times the
    target; where the scores contradict the family, the conformal bound (the k-th smallest, k =
    ceil((n + 1)(1 - target))) sets the threshold, realising the target as its exact Beta law says."""
    from stpm.training.calibration import conformal_rank

    n = 300
    k = conformal_rank(n, TARGET)
    assert k == 298 and conformal_rank(98, TARGET) is None and conformal_rank(99, TARGET) == 99
    samples = _OddFew.rvs((400, n), np.random.default_rng(0))
    cals = [calibrate(s, CalibrationOptions(target_fpr=TARGET)) for s in samples]
    bound = [(c, s) for c, s in zip(cals, samples) if c.threshold == np.sort(s)[k - 1]]
    assert len(bound) > 0.6 * len(cals), len(bound)  # measured: 0.76
    fitted = np.array([fit_tail(s, TAIL_FAMILY, TAIL_TRANSFORM).threshold(TARGET) for s in samples])
    assert _OddFew.sf(fitted).mean() > 2 * TARGET  # what the fit alone would realise (measured: 2.8 %)
    realised = _OddFew.sf(np.array([c.threshold for c in cals]))
    assert realised.mean() <= 1.5 * TARGET, realised.mean()  # measured: 1.34 %
    at_bound = _OddFew.sf(np.array([c.threshold for c, _ in bound]))
    assert at_bound.mean() == pytest.approx((n - k + 1) / (n + 1), rel=0.35), at_bound.mean()
    c = bound[0][0]
    assert c.estimator == f"conformal ({k}-th of {n} good scores)"
    assert c.expected_fpr == pytest.approx((n - k + 1) / (n + 1))
    lo, hi = c.expected_fpr_interval
    assert 0 < lo < c.expected_fpr < hi < 0.03
    assert any("heavier than the fitted" in note for note in c.notes)


def test_the_assumed_family_keeps_its_fitted_threshold_with_many_scores():
    """300 log-normal scores: the data rarely contradict the family, so the fitted threshold stays in most
    calibrations (the bound only steps in where significantly too many scores reach it)."""
    samples = ASSUMED_DIST.rvs(size=(200, 300), random_state=np.random.default_rng(1))
    cals = [calibrate(s, CalibrationOptions(target_fpr=TARGET)) for s in samples]
    fitted = [c for c in cals if c.estimator == f"{TAIL_FAMILY if TAIL_TRANSFORM != 'log' else 'lognormal'} predictive"]
    assert len(fitted) > 0.9 * len(cals), len(fitted)
    realised = ASSUMED_DIST.sf([c.threshold for c in cals])
    assert realised.mean() == pytest.approx(TARGET, rel=0.2), realised.mean()


def test_a_far_largest_score_among_too_few_for_a_bound_sets_the_threshold_at_it():
    """56 good scores (an STPM bundle's held-out images; a bound at 1 % needs 99) with a few odd parts: the
    fitted threshold alone realises over twice the target. Where the largest score lies further out than
    the family puts the largest of 56, the threshold is that score, and the bundle states its rate, 1 / 57,
    instead of the target: what it states is then what it realises, on average."""
    from stpm.training.tail import fit_tail as fit

    n = 56
    samples = _OddFew.rvs((400, n), np.random.default_rng(0))
    cals = [calibrate(s, CalibrationOptions(target_fpr=TARGET)) for s in samples]
    at_max = [c for c, s in zip(cals, samples) if c.threshold == s.max()]
    assert len(at_max) > 0.5 * len(cals), len(at_max)  # measured: 0.66
    fitted = np.array([fit(s, TAIL_FAMILY, TAIL_TRANSFORM).threshold(TARGET) for s in samples])
    assert _OddFew.sf(fitted).mean() > 2 * TARGET  # measured: 2.6 %
    realised = _OddFew.sf(np.array([c.threshold for c in cals]))
    stated = np.array([c.expected_fpr for c in cals])
    assert realised.mean() < 0.7 * _OddFew.sf(fitted).mean()  # measured: 1.6 % against 2.6 %
    assert realised.mean() == pytest.approx(stated.mean(), rel=0.25)  # measured: 1.56 % and 1.50 %
    c = at_max[0]
    assert c.estimator == f"conformal ({n}-th of {n} good scores)"
    assert c.expected_fpr == pytest.approx(1 / (n + 1)) and c.expected_fpr > TARGET
    assert any("too few for a distribution-free bound" in note for note in c.notes)


def test_the_assumed_family_meets_the_largest_score_check_as_often_as_its_level():
    """Scores of the assumed family, too few for a bound: the check on the largest score is exact, so it
    moves the threshold in about HEAVY_TAIL_P of calibrations, and the rate realised stays the target."""
    from stpm.training.calibration import HEAVY_TAIL_P

    samples = ASSUMED_DIST.rvs(size=(1000, 56), random_state=np.random.default_rng(56))
    cals = [calibrate(s, CalibrationOptions(target_fpr=TARGET)) for s in samples]
    moved = np.mean([c.threshold == s.max() and c.estimator.startswith("conformal") for c, s in zip(cals, samples)])
    assert 0.5 * HEAVY_TAIL_P <= moved <= 1.5 * HEAVY_TAIL_P, moved  # measured: 0.050
    realised = ASSUMED_DIST.sf(np.array([c.threshold for c in cals]))
    assert realised.mean() == pytest.approx(TARGET, rel=0.15), realised.mean()  # measured: 1.00 %


def test_where_the_bound_is_the_largest_score_its_distance_is_checked_too():
    """56 scores at a 2 % target: the conformal bound exists but is the largest score (k = n), so a count of
    scores above the fitted threshold cannot show one far-out score; the largest-score check does, and the
    threshold is that score, within the target (1 in 57)."""
    from stpm.training.calibration import conformal_rank

    rng = np.random.default_rng(3)
    s = np.r_[stats.gumbel_r(20, 1).rvs(55, random_state=rng), 60.0]  # one good part far beyond the rest
    assert conformal_rank(s.size, 0.02) == s.size
    c = calibrate(s, CalibrationOptions(target_fpr=0.02))
    assert c.threshold == 60.0 and c.estimator == "conformal (56-th of 56 good scores)"
    assert c.expected_fpr == pytest.approx(1 / 57) and c.expected_fpr <= 0.02
    assert any("within the target" in note for note in c.notes)
    one = calibrate(s, CalibrationOptions(target_fpr=0.01))  # no bound at 1 %: the same score, stated above it
    assert one.threshold == 60.0 and any("too few for a distribution-free bound" in note for note in one.notes)
    plain = calibrate(s[:-1], CalibrationOptions(target_fpr=0.02))  # without it: the fitted threshold
    assert plain.estimator == "gumbel predictive" and plain.threshold < 60.0
