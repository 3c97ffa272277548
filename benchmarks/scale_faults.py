"""Faults of the scaled-out mode, measured: runs tests/test_scale_faults.py (real redis-server, PostgreSQL,
nginx; a worker in a network namespace) with STPM_FAULTS_RESULT, and writes what its tests measured, with
the machine and its load, to benchmarks/results/scale_faults.json and docs/SCALING.md's `scale_faults`
block (how long until a cut-off worker's job is failed, how many requests failed when a replica was
killed, ...).

    .venv/bin/python benchmarks/scale_faults.py        # as root (network namespaces); a few minutes

Every test must pass (under CI=true: none may skip); otherwise nothing is written.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

TEST = "tests/test_scale_faults.py"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    return r.stdout.strip() or "unknown"


def run_tests(out: Path) -> float:
    """The fault tests with their measurements written to `out`; -> seconds taken (exits if one failed)."""
    env = {**os.environ, "CI": "true", "STPM_FAULTS_RESULT": str(out),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"{TEST} failed ({r.returncode}); nothing written:\n{(r.stdout + r.stderr)[-6000:]}")
    return time.monotonic() - t0


def main() -> int:
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "faults.json"
        seconds = run_tests(out)
        faults = json.loads(out.read_text())
    res = {
        "command": ".venv/bin/python benchmarks/scale_faults.py", "test": TEST, "commit": commit(),
        "when": time.strftime("%Y-%m-%d"), "test_s": round(seconds),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_start": load_start,
                    "load_avg_end": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "faults": faults,
    }
    path = report.RESULTS / "scale_faults.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    report.write_block(report.SCALING_DOC, "scale_faults", report.render("scale_faults"))
    print(report.render("scale_faults"))
    print(f"wrote {path.relative_to(ROOT)} and docs/SCALING.md's block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
