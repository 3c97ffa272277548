"""The micro-batcher's defaults: the choice rule of benchmarks/batching.py on synthetic sweep tables, and
app.batcher.BATCH_DEFAULTS being what the recorded sweep (benchmarks/results/load_sweep.json) chose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.batching import Rule, choose, merge_rounds  # noqa: E402


def point(batch: int, wait: float, c1_p50: float, c8_rate: float, backend: str = "onnxruntime",
          errors: int = 0) -> dict:
    return {"backend": backend, "batch": batch, "wait_ms": wait,
            "runs": [{"clients": 1, "req_per_s": 1000 / c1_p50, "p50_ms": c1_p50, "errors": 0},
                     {"clients": 8, "req_per_s": c8_rate, "p50_ms": 8000 / c8_rate, "errors": errors}]}


def test_no_gain_keeps_the_baseline():
    pts = [point(1, 0, 50, 20.0), point(8, 0, 51, 20.2), point(16, 2, 53, 19.8)]
    c = choose(pts, "onnxruntime")
    assert (c.batch, c.wait_ms) == (1, 0.0)
    assert c.images_per_s == c.baseline_images_per_s == 20.0


def test_a_clear_gain_within_the_latency_rule_wins():
    pts = [point(1, 0, 50, 20.0), point(4, 0, 52, 24.0), point(8, 2, 54, 30.0)]
    c = choose(pts, "onnxruntime")
    assert (c.batch, c.wait_ms) == (8, 2.0)
    assert c.images_per_s == 30.0 and c.baseline_images_per_s == 20.0
    assert c.p50_1_ms <= c.baseline_p50_1_ms * 1.10


def test_a_faster_setting_that_slows_one_client_too_much_is_not_eligible():
    pts = [point(1, 0, 50, 20.0), point(16, 2, 56, 40.0), point(4, 0, 54, 22.0)]
    c = choose(pts, "onnxruntime")
    assert (c.batch, c.wait_ms) == (4, 0.0)  # 16/2 is 12 % slower alone
    assert (16, 2.0) not in c.eligible and (4, 0.0) in c.eligible
    loose = choose(pts, "onnxruntime", Rule(max_slowdown=0.2))
    assert (loose.batch, loose.wait_ms) == (16, 2.0)


def test_ties_go_to_the_smaller_batch_and_wait():
    pts = [point(1, 0, 50, 20.0), point(8, 2, 50, 25.0), point(8, 0, 50, 24.6), point(16, 0, 50, 25.2)]
    c = choose(pts, "onnxruntime")  # 24.6 and 25.0 are within 3 % of 25.2
    assert (c.batch, c.wait_ms) == (8, 0.0)
    strict = choose(pts, "onnxruntime", Rule(tie=0.0))
    assert (strict.batch, strict.wait_ms) == (16, 0.0)


def test_points_with_errors_and_other_backends_are_ignored():
    pts = [point(1, 0, 50, 20.0), point(8, 0, 50, 40.0, errors=3),
           point(1, 0, 30, 35.0, backend="openvino"), point(4, 0, 30, 50.0, backend="openvino")]
    c = choose(pts, "onnxruntime")
    assert (c.batch, c.wait_ms) == (1, 0.0)
    assert (8, 0.0) not in c.eligible
    ov = choose(pts, "openvino")
    assert (ov.batch, ov.images_per_s) == (4, 50.0)


def test_a_sweep_without_its_baseline_is_refused():
    with pytest.raises(ValueError, match="no batch 1 / wait 0 baseline"):
        choose([point(4, 0, 50, 20.0)], "onnxruntime")
    with pytest.raises(ValueError, match="no 8-client run"):
        choose([{"backend": "onnxruntime", "batch": 1, "wait_ms": 0,
                 "runs": [{"clients": 1, "req_per_s": 2.0, "p50_ms": 500, "errors": 0}]}], "onnxruntime")


def test_rounds_merge_to_medians_and_keep_every_error():
    def run(k, rate, p50, errors=0, batch=1.0, load=(1.0, 1.2)):
        return {"clients": k, "req_per_s": rate, "p50_ms": p50, "p99_ms": 2 * p50, "requests": 10,
                "errors": errors, "mean_batch_images": batch, "loadavg_start": [load[0], 0, 0],
                "loadavg_end": [load[1], 0, 0]}

    rounds = [[run(1, 10.0, 100), run(8, 12.0, 600, batch=3.0)],
              [run(1, 14.0, 80), run(8, 11.0, 700, errors=2, batch=4.0, load=(2.0, 2.5))],
              [run(1, 11.0, 90), run(8, 13.0, 650, batch=5.0)]]
    one, eight = merge_rounds(rounds)
    assert (one["clients"], one["req_per_s"], one["p50_ms"], one["p99_ms"]) == (1, 11.0, 90, 180)
    assert (eight["req_per_s"], eight["p50_ms"], eight["mean_batch_images"]) == (12.0, 650, 4.0)
    assert (eight["errors"], eight["requests"], eight["rounds"]) == (2, 30, 3)
    assert eight["loadavg_1m"] == [[1.0, 1.2], [2.0, 2.5], [1.0, 1.2]]
    with pytest.raises(ValueError, match="8 clients: measured in 1 of 2 rounds"):
        merge_rounds([[run(1, 10.0, 100), run(8, 12.0, 600)], [run(1, 10.0, 100)]])


def test_batch_defaults_are_the_recorded_sweeps_choice():
    from app.batcher import BATCH_DEFAULTS

    res = json.loads((ROOT / "benchmarks" / "results" / "load_sweep.json").read_text())
    rule = Rule(**res["rule"])
    assert set(BATCH_DEFAULTS) == set(res["choice"])
    for backend, (batch, wait) in BATCH_DEFAULTS.items():
        c = choose(res["points"], backend, rule)
        assert res["choice"][backend] == c.to_dict(), "the result file records what the rule picks"
        assert (batch, wait) == (c.batch, c.wait_ms), f"{backend}: BATCH_DEFAULTS is not the measured choice"
