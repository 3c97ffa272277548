"""Faults of the scaled-out mode, with the real servers (Debian's redis-server, PostgreSQL, nginx): three API
replicas and one Celery worker on 127.0.0.1, and a worker on another "host" (a network namespace joined
by a veth pair: tests/netns.py) for the one fault where a host must disappear.

1. Redis restarted with jobs queued: the queued jobs, and one submitted while it was down, run once each.
2. PostgreSQL restarted mid-job: the job succeeds, no row is lost; while the database is away every
   replica answers the job routes with 503 and the reason (JSON), and keeps scoring; then serves again
   without a restart.
3. A worker's host cut off mid-job (its link taken down): the job is failed by the heartbeat rule within
   job_stale_after_s + one sweep; the cut-off training process stops by itself; nothing is published.
4. A replica killed under load behind nginx (deploy/nginx-scale.conf's proxy settings): only requests in
   flight on it fail; every later request is served by the others.

Short heartbeats and timeouts; tiny jobs (random ResNet18 at 64 px, 8 images). With STPM_FAULTS_RESULT=PATH
the measured times and counts are written there (benchmarks/scale_faults.py makes the result file of
docs/SCALING.md's table from it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from netns import Namespace, unavailable
from scale_cluster import Cluster
from services import missing, start_nginx, start_postgres, start_redis
from test_jobs_helpers import (
    finished,
    form,
    image_files,
    leftovers,
    pid_alive,
    png_bytes,
    training,
    visible_versions,
    wait_dead,
    wait_for,
)

from app.jobs.store import JobStore

pytest.importorskip("torch", reason="training needs torch")
pytestmark = pytest.mark.slow

STALE_AFTER_S = 8.0
SWEEP_S = min(5.0, STALE_AFTER_S / 4)  # app.jobs.celery_queue.sweep_interval
HEARTBEAT_S = 0.5
SLACK_S = 3.0  # polling and a busy 2-core machine's scheduling, on top of a stated time
APIS = ("api-a", "api-b", "api-c")
ENV = {
    "STPM_TRAIN_MIN_IMAGES": "8",
    "STPM_JOB_HEARTBEAT_S": str(HEARTBEAT_S),
    "STPM_JOB_STALE_AFTER_S": str(STALE_AFTER_S),
    "STPM_BROKER_VISIBILITY_TIMEOUT_S": "8",
    "STPM_TRAIN_CANCEL_GRACE_S": "10",
}
RESULT: dict[str, dict] = {}  # what the tests measured; written to $STPM_FAULTS_RESULT


@pytest.fixture(scope="module")
def namespace():
    """(Namespace, None), or (None, why there is none): only the cut-off test needs it."""
    why = unavailable()
    ns = None
    if why is None:
        try:
            ns = Namespace("w").create()
        except (RuntimeError, OSError) as e:
            why = f"cannot make a network namespace with a veth pair here: {e}"
    try:
        yield ns, why
    finally:
        if ns is not None:
            ns.destroy()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, namespace):
    try:
        import celery  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as e:
        missing(f"the scale extra is not installed ({e}): pip install 'stpm[scale]'")
    ns = namespace[0]
    root = tmp_path_factory.mktemp("faults")
    redis = start_redis(root / "redis", (ns.host_ip,) if ns else ())
    pg = start_postgres(((ns.host_ip, str(ns.subnet)),) if ns else ())
    c = Cluster(root, redis, pg, pg.create_db("stpm"), ENV)
    try:
        for name in APIS:
            c.start_api(name, wait=False)
        c.start_worker("w1", wait=False)
        for name in APIS:
            c.wait_api(name)
        c.wait_worker("w1")
        yield c
    finally:
        c.stop_processes()
        redis.stop()
        pg.destroy()
        if os.environ.get("STPM_FAULTS_RESULT"):
            Path(os.environ["STPM_FAULTS_RESULT"]).write_text(json.dumps(RESULT, indent=2))


def client(c: Cluster, api: str) -> httpx.Client:
    return httpx.Client(base_url=c.url(api), timeout=60)


def store(c: Cluster) -> JobStore:
    return JobStore(c.env["STPM_JOBS_DB"], pool_size=1)


def submit(h: httpx.Client, name: str, seed: int = 0, **params) -> str:
    r = h.post("/train", data=form(name, seed=seed, **params), files=image_files(8, seed0=10 * seed))
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def claims(c: Cluster, job_id: str) -> int:
    """How many times a worker claimed the job (ran it), from every worker's log."""
    claimed = re.compile(rf"job {job_id} \([^)]*\): claimed by ")
    return sum(len(claimed.findall(p.read_text(errors="replace"))) for p in c.logs.glob("w*.log"))


