"""Real redis-server and PostgreSQL for the scale-out tests and benchmarks (no tests here).

Both come from Debian's packages (`apt-get install redis-server postgresql`; scripts/test.sh installs
them when it runs as root). Each instance lives in its own temporary folder on a free port of 127.0.0.1
and is stopped by its owner. `missing(reason)` skips a test (tests/conftest.py turns that into a failure
under CI=true).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def missing(reason: str) -> None:
    """Skip with the reason (a failure under CI=true, by tests/conftest.py's rule)."""
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


class Redis:
    """redis-server with an append-only file (queued tasks survive its restart)."""

    def __init__(self, root: Path):
        self.binary = shutil.which("redis-server")
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis fsyncs the append-only file and exits
            self.proc.wait(30)
        self.proc = None


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throwaway PostgreSQL cluster (initdb, trust auth on 127.0.0.1). As root it runs as `postgres`."""

    def __init__(self):
        self.bindir = _pg_bindir()
        self.port = free_port()
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")  # the server refuses to run as root
            except KeyError:
                self.user = None
        self.root = Path(tempfile.mkdtemp(prefix="stpm-pg-"))
        self.data = self.root / "data"
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    @staticmethod
    def available() -> str | None:
        """None, or why PostgreSQL cannot run here."""
        if _pg_bindir() is None:
            return "PostgreSQL is not installed (apt-get install postgresql)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no `postgres` user to run PostgreSQL as"
        return None

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        def demote():
            if self.user is not None:
                os.setgid(self.user.pw_gid)
                os.setuid(self.user.pw_uid)

        return subprocess.run(cmd, preexec_fn=demote, cwd=self.root, capture_output=True, text=True, check=check,
                              env={**os.environ, "LC_ALL": "C"})

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://stpm@127.0.0.1:{self.port}/{db}"

    def start(self) -> "Postgres":
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "stpm", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off -c max_connections=200"
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"), "-o", opts,
                      "-w", "-t", "60", "start", check=False)
        if r.returncode != 0:
            log = (self.root / "pg.log").read_text(errors="replace")[-2000:] if (self.root / "pg.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {r.stdout} {r.stderr} {log}")
        return self

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """A running cluster, or skip (fail under CI) with the reason."""
    why = Postgres.available()
    if why:
        missing(why)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'stpm[scale]')")
    return Postgres().start()


def start_redis(root: Path) -> Redis:
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (apt-get install redis-server)")
    return Redis(root).start()
