"""The missing-requirement rule (tests/conftest.py): a skip locally, a failure under CI=true, for every
way a test can skip; `optional` tests may still skip. Checked on real pytest runs in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PROBE = '''
import pytest
from pathlib import Path
from tests.conftest import require

nothing_here = pytest.importorskip("a_module_that_is_not_installed") if {module_skip} else None


def test_needs_data():
    require(Path("/nonexistent/shared/data"))


@pytest.mark.skipif(True, reason="Chromium not found")
def test_needs_a_browser():
    pass


@pytest.mark.optional("needs a GPU")
def test_needs_a_gpu():
    pytest.skip("no GPU here")


def test_runs():
    assert True
'''


def run_probe(tmp_path: Path, ci: bool, module_skip: bool = False) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403  (the rule under test)\n"
                                          "from tests.conftest import pytest_make_collect_report, "
                                          "pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_probe.py").write_text(PROBE.format(module_skip=module_skip))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path / "test_probe.py")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_locally_missing_requirements_skip_with_their_reason(tmp_path):
    r = run_probe(tmp_path, ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 3 skipped" in r.stdout
    assert "/nonexistent/shared/data is absent" in r.stdout and "Chromium not found" in r.stdout


def test_under_ci_missing_requirements_fail_naming_the_reason(tmp_path):
    r = run_probe(tmp_path, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    # a skip in the call fails the test; a skipif mark (setup) errors it; the optional GPU test still skips
    assert "1 failed, 1 passed, 1 skipped, 1 error" in r.stdout
    assert "skipped under CI=true" in r.stdout and "/nonexistent/shared/data is absent" in r.stdout
    assert "Chromium not found" in r.stdout


def test_under_ci_a_module_level_importorskip_fails_the_module(tmp_path):
    r = run_probe(tmp_path, ci=True, module_skip=True)
    assert r.returncode != 0 and "a_module_that_is_not_installed" in r.stdout, r.stdout + r.stderr
    assert "1 error" in r.stdout


def test_under_ci_the_suite_fails_without_the_shared_data(tmp_path):
    """The real thing: a real-data test of the suite, shared data pointed away, CI=true -> failure."""
    env = {**os.environ, "CI": "true", "STPM_SHARED_DATA": str(tmp_path / "no-data")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_cli.py::test_train_on_a_folder_with_bad_files_names_them"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 1 and "1 error" in r.stdout, r.stdout + r.stderr
    assert "skipped under CI=true" in r.stdout and "no-data" in r.stdout