def published_model(c: Cluster) -> str:
    """NAME/VERSION of a published version (one trained here if the tests before published none)."""
    with client(c, "api-a") as a:
        for m in a.get("/models").json()["models"]:
            if m["versions"]:
                return f"{m['name']}/{m['versions'][-1]['version']}"
        if "w1" in c.workers:
            c.wait_worker("w1")
        job = wait_for(a, submit(a, "fallback", epochs=1), finished, timeout=300, what="a model to score with")
    assert job["state"] == "succeeded", job
    return job["model"]


# ---------------------------------------------------------------------------------------- 1. Redis


def test_redis_restarted_with_jobs_queued_runs_each_queued_job_once(cluster):
    c = cluster
    with client(c, "api-a") as a:
        first = submit(a, "redisq", seed=0, epochs=5)
        wait_for(a, first, training, timeout=120, what="the first job to train")  # w1 is busy with it
        queued = submit(a, "redisq", seed=1, epochs=1)
        assert a.get(f"/train/{queued}").json()["state"] == "queued"
        assert store(c).get(queued).enqueued_at is not None  # its task waits in Redis
        t_down = time.monotonic()
        c.redis.stop()
        try:
            during = submit(a, "redisq", seed=2, epochs=1)  # 202 all the same: the sweep sends its task later
        finally:
            c.redis.start()
        down_s = time.monotonic() - t_down
        t_up, up_at = time.monotonic(), time.time()
        jobs = [wait_for(a, j, finished, timeout=300, what="the jobs after the Redis restart")
                for j in (first, queued, during)]
        after_s = time.monotonic() - t_up
    assert [j["state"] for j in jobs] == ["succeeded"] * 3, [(j["state"], j["error"]) for j in jobs]
    assert sorted(j["version"] for j in jobs) == ["v1", "v2", "v3"]  # one version per job: none ran twice
    assert visible_versions(c.models, "redisq") == ["v1", "v2", "v3"]
    runs = [claims(c, j["job_id"]) for j in jobs]
    assert runs == [1, 1, 1], runs
    sent_s = store(c).get(during).enqueued_at - up_at  # the sweep's resend, after Redis came back
    duplicates = sum(p.read_text(errors="replace").count("nothing to do") for p in c.logs.glob("w*.log"))
    RESULT["redis_restart"] = {"jobs": 3, "queued_in_redis": 1, "submitted_while_down": 1,
                               "broker_down_s": round(down_s, 1), "all_done_after_s": round(after_s, 1),
                               "sent_after_restart_s": round(sent_s, 1),
                               "runs_per_job": runs, "duplicate_deliveries": duplicates}


# ----------------------------------------------------------------------------------- 2. PostgreSQL


def probe_while_down(c: Cluster, job_id: str, model: str) -> dict[str, int]:
    """Every replica's job routes answer 503 with the reason; scoring and health still answer 200."""
    seen = {"503": 0, "score_ok": 0}
    jobs_dirs = set((c.data / "jobs").iterdir())
    for api in APIS:
        with client(c, api) as h:
            for r in (h.get("/train"), h.get(f"/train/{job_id}"),
                      h.post("/train", data=form("never"), files=image_files(8, seed0=500))):
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["error"] == "job_store_unavailable", body
                assert "job database" in body["detail"] and "unreachable" in body["detail"], body
                assert r.headers["retry-after"] == "5"
                seen["503"] += 1
            r = h.post("/score", params={"model": model}, files=[("files", ("q.png", png_bytes(99), "image/png"))])
            assert r.status_code == 200, r.text
            seen["score_ok"] += 1
            assert h.get("/healthz").status_code == 200
    assert set((c.data / "jobs").iterdir()) == jobs_dirs  # the refused upload left nothing behind
    return seen


