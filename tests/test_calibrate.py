import numpy as np
import pytest

from stpm.bundle.calibration import Calibration
from stpm.training.calibration import calibrate, f1_optimal_threshold


def normalize(x, threshold, low):
    return Calibration(threshold=threshold, low=low).normalise(x)
from stpm.options import CalibrationOptions


def test_threshold_sits_above_the_good_scores_and_maps_to_one_half():
    good = np.random.default_rng(0).normal(1.0, 0.1, 200)
    cal = calibrate(good)
    assert cal.threshold > good.max()
    assert normalize(cal.threshold, cal.threshold, cal.low) == pytest.approx(0.5)
    assert normalize(good.min(), cal.threshold, cal.low) == pytest.approx(0.0)
    n = normalize(good, cal.threshold, cal.low)
    assert n.min() >= 0 and n.max() < 0.5


def test_quantile_method_flags_about_the_requested_fraction_of_goods():
    good = np.random.default_rng(1).normal(1.0, 0.1, 1000)
    cal = calibrate(good, CalibrationOptions(method="quantile", quantile=0.95, margin=0.0))
    assert np.mean(good > cal.threshold) == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("scores", [[3.0], [2.0, 2.0, 2.0], [1.0, 1.0 + 1e-9]])
def test_degenerate_good_sets_never_flag_everything(scores):
    for cfg in (CalibrationOptions(), CalibrationOptions(method="quantile", quantile=0.5, margin=0.0)):
        cal = calibrate(np.array(scores), cfg)
        assert cal.threshold >= np.median(scores)
        assert cal.threshold > cal.low
        assert np.mean(np.array(scores) > cal.threshold) <= 0.5


def test_normalisation_is_monotonic_and_clipped():
    x = np.linspace(-5, 10, 100)
    n = normalize(x, 2.0, 1.0)
    assert np.all(np.diff(n) >= 0) and n.min() == 0.0 and n.max() == 1.0


def test_f1_optimal_threshold_separates_separable_scores():
    scores = np.r_[np.linspace(0, 1, 20), np.linspace(2, 3, 10)]
    labels = np.r_[np.zeros(20), np.ones(10)]
    thr, f1 = f1_optimal_threshold(scores, labels)
    assert f1 == 1.0 and 1.0 < thr <= 2.0
    with pytest.raises(ValueError):
        f1_optimal_threshold(scores, np.zeros(30))


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        calibrate(np.array([]))
    with pytest.raises(ValueError):
        calibrate(np.array([1.0, np.nan]))
    with pytest.raises(ValueError):
        calibrate(np.array([1.0]), CalibrationOptions(method="median"))


def test_a_single_good_score_gives_a_sane_normalisation_scale():
    cal = calibrate(np.array([2.0]))
    assert cal.threshold > 2.0
    assert cal.threshold - cal.low >= 0.05 * 2.0 - 1e-12  # no 1e-12 scales that blow up float noise
    assert normalize(2.0 + 1e-6, cal.threshold, cal.low) == pytest.approx(normalize(2.0, cal.threshold, cal.low), abs=1e-4)
