"""Regression tests for the four defects of issue 18 (each failed before its fix)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from stpm.distill import losses
from stpm.distill import methods as M
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _logits(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(6, 10, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dkd_is_finite_in_half_precision_and_matches_float32(dtype):
    """Defect 1: the trainer autocasts to fp16 on CUDA; `gt * 1e9` overflowed to inf and DKD gave NaN."""
    z_s, z_t, y = _logits(1), _logits(2), torch.arange(6)
    ref = losses.dkd_loss(z_s, z_t, y, 4.0, 1.0, 8.0)
    got = losses.dkd_loss(z_s.to(dtype), z_t.to(dtype), y, 4.0, 1.0, 8.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    z = z_s.to(dtype).requires_grad_(True)
    losses.dkd_loss(z, z_t.to(dtype), y, 4.0, 1.0, 8.0).backward()
    assert torch.isfinite(z.grad).all()


def test_noisy_student_when_labelled_subset_lacks_the_highest_class(digits_batch):
    """Defect 2: the class count came from y_labeled.max() + 1; a subset without class 9 crashed."""
    x, y = digits_batch
    spec = InputSpec(1, 8, 10)
    keep = y < 9
    x_l, y_l = x[keep][:24], y[keep][:24]
    assert int(y_l.max()) < 9
    torch.manual_seed(0)
    teacher = build_model("mlp32", spec)
    cfg = M.RunConfig(TrainConfig(epochs=1, lr=3e-3), batch_size=16, seed=0)
    ns = M.NoisyStudentConfig(iterations=1, soft=True, temperature=1.0, max_shift=1, noise_std=0.1)
    ((student, _),) = M.noisy_student(teacher, lambda: build_model("mlp32", spec), x_l, y_l, x[40:], ns, cfg,
                                      torch.device("cpu"))
    assert student(x[:2]).shape == (2, 10)


def _cli(args, tmp_path, name):
    from stpm.distill.cli import main

    out = tmp_path / f"{name}.pt"
    rc = main(args + ["--data", "digits", "--epochs", "1", "--no-progress", "--device", "cpu", "--out", str(out)])
    return rc, out


def test_cli_split_seed_changes_the_split_and_is_recorded(tmp_path):
    """Defect 3a: the CLI could not choose the split seed."""
    reports = []
    for seed in (0, 1):
        rc, out = _cli(["train", "--model", "mlp16", "--split-seed", str(seed)], tmp_path, f"t{seed}")
        assert rc == 0
        reports.append(json.loads(out.with_suffix(".json").read_text()))
    assert reports[0]["split"]["split_seed"] == 0 and reports[1]["split"]["split_seed"] == 1
    assert reports[0]["split"]["train_sha256"] != reports[1]["split"]["train_sha256"]


def test_cli_refuses_a_teacher_trained_on_another_split(tmp_path):
    """Defect 3b: --teacher-weights was not checked against the split; its training images could be test images."""
    rc, teacher = _cli(["train", "--model", "mlp32", "--split-seed", "1"], tmp_path, "teacher")
    assert rc == 0
    with pytest.raises(SystemExit, match="split"):
        _cli(["kd", "--teacher", "mlp32", "--teacher-weights", str(teacher), "--student", "mlp16",
              "--split-seed", "0"], tmp_path, "student")
    rc, _ = _cli(["kd", "--teacher", "mlp32", "--teacher-weights", str(teacher), "--student", "mlp16",
                  "--split-seed", "1"], tmp_path, "student_ok")
    assert rc == 0


@pytest.mark.parametrize("method", ["dkd", "fitnets", "at", "fsp"])
def test_cli_does_not_silently_ignore_hard_weight(method, tmp_path):
    """Defect 3c: --hard-weight was ignored for dkd, fitnets, at and fsp without a word."""
    with pytest.raises(SystemExit, match="hard-weight"):
        _cli(["kd", "--teacher", "cnn4", "--student", "cnn2", "--method", method, "--hard-weight", "0.3"],
             tmp_path, method)


def test_single_seed_tables_do_not_print_a_zero_spread():
    """Defect 4: a single value was printed as "x ± 0.00", as if three seeds had agreed exactly.
    (The benchmarks' two formatters were folded into stpm.distill.summary.format_mean_std.)"""
    sys.path.insert(0, str(BENCHMARKS))
    import distill_report

    from stpm.distill.summary import format_mean_std

    for fmt in (format_mean_std, distill_report.ms):
        one = fmt([96.15])
        assert "±" not in one and "96.15" in one and "1 seed" in one
        assert fmt([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
