"""A scaled-out deployment on 127.0.0.1 for tests and benchmarks (no tests here): real redis-server and
PostgreSQL (tests/services.py), N API processes (`python -m app.serve`, STPM_QUEUE=celery) and M Celery
workers (`python -m app.celery_worker`), sharing one model store and one uploads folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from services import Postgres, Redis, free_port

REPO = Path(__file__).resolve().parents[1]


class Cluster:
    def __init__(self, root: Path, redis: Redis, postgres: Postgres, db_url: str, env: dict[str, str] | None = None):
        self.root, self.redis, self.postgres = root, redis, postgres
        self.models, self.data, self.logs = root / "models", root / "data", root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            "STPM_QUEUE": "celery", "STPM_BROKER_URL": redis.url, "STPM_JOBS_DB": db_url,
            "STPM_MODELS_DIR": str(self.models), "STPM_DATA_DIR": str(self.data),
            "STPM_RELOAD_INTERVAL_S": "0.3", "STPM_INTRA_OP_THREADS": "1", "STPM_TRAIN_THREADS": "1",
            "STPM_TRAIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
            # replicas answer alike only on the same engine: "auto" times the backends per process and
            # two replicas may pick differently (scores then differ in the 7th digit); docs/SCALING.md
            "STPM_BACKEND": "onnxruntime", "STPM_PRECISION": "fp32", **(env or {}),
        }
        self.apis: dict[str, tuple[subprocess.Popen, str]] = {}
        self.workers: dict[str, subprocess.Popen] = {}

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **self.env, "PYTHONPATH": str(REPO), **extra}

    # ----- API replicas -----

    def start_api(self, name: str, port: int | None = None, wait: bool = True) -> str:
        port = port or free_port()
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env=self._env({"STPM_REPLICA_NAME": name}), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        self.apis[name] = (proc, url)
        if wait:
            self.wait_api(name)
        return url

    def wait_api(self, name: str, timeout: float = 90.0) -> None:
        proc, url = self.apis[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"API {name} exited with {proc.returncode}: {self.log_tail(name)}")
            try:
                if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"API {name} did not start: {self.log_tail(name)}")

    def url(self, name: str) -> str:
        return self.apis[name][1]

    # ----- workers -----

    def start_worker(self, name: str, wait: bool = True, concurrency: int = 1, prefix: list[str] = (),
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        """`prefix`: e.g. `ip netns exec NS` (a worker on another "host"); `env`: settings of its own."""
        log_path = self.logs / f"{name}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "app.celery_worker", f"--hostname={name}@test",
             f"--concurrency={concurrency}"],
            cwd=REPO, env=self._env(env or {}), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        proc.log_offset = log_path.stat().st_size if log_path.exists() else 0  # type: ignore[attr-defined]
        self.workers[name] = proc
        if wait:
            self.wait_worker(name)
        return proc

    def wait_worker(self, name: str, timeout: float = 90.0) -> None:
        """Until Celery says `NAME@test ready.` (it consumes the queue from then on)."""
        proc = self.workers[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {proc.returncode}: {self.log_tail(name)}")
            text = (self.logs / f"{name}.log").read_bytes()[proc.log_offset:].decode(errors="replace")
            if f"{name}@test ready." in text:
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {name} did not become ready: {self.log_tail(name)}")

    def ping(self, name: str) -> bool:
        """`stpm worker --ping` (the compose health check): does the worker answer over the broker?"""
        r = subprocess.run([sys.executable, "-m", "app.celery_worker", "--ping", f"--hostname={name}@test"],
                           cwd=REPO, env=self._env({}), capture_output=True, timeout=60)
        return r.returncode == 0

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    # ----- all of it -----

    def log_tail(self, name: str, n: int = 3000) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def stop_processes(self) -> None:
        """SIGTERM every API and worker (graceful), then wait for them."""
        procs = [p for p, _ in self.apis.values()] + list(self.workers.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.apis.clear()
        self.workers.clear()
