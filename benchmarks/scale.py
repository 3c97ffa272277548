"""Scale-out benchmark (not a test): scoring throughput with 1, 2, 3 API replicas, and training-job
throughput with 1 and 2 Celery workers, on this machine, with the broker and store load per job.

    .venv/bin/python benchmarks/scale.py                       # both parts (~6 min on 2 busy cores)
    .venv/bin/python benchmarks/scale.py --skip-jobs --duration 10

Scoring: N `app.serve` processes (ONNX Runtime, 1 intra-op thread each, training off) on one random-init
ResNet18 bundle at 256 px (benchmarks/load.py builds it), K client threads in this process spreading
requests round robin over the replicas (client-side balancing: no proxy runs here). A single replica
with 2 intra-op threads is the baseline that uses both cores without replication.
Jobs: real redis-server and PostgreSQL (tests/services.py), one API, M workers (`python -m
app.celery_worker`, 1 torch thread per job), J tiny jobs (random ResNet18, 64 px, 8 images, 1 epoch,
ONNX export included) submitted at once; wall time from the first submit to the last job finished.
Broker load = Redis `total_commands_processed`, store load = PostgreSQL committed transactions and row
writes, both over the job batch and over an idle period (the workers' polling). Writes
benchmarks/results/scale.json and prints the Markdown for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]

from load import build_models, pct, test_image  # noqa: E402


def start_api(models: Path, model: str, threads: int) -> tuple[subprocess.Popen, str]:
    from services import free_port

    port = free_port()
    env = {**os.environ, "STPM_MODELS_DIR": str(models), "STPM_DEFAULT_MODEL": model, "STPM_PROVIDERS": "cpu",
           "STPM_INTRA_OP_THREADS": str(threads), "STPM_TRAIN_ENABLED": "false", "STPM_REPLICA_NAME": f"bench-{port}"}
    env.pop("STPM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"replica {url} exited")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"replica {url} not ready")


def load(urls: list[str], clients: int, duration: float, fname: str, data: bytes) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(i: int) -> None:
        nonlocal errors
        conns = [httpx.Client(base_url=u, timeout=60) for u in urls]
        n = i
        try:
            while time.perf_counter() < stop_at:
                c = conns[n % len(conns)]  # round robin, each thread starting at a different replica
                n += 1
                t0 = time.perf_counter()
                try:
                    ok = c.post("/score", files=[("files", (fname, data, "image/png"))]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        lat.append((time.perf_counter() - t0) * 1000)
                    else:
                        errors += 1
        finally:
            for c in conns:
                c.close()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "req_per_s": len(lat) / wall, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99)}


def scoring(args) -> list[dict]:
    models = Path("/tmp/stpm-load-models")
    models.mkdir(parents=True, exist_ok=True)
    model = build_models(models, 256)
    fname, data = test_image()
    rows = []
    for replicas, threads in [(1, 1), (2, 1), (3, 1), (1, 2)]:
        procs = [start_api(models, model, threads) for _ in range(replicas)]
        try:
            for p, u in procs:
                wait_ready(u, p)
            urls = [u for _, u in procs]
            load(urls, args.clients, 2.0, fname, data)  # warm every replica's HTTP path
            la = os.getloadavg()[0]
            r = load(urls, args.clients, args.duration, fname, data)
            r.update(replicas=replicas, intra_op_threads=threads, clients=args.clients, load_avg_before=la)
            rows.append(r)
            print(f"{replicas} replica(s) x {threads} thread(s): {r['req_per_s']:.2f} req/s, p50 {r['p50_ms']:.0f} ms,"
                  f" p99 {r['p99_ms']:.0f} ms, errors {r['errors']} (load {la:.1f})", flush=True)
        finally:
            for p, _ in procs:
                p.terminate()
            for p, _ in procs:
                p.wait(30)
    return rows


def _counters(redis_url: str, pg_url: str) -> dict:
    import psycopg
    import redis

    info = redis.Redis.from_url(redis_url).info("stats")
    with psycopg.connect(pg_url) as c:
        xact, ins, upd, ret = c.execute(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_returned FROM pg_stat_database"
            " WHERE datname = current_database()").fetchone()
    return {"redis_commands": info["total_commands_processed"], "pg_commits": xact, "pg_rows_inserted": ins,
            "pg_rows_updated": upd, "pg_rows_read": ret, "t": time.monotonic()}


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def jobs(args) -> list[dict]:
    import psycopg

    from scale_cluster import Cluster
    from services import Postgres, Redis
    from test_jobs_helpers import finished, form, image_files

    rows = []
    for workers in (1, 2):
        root = Path(tempfile.mkdtemp(prefix="stpm-scale-bench-"))
        redis = Redis(root / "redis").start()
        pg = Postgres().start()
        db = pg.create_db("stpm")
        c = Cluster(root, redis, pg, db, {"STPM_TRAIN_MIN_IMAGES": "8"})
        try:
            c.start_api("api", wait=False)
            for w in range(workers):
                c.start_worker(f"w{w + 1}", wait=False)
            c.wait_api("api")
            for w in range(workers):
                c.wait_worker(f"w{w + 1}")
            time.sleep(2.0)
            idle0 = _counters(redis.url, db)
            time.sleep(args.idle)
            idle1 = _counters(redis.url, db)
            with httpx.Client(base_url=c.url("api"), timeout=60) as h:
                t0 = time.monotonic()
                la = os.getloadavg()[0]
                ids = []
                for i in range(args.jobs):
                    r = h.post("/train", data=form("bench", epochs=1, seed=i), files=image_files(8, seed0=10 * i))
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["job_id"])
                done: dict[str, dict] = {}
                while len(done) < len(ids):  # one list request per second (its store reads are counted too)
                    for job in h.get("/train", params={"limit": args.jobs}).json()["jobs"]:
                        if finished(job):
                            done[job["job_id"]] = job
                    time.sleep(1.0)
                wall = time.monotonic() - t0
            end = _counters(redis.url, db)
            batch = _delta(idle1, end)
            idle = _delta(idle0, idle1)
            states = [j["state"] for j in done.values()]
            per_job = {k: round(v / args.jobs, 1) for k, v in batch.items() if k != "t"}
            idle_rate = {k: round(v / idle["t"], 2) for k, v in idle.items() if k != "t"}
            with psycopg.connect(db) as conn:
                durations = [r[0] for r in conn.execute(
                    "SELECT finished_at - started_at FROM jobs WHERE state = 'succeeded'").fetchall()]
            row = {"workers": workers, "jobs": args.jobs, "states": states, "wall_s": round(wall, 1),
                   "jobs_per_min": round(args.jobs / wall * 60, 2),
                   "mean_job_s": round(statistics.fmean(durations), 1) if durations else None,
                   "per_job_during_batch": per_job, "idle_per_s": idle_rate, "load_avg_before": la}
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            c.stop_processes()
            redis.stop()
            pg.destroy()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per replica count")
    ap.add_argument("--clients", type=int, default=6, help="concurrent client threads")
    ap.add_argument("--jobs", type=int, default=4, help="training jobs per worker count")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle broker/store traffic measured")
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument("--skip-jobs", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "when": time.strftime("%Y-%m-%d %H:%M")}
    if not args.skip_scoring:
        result["scoring"] = scoring(args)
    if not args.skip_jobs:
        result["jobs"] = jobs(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    from benchmarks import report
    from benchmarks.report_speed import scale_markdown

    print(scale_markdown(result))
    report.publish(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
