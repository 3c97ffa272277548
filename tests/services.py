"""Real redis-server, PostgreSQL and nginx for the scale-out tests and benchmarks (no tests here).

All come from Debian's packages (`apt-get install redis-server postgresql nginx`; scripts/test.sh installs
them when it runs as root). Each instance lives in its own temporary folder on a free port of 127.0.0.1
(Redis and PostgreSQL also on the extra addresses a test names, e.g. its network namespace's peer) and is
stopped by its owner. `missing(reason)` skips a test (tests/conftest.py turns that into a failure under
CI=true).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
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
    """redis-server with an append-only file (queued tasks survive its restart), on 127.0.0.1 and `also_on`."""

    def __init__(self, root: Path, also_on: tuple[str, ...] = ()):
        self.binary = shutil.which("redis-server")
        self.addresses = ("127.0.0.1", *also_on)
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.url_on("127.0.0.1")

    def url_on(self, address: str) -> str:
        return f"redis://{address}:{self.port}/0"

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", *self.addresses, "--dir", str(self.dir),
             # no password: clients on the test's own extra addresses (a namespace's veth) are let in too
             "--protected-mode", "no" if len(self.addresses) > 1 else "yes",
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
    """A throwaway PostgreSQL cluster (initdb, trust auth on 127.0.0.1). As root it runs as `postgres`.
    `also_on`: (address, network) pairs it also listens on and trusts clients from (a namespace's link)."""

    def __init__(self, also_on: tuple[tuple[str, str], ...] = ()):
        self.bindir = _pg_bindir()
        self.also_on = also_on
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

    def url(self, db: str = "postgres", address: str = "127.0.0.1") -> str:
        return f"postgresql://stpm@{address}:{self.port}/{db}"

    def start(self) -> "Postgres":
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "stpm", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"host all all {network} trust\n" for _, network in self.also_on)
        hosts = ",".join(["127.0.0.1", *(address for address, _ in self.also_on)])
        opts = f"-h {hosts} -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off -c max_connections=200"
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


def start_postgres(also_on: tuple[tuple[str, str], ...] = ()) -> Postgres:
    """A running cluster, or skip (fail under CI) with the reason."""
    why = Postgres.available()
    if why:
        missing(why)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'stpm[scale]')")
    return Postgres(also_on).start()


def start_redis(root: Path, also_on: tuple[str, ...] = ()) -> Redis:
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (apt-get install redis-server)")
    return Redis(root, also_on).start()


class Nginx:
    """Debian's nginx on 127.0.0.1 in front of API replicas on 127.0.0.1 `ports`, with the proxy settings of
    deploy/nginx-scale.conf (its Docker resolver and `resolve` upstream replaced by those ports)."""

    SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "nginx-scale.conf"

    def __init__(self, root: Path, ports: list[int]):
        self.root, self.ports, self.port = root, ports, free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def site(self) -> str:
        """The shipped server block, pointed at the test's replicas."""
        text = self.SHIPPED.read_text()
        servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;\n" for p in self.ports)
        for pattern, new in ((r"^resolver .*\n", ""), (r"^ *server api:8000 resolve;.*\n", servers),
                             (r"listen 8080;", f"listen 127.0.0.1:{self.port};")):
            text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
            assert n == 1, f"{self.SHIPPED} changed: no line matches {pattern!r}; update tests/services.py"
        return text

    def config(self) -> str:
        temp = "".join(f"{kind}_temp_path {self.root}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root root;\n" if os.geteuid() == 0 else ""  # its workers write where this test can
        return (f"{user}daemon off;\nworker_processes 1;\npid {self.root}/nginx.pid;\n"
                f"error_log {self.root}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
                f"http {{\naccess_log off;\n{temp}{self.site()}}}\n")

    def start(self) -> Nginx:
        conf = self.root / "nginx.conf"
        conf.write_text(self.config())
        with open(self.root / "nginx.out", "ab") as out:
            self.proc = subprocess.Popen(["nginx", "-e", str(self.root / "error.log"), "-p", str(self.root), "-c",
                                          str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "nginx")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


def start_nginx(root: Path, ports: list[int]) -> Nginx:
    if shutil.which("nginx") is None:
        missing("nginx is not installed (apt-get install nginx)")
    return Nginx(root, ports).start()
