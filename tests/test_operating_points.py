"""`stpm eval`'s other operating points: the thresholds `stpm calibrate --target-fpr T` would set from a
bundle's recorded scores, each with what this test set shows at it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # stpm.evaluation.report scores with torch

from stpm.bundle.calibration import Calibration  # noqa: E402
from stpm.evaluation import metrics  # noqa: E402
from stpm.evaluation.pictures import operating_points_html  # noqa: E402
from stpm.evaluation.report import OPERATING_FPRS, format_operating_points, operating_points  # noqa: E402
from stpm.options import CalibrationOptions  # noqa: E402
from stpm.training.calibration import calibrate, recalibrate  # noqa: E402


def _case(target: float = 0.01):
    rng = np.random.default_rng(3)
    good_cal = rng.gumbel(30.0, 2.0, 80)  # what training recorded (held-out and out-of-fold good scores)
    syn = rng.gumbel(40.0, 4.0, 40)
    cal = calibrate(good_cal, CalibrationOptions(method="target_fpr", target_fpr=target), syn, ["blob"] * 40)
    labels = np.r_[np.zeros(60, int), np.ones(50, int)]
    scores = np.r_[rng.gumbel(30.0, 2.0, 60), rng.gumbel(42.0, 5.0, 50)]  # a labelled test set
    return cal, labels, scores


def test_each_row_is_the_recalibrated_threshold_and_the_test_sets_decisions_at_it():
    cal, labels, scores = _case()
    points = operating_points(cal, labels, scores)
    assert [p["target_fpr"] for p in points] == sorted(OPERATING_FPRS)
    for p in points:
        moved = recalibrate(cal, CalibrationOptions(method="target_fpr", target_fpr=p["target_fpr"]), {"kind": "x"})
        assert p["threshold"] == moved.threshold and p["expected_fpr"] == moved.expected_fpr
        at = metrics.at_threshold(labels, scores, p["threshold"])
        assert (p["precision"], p["recall"], p["fpr_on_test_good"], p["n_flagged_good"]) == (
            at["precision"], at["recall"], at["fpr"], at["fp"])
    # a higher target never raises the threshold, so recall and flagged good parts never fall
    thr = [p["threshold"] for p in points]
    assert thr == sorted(thr, reverse=True)
    assert [p["recall"] for p in points] == sorted(p["recall"] for p in points)
    assert [p["current"] for p in points] == [t == 0.01 for t in sorted(OPERATING_FPRS)]
    own = next(p for p in points if p["current"])
    assert own["threshold"] == cal.threshold  # the bundle's own threshold is reproduced, not re-estimated


def test_a_bundles_own_target_outside_the_list_gets_its_row():
    cal, labels, scores = _case(target=0.03)
    points = operating_points(cal, labels, scores)
    assert 0.03 in [p["target_fpr"] for p in points]
    assert [p["target_fpr"] for p in points if p["current"]] == [0.03]


def test_no_recorded_scores_no_rows_and_the_renderers_say_so():
    bare = Calibration(threshold=1.0, low=0.0)  # a calibration written before scores were recorded
    assert operating_points(bare, np.array([0, 1]), np.array([0.5, 2.0])) == []
    assert operating_points_html([]) == "" and format_operating_points([]) == ""
    cal, labels, scores = _case()
    points = operating_points(cal, labels, scores)
    text = format_operating_points(points)
    assert text.count("\n") == len(points) + 1 and "\n*" in text  # header lines, one row each, its own marked
    html = operating_points_html(points)
    assert html.count("<tr") == len(points) + 1 and html.count("font-weight:bold") == 1