def wait_serving(c: Cluster, timeout: float = 60.0) -> float:
    """Seconds until every replica answers GET /train with 200 again (no replica restarted)."""
    t0 = time.monotonic()
    for api in APIS:
        with client(c, api) as h:
            while h.get("/train").status_code != 200:
                assert time.monotonic() - t0 < timeout, f"{api} still cannot reach the job database"
                time.sleep(0.1)
    return time.monotonic() - t0


def test_postgres_restarted_mid_job_loses_nothing_and_the_api_answers_503_meanwhile(cluster):
    c = cluster
    model = published_model(c)
    with client(c, "api-b") as b:
        job_id = submit(b, "pgjob", epochs=6)
        wait_for(b, job_id, training, timeout=120, what="the job to train")
        before = {j["job_id"]: j["state"] for j in b.get("/train", params={"limit": 1000}).json()["jobs"]}
    pid = store(c).get(job_id).pid
    t_down = time.monotonic()
    c.postgres.stop()
    try:
        seen = probe_while_down(c, job_id, model)
        assert pid_alive(pid)  # the training process waits for its database instead of failing
    finally:
        restarted_at = time.time()
        c.postgres.start()
    down_s = time.monotonic() - t_down
    recovered_s = wait_serving(c)
    with client(c, "api-a") as a:
        job = wait_for(a, job_id, finished, timeout=300, what="the job after the restart")
        after = {j["job_id"]: j for j in a.get("/train", params={"limit": 1000}).json()["jobs"]}
    assert down_s < STALE_AFTER_S, f"the database was down {down_s:.1f} s: longer than the stale time, the test's premise"
    assert job["state"] == "succeeded" and job["error"] is None, job
    assert datetime.fromisoformat(job["finished_at"]).timestamp() > restarted_at  # it lived through the restart
    assert set(before) <= set(after)
    assert all(after[j]["state"] == s for j, s in before.items() if s != "running")
    RESULT["postgres_restart"] = {"db_down_s": round(down_s, 1), "answers_503": seen["503"],
                                  "scores_while_down": seen["score_ok"], "serving_again_after_s": round(recovered_s, 2),
                                  "job": job["state"], "rows_before": len(before), "rows_kept": len(set(before) & set(after))}


# ---------------------------------------------------------------------------------- 3. a host cut off


def start_cut_worker(c: Cluster, ns: Namespace) -> None:
    """`w-cut` inside the namespace, reaching Redis and PostgreSQL over the veth pair (short TCP timeouts)."""
    db = c.postgres.url("stpm", ns.host_ip) + "?connect_timeout=2&tcp_user_timeout=2000"
    c.start_worker("w-cut", prefix=ns.prefix(), env={"STPM_BROKER_URL": c.redis.url_on(ns.host_ip), "STPM_JOBS_DB": db})


