"""The reproduction scripts: the GPU script's CPU smoke run end to end (opt-in), and the verdict logic of the report.

The smoke run of benchmarks/distill_gpu.py --quick is never a required test (issue 27): it trains every part of
the GPU script on tiny data, about a minute of a loaded 2-core CPU. It runs where STPM_DISTILL_GPU_SMOKE=1:
`STPM_DISTILL_GPU_SMOKE=1 pytest tests/distill/test_benchmarks.py`; elsewhere it skips, under CI=true too.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import distill_report

SMOKE = os.environ.get("STPM_DISTILL_GPU_SMOKE", "") == "1"


@pytest.mark.slow
@pytest.mark.optional("opt-in smoke run of the GPU script, never required: set STPM_DISTILL_GPU_SMOKE=1")
@pytest.mark.skipif(not SMOKE, reason="opt-in: STPM_DISTILL_GPU_SMOKE=1 runs distill_gpu.py --quick end to end")
def test_gpu_script_quick_runs_every_part_on_cpu_and_leaves_the_doc_alone(cifar_dir, tmp_path):
    doc_before = distill_report.DOC.read_text()
    out = tmp_path / "gpu.json"
    env = {**os.environ, "STPM_SHARED_DATA": str(cifar_dir.parent), "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_gpu.py"), "--quick", "--seeds", "0",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    tests = {k: v["0"] for k, v in r["values"].items() if k.endswith("| test acc")}
    expected = ["teacher takd10", "student takd2 NOKD", "student takd2 ESKD (early teacher)",
                "student takd2 TAKD (TA=4)", *[f"row {m}" for m in distill_report.CIFAR_ROW],
                "noisy student iteration 2", "student without noise, iteration 1 (ablation)"]
    assert all(f"{k} | test acc" in tests for k in expected), sorted(set(expected) - {k[:-11] for k in tests})
    assert all(0.0 <= v <= 100.0 for v in tests.values())
    assert r["runs"][-1]["wall_seconds"] > 0 and "load_mean" in r["runs"][-1]
    block = distill_report.gpu(r)
    for label in ("TAKD (GPU)", "ESKD (GPU)", "comparison row (GPU)", "Noisy Student (GPU)"):
        assert f"**Verdict ({label}):" in block
    assert distill_report.DOC.read_text() == doc_before


def _hinton_result(values: dict) -> dict:
    config = {"hard_weight": 0.1, "big_ts": [4.0, 20.0], "select_seed": 0, "temperatures": [2.5, 8.0],
              "hard_weights": [0.1, 0.5]}
    return {"config": config, "runs": [], "values": {k: {str(s): v for s, v in enumerate(per)}
                                                     for k, per in values.items()}}


def test_hinton_verdicts_follow_the_validation_choices_and_the_stated_criteria():
    v = {"2x800 soft T=4 lambda=0.1 | val errors": [40], "2x800 soft T=20 lambda=0.1 | val errors": [30, 31],
         "2x800 hard labels | test errors": [150, 140], "2x800 soft T=20 lambda=0.1 | test errors": [80, 85],
         "2x800 soft T=4 lambda=0.1 | test errors": [50]}  # T = 4 tests better but loses on validation
    for w, best in ((300, ("8", "0.5")), (30, ("2.5", "0.1"))):
        for t in ("2.5", "8"):
            for lam in ("0.1", "0.5"):
                v[f"2x{w} soft T={t} lambda={lam} | val errors"] = [10, 12] if (t, lam) == best else [20, 22]
                v[f"2x{w} soft T={t} lambda={lam} | test errors"] = [1, 1]
    text = distill_report.hinton(_hinton_result(v))
    assert "→ **T = 20**" in text
    assert "Verdict (soft targets vs hard labels): reproduced.** " in text and "= **0.57**" in text
    assert "300 units **T = 8** (lambda 0.5), 30 units **T = 2.5** (lambda 0.1)" in text
    assert "Verdict (temperature): reproduced." in text


def test_the_jittered_check_is_a_reading_beside_the_verdict_and_absent_until_run():
    v = {"2x800 soft T=4 lambda=0.1 | val errors": [30], "2x800 soft T=20 lambda=0.1 | val errors": [40],
         "2x800 hard labels | test errors": [140, 150], "2x800 soft T=4 lambda=0.1 | test errors": [100, 105]}
    before = distill_report.hinton(_hinton_result(v))
    assert "translated digits" not in before
    v |= {"2x800 hard labels, jittered digits | test errors": [90, 100],
          "2x800 soft T=4 lambda=0.1, jittered digits | test errors": [60, 66]}
    text = distill_report.hinton(_hinton_result(v))
    assert "| 2 x 800 soft targets, T = 4, on translated digits (--jittered) | 63.0 ± 4.2 (2 seeds) | 60, 66 |" in text
    assert "soft / hard = 63.0 / 95.0 = **0.66**" in text and "(-30, -34); seeds: 2" in text
    verdict = "**Verdict (soft targets vs hard labels): partly.**"  # 102.5 / 145 on the untranslated digits
    assert verdict in before and verdict in text
    v |= {"2x800 soft T=4 lambda=0.5 | test errors": [87, 87], "2x800 soft T=4 lambda=0.5 | val errors": [40, 42]}
    text = distill_report.hinton(_hinton_result(v))
    assert "Other lambdas at T = 4" in text and "lambda = 0.5: 87.0 test errors (87, 87; validation 40, 42)" in text
    assert "soft / hard = **0.60**" in text and verdict in text  # a reading: the verdict keeps lambda 0.1


def test_a_missing_gpu_result_says_the_block_was_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_report, "RESULTS", tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- BEGIN distill_gpu (written by benchmarks/distill_gpu.py; do not edit) -->\n"
                   "<!-- END distill_gpu -->\n")
    distill_report.write_sections(["gpu"], doc)
    assert "Not run yet: no GPU was at hand" in doc.read_text()


def _noisy_student_result(finished: bool | None) -> dict:
    values = {"teacher | test acc": [50.0, 51.0], "noisy student iteration 1 | test acc": [52.0, 53.0],
              "noisy student iteration 2 | test acc": [54.0, 55.0]}
    run = {"command": "python benchmarks/distill_noisy_student.py", "seeds": [0, 1], "machine": "test",
           "load_at_start": 1.0, "load_at_end": 1.0, "wall_seconds": 60.0, "cpu_seconds": 60.0}
    if finished is not None:
        run["finished"] = finished
    return {"config": {"model": "m"}, "runs": [run], "missing": "seed 2",
            "values": {k: {str(s): v for s, v in enumerate(per)} for k, per in values.items()}}


def test_a_run_that_did_not_reach_its_end_renders_as_partial_without_verdicts(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_report, "RESULTS", tmp_path)
    path = tmp_path / "distill_noisy_student.json"
    path.write_text(json.dumps(_noisy_student_result(finished=False)))
    block = distill_report.render("noisy_student", json.loads(path.read_text()))
    assert "**Partial run, no verdict.**" in block and "Missing: seed 2." in block
    assert "**No verdict (Noisy Student): partial run.**" in block and "**Verdict (" not in block
    assert "| distill_noisy_student | partial run, no verdict |" in distill_report.summary()
    for finished in (True, None):  # finished, or recorded before runs said so
        path.write_text(json.dumps(_noisy_student_result(finished)))
        block = distill_report.render("noisy_student", json.loads(path.read_text()))
        assert "Partial run" not in block and "**Verdict (Noisy Student): reproduced.**" in block
        assert "| Noisy Student | **reproduced** | 2 |" in distill_report.summary()


def test_results_are_partial_until_the_run_finishes(tmp_path, monkeypatch):
    import argparse

    import distill_common
    from distill_render import is_partial

    monkeypatch.setattr(distill_common, "WORK", tmp_path / "work")
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"benchmark": "x", "config": {"a": 1}, "values": {}, "runs": [],
                               "missing": "the students"}))
    res = distill_common.Results("x", argparse.Namespace(seeds=[0], out=out), {"a": 1})
    res.add("model | test acc", 0, 50.0)
    saved = json.loads(out.read_text())
    assert is_partial(saved) and saved["missing"] == "the students"
    res.finish()
    saved = json.loads(out.read_text())
    assert not is_partial(saved) and "missing" not in saved and saved["values"] == {"model | test acc": {"0": 50.0}}


def test_parallel_runs_keep_each_others_latest_run_record(tmp_path, monkeypatch):
    """Two processes of one benchmark (distill_hinton --widths 800,30 and --widths 300) save to one file in
    turns: each run's record on disk is its latest, whichever process wrote last (a copy one process took
    early used to overwrite the other's progress, and a finished run read as a 99-second one)."""
    import argparse

    import distill_common

    monkeypatch.setattr(distill_common, "WORK", tmp_path / "work")
    out = tmp_path / "r.json"
    args = argparse.Namespace(seeds=[0], out=out)
    a = distill_common.Results("x", args, {"a": 1})
    a.add("a | test", 0, 1.0)
    b = distill_common.Results("x", args, {"a": 1})
    b.add("b | test", 0, 2.0)
    a.add("a | test", 1, 3.0)  # a now holds b's early record
    b.started -= 100.0  # b works on: its record grows
    b.add("b | test", 1, 4.0)
    b.finish()
    a.started -= 50.0
    a.add("a | test", 2, 5.0)  # a writes last
    runs = {r["run_id"]: r for r in json.loads(out.read_text())["runs"]}
    assert len(runs) == 2
    assert runs[b.run["run_id"]]["finished"] and runs[b.run["run_id"]]["wall_seconds"] >= 100.0
    assert not runs[a.run["run_id"]]["finished"] and runs[a.run["run_id"]]["wall_seconds"] >= 50.0
    a.finish()
    saved = json.loads(out.read_text())
    assert all(r["finished"] for r in saved["runs"])
    assert saved["values"] == {"a | test": {"0": 1.0, "1": 3.0, "2": 5.0}, "b | test": {"0": 2.0, "1": 4.0}}


def test_the_hinton_plan_prices_the_default_schedule_from_the_measured_epochs():
    from distill_epoch_times import MODELS, schedule
    from distill_report_hinton import TWO_PROCESS_SPLIT

    sched = schedule()
    values = {f"{label} | {kind} s per epoch": {"0": 6.0} for label in MODELS for kind in ("CPU", "wall")}
    r = {"config": {"schedule": sched, "epochs_timed": 2, "bf16_autocast": True}, "values": values, "runs": []}
    text = distill_report.render("epoch_times", r)
    total = sum(sched.values()) * 6.0 / 60
    teacher = sched["teacher 2x1200 (dropout, max-norm, jitter)"] * 6.0 / 60
    longer = max(sum(sched[k] for k in part) for part in TWO_PROCESS_SPLIT) * 6.0 / 60
    assert f"**What a quiet machine needs:** {total:.0f} minutes of one core" in text
    assert f"or {teacher + longer:.0f} minutes on two quiet cores: the teacher ({teacher:.0f} min)" in text
    assert sched["teacher 2x1200 (dropout, max-norm, jitter)"] == 200  # distill_hinton.py's default
