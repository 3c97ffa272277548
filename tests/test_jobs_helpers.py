"""Shared pieces of the training-job tests (no tests here): images, form fields, polling, a server runner."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from test_api_helpers import shared_data, stop  # noqa: F401  (stop: re-exported for the job tests)
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Tiny and offline: random-init ResNet18 at 64 px (no ImageNet download).
TINY = {"method": "stpm", "backbone": "resnet18", "image_size": "64", "pretrained": "false", "batch_size": "4", "lr": "0.1"}


def real_good(n: int = 10) -> list[Path]:
    d = shared_data() / "mvtec_ad_bottle_512" / "bottle" / "train" / "good"
    return sorted(d.glob("*.png"))[:n] if d.is_dir() else []


def png_bytes(seed: int, size: int = 72) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 128)], axis=2)
    arr = np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_files(n: int = 10, seed0: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"good_{seed0 + i:03d}.png", png_bytes(seed0 + i), "image/png")) for i in range(n)]


def form(name: str, **extra) -> dict[str, str]:
    return {"name": name, **TINY, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in extra.items()}}


def wait_for(client: httpx.Client, job_id: str, pred, timeout: float = 180.0, what: str = "") -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/train/{job_id}").json()
        if pred(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or pred}: last seen {job}")


def training(job: dict) -> bool:
    """Running and past its first optimizer step (torch imported, model built)."""
    p = job.get("progress") or {}
    return job["state"] == "running" and p.get("step", 0) >= 1


def finished(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def wait_dead(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still alive")


def job_pid(data_dir: Path, job_id: str) -> int:
    from app.jobs.store import JobStore

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = JobStore(data_dir / "jobs.sqlite3").get(job_id)
        if job is not None and job.pid:
            return job.pid
        time.sleep(0.1)
    raise AssertionError("the job never got a process")


def start_server(models: Path, data: Path, env_extra: dict[str, str] | None = None, timeout: float = 60.0):
    """`python -m app.serve` on 127.0.0.1:<free port> with a jobs data dir; -> (process, base url)."""
    from test_api_helpers import start_uvicorn

    env = {"STPM_DATA_DIR": str(data), "STPM_RELOAD_INTERVAL_S": "0.3", "STPM_TRAIN_THREADS": "1", **(env_extra or {})}
    return start_uvicorn(models, env, timeout)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def visible_versions(models: Path, name: str) -> list[str]:
    from stpm import bundle

    return bundle.list_versions(models, name) if (models / name).is_dir() else []


def leftovers(models: Path) -> list[str]:
    return [p.name for p in models.glob("*/.*") if p.name.startswith((".staging-", ".deleted-"))]