def test_a_worker_host_cut_off_mid_job_fails_the_job_in_time_and_publishes_nothing(cluster, namespace):
    ns, why = namespace
    if ns is None:
        missing(why)
    c = cluster
    w1 = c.workers.pop("w1")  # the job must run on the host that will be cut off
    w1.terminate()
    w1.wait(60)
    try:
        start_cut_worker(c, ns)
        with client(c, "api-a") as a:
            job_id = submit(a, "cut", epochs=500)
            job = wait_for(a, job_id, training, timeout=120, what="the job to train on the namespace's worker")
            assert job["worker"] == "w-cut@test", job
            pid = store(c).get(job_id).pid
            ns.cut()  # healed below, or in `finally` if a check fails first
            t_cut = time.monotonic()
            job = wait_for(a, job_id, finished, timeout=STALE_AFTER_S + 60, what="the cut-off job to be failed")
            failed_s = time.monotonic() - t_cut
            assert job["state"] == "failed", job
            assert "its worker w-cut@test stopped sending heartbeats" in job["error"], job
            assert failed_s <= STALE_AFTER_S + SWEEP_S + SLACK_S, failed_s
            assert visible_versions(c.models, "cut") == [] and leftovers(c.models) == []
            wait_dead(pid, timeout=STALE_AFTER_S + 60)  # it cannot confirm its row: it gives up, unpublished
            stopped_s = time.monotonic() - t_cut
            assert visible_versions(c.models, "cut") == [] and leftovers(c.models) == []
            assert "stopped after waiting" in (Path(store(c).get(job_id).job_dir) / "log.txt").read_text()
            ns.heal()
            healed_s = rejoined(c, "w-cut")
            now = a.get(f"/train/{job_id}").json()  # back on the network: its late ack or redelivery changes nothing
            assert (now["state"], now["error"], now["version"]) == ("failed", job["error"], None), now
            assert "cut" not in [m["name"] for m in a.get("/models").json()["models"]]
    finally:
        ns.heal()
        if "w-cut" in c.workers:
            c.kill_worker("w-cut")
        c.start_worker("w1", wait=False)
    RESULT["worker_cut"] = {"stale_after_s": STALE_AFTER_S, "sweep_s": SWEEP_S, "heartbeat_s": HEARTBEAT_S,
                            "failed_after_s": round(failed_s, 1), "training_stopped_after_s": round(stopped_s, 1),
                            "versions": 0, "staging_left": 0, "worker_answers_after_heal_s": round(healed_s, 1)}


def rejoined(c: Cluster, name: str, timeout: float = 120.0) -> float:
    """Seconds until the healed worker answers a ping over the broker again."""
    t0 = time.monotonic()
    while not c.ping(name):
        assert time.monotonic() - t0 < timeout, f"{name} did not answer after its link came back"
    return time.monotonic() - t0


# ------------------------------------------------------------------------------ 4. a replica killed


class Load:
    """`clients` threads POSTing /score through the proxy, each request's (start, end, status) recorded."""

    def __init__(self, url: str, model: str, clients: int):
        self.url, self.model, self.clients = url, model, clients
        self.records: list[tuple[float, float, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        image = png_bytes(99)
        with httpx.Client(base_url=self.url, timeout=60) as h:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    status = h.post("/score", params={"model": self.model},
                                    files=[("files", ("q.png", image, "image/png"))]).status_code
                except httpx.HTTPError:
                    status = 0
                self.records.append((t0, time.monotonic(), status))

    def wait_served(self, n: int, after: float = 0.0, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for t0, _, s in list(self.records) if t0 >= after and s == 200) < n:
            assert time.monotonic() < deadline, f"fewer than {n} requests served in {timeout} s"
            time.sleep(0.05)


def test_a_replica_killed_under_load_fails_only_its_in_flight_requests(cluster):
    c = cluster
    model = published_model(c)
    ports = [int(c.url(api).rsplit(":", 1)[1]) for api in APIS]
    proxy = start_nginx(c.root / "nginx", ports)
    load = Load(proxy.url, model, clients=6)
    try:
        for t in load.threads:
            t.start()
        load.wait_served(40)
        victim, _ = c.apis.pop("api-c")
        t_kill = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        t_gone = time.monotonic()  # every socket of the replica is closed from here on
        load.wait_served(60, after=t_gone)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(60)
        proxy.stop()
    records = list(load.records)
    failed = [r for r in records if r[2] != 200]
    assert all(r[0] < t_gone and r[1] > t_kill for r in failed), [(r[0] - t_kill, r[1] - t_kill) for r in failed]
    assert len(failed) <= load.clients  # one request per client at most: the one it had in flight
    assert all(s == 200 for t0, _, s in records if t0 >= t_gone)
    RESULT["replica_kill"] = {"replicas": len(APIS), "clients": load.clients, "requests": len(records),
                              "failed": len(failed), "kill_to_reaped_s": round(t_gone - t_kill, 3),
                              "in_flight_at_kill": sum(1 for r in records if r[0] < t_kill < r[1]),
                              "served_after_kill": sum(1 for t0, _, s in records if t0 >= t_gone and s == 200),
                              "failed_statuses": sorted({r[2] for r in failed}),
                              "failed_started_ms_before_kill": sorted(round((t_kill - r[0]) * 1000) for r in failed)}

