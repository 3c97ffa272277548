"""`stpm worker` and the scale-out settings refuse what cannot work, naming the setting to fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _worker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STPM_")}
    return subprocess.run([sys.executable, "-m", "app.celery_worker", *args], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_worker_without_a_broker_says_which_setting():
    r = _worker({})
    assert r.returncode == 2 and "STPM_BROKER_URL" in r.stderr


def test_bad_scale_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValidationError, match="STPM_BROKER_URL"):
        Settings(queue="celery")
    with pytest.raises(ValidationError, match="postgresql://"):
        Settings(jobs_db="mysql://x@y/z")
    r = _worker({"STPM_BROKER_URL": "redis://127.0.0.1:1/0", "STPM_JOBS_DB": "mysql://x@y/z"})
    assert r.returncode == 2 and "jobs_db" in r.stderr


def test_default_settings_stay_embedded(tmp_path):
    s = Settings(models_dir=tmp_path / "models")
    assert s.queue == "local" and s.jobs_db is None
    assert s.jobs_store_target == str(tmp_path / "data" / "jobs.sqlite3")
    assert s.replica.endswith(":8000")
    s = Settings(jobs_db="postgresql://u:secret@db:5432/stpm", replica_name="api-7")
    assert s.jobs_store_target == "postgresql://u:secret@db:5432/stpm" and "secret" not in repr(s)
    assert s.replica == "api-7"
