"""Issue 24 #5 and #11: state checks race the changes they guard. Many cheap trials each.

#5: `POST .../versions/v2/activate` and a non-forced `DELETE .../versions/v2` at the same moment both
answered 200 in 1 of 12 trials, leaving the name without an active version: the delete's "is it active?"
ran outside the name's lock. Exactly one may win: activate 200 + delete 409, or delete 200 + activate 404.

Publishing: two versions of one name published at the same moment must get two numbers, both kept.

#11: with `train_max_queued=2`, four simultaneous submits were all accepted: the queue was counted outside
the insert. At most `train_max_queued` jobs may ever be queued.

Each trial is cheap: bundles are a manifest only (copied from the tiny test bundle) served by a scorer that
loads nothing; the training worker never runs (the test holds its leader lock); uploads are 48 px PNGs.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_helpers import png, synthetic_rgb

from app.main import create_app
from app.settings import Settings
from stpm import bundle

TRIALS = 200


class InstantScorer:
    """What the registry needs of a scorer to load and activate a version; loading takes 0-3 ms."""

    providers = ("CPUExecutionProvider",)

    def __init__(self, path: Path):
        time.sleep(random.uniform(0, 0.003))
        if not (path / bundle.MANIFEST).is_file():
            raise bundle.ModelNotFoundError(f"{path.parent.name}/{path.name} does not exist")

    def warmup(self) -> None:
        pass


def publish_tiny(models: Path, name: str = "demo") -> str:
    """A version that is a manifest only (nothing else is read by InstantScorer); -> its version."""
    staging = bundle.new_staging_dir(models, name)
    man = {"format_version": 2, "name": name, "model": {"method": "stpm", "backbone": "resnet18", "image_size": 64},
           "calibration": {"threshold": 1.0, "low": 0.0}}
    (staging / bundle.MANIFEST).write_text(json.dumps(man))
    return bundle.publish(staging, models, name)[0]


def at_once(*calls):
    """Run the calls in threads released together; -> their results in order."""
    start = threading.Barrier(len(calls))
    out: list = [None] * len(calls)

    def run(i, call):
        start.wait()
        out[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.fixture()
def fast_dir(tmp_path):
    """A folder in memory where the machine has one (/dev/shm): the store's fsyncs cost nothing there, so a
    trial costs milliseconds even on a loaded machine."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="stpm-races-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_activate_and_delete_never_both_win(fast_dir):
    models = fast_dir / "models"
    assert publish_tiny(models) == "v1"  # the first version: active
    s = Settings(_env_file=None, models_dir=models, reload_interval_s=0, warmup=False)
    outcomes: dict[tuple[int, int], int] = {}
    with TestClient(create_app(s, scorer_factory=InstantScorer)) as c:
        for _ in range(TRIALS):
            v = publish_tiny(models)
            activate, delete = at_once(lambda v=v: c.post(f"/models/demo/versions/{v}/activate"),
                                       lambda v=v: c.delete(f"/models/demo/versions/{v}"))
            key = (activate.status_code, delete.status_code)
            outcomes[key] = outcomes.get(key, 0) + 1
            active = bundle.get_active(models, "demo")
            assert key in {(200, 409), (404, 200)}, (key, activate.text, delete.text)
            if key == (200, 409):
                assert active == v and (models / "demo" / v).is_dir()
                assert delete.json()["error"] == "version_in_use"
                bundle.set_active(models, "demo", "v1")
                bundle.delete_version(models, "demo", v)
            else:
                assert active == "v1" and not (models / "demo" / v).exists()
                assert activate.json()["error"] == "model_not_found" and "stpm export" not in activate.text
    print(f"{TRIALS} trials: {outcomes}")  # both orders happen (the race is real)
    assert sum(outcomes.values()) == TRIALS


@pytest.fixture()
def no_worker(fast_dir):
    """Hold the training worker's leader lock: the server's local worker never claims a job."""
    data = fast_dir / "data"
    data.mkdir()
    fd = os.open(data / "worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield data
    os.close(fd)


def test_the_queue_cap_holds_under_concurrent_submits(fast_dir, no_worker):
    models = fast_dir / "models"
    publish_tiny(models)
    cap, clients = 2, 4
    s = Settings(_env_file=None, models_dir=models, reload_interval_s=0, warmup=False, data_dir=no_worker,
                 train_min_images=3, train_max_queued=cap)
    images = [("files", (f"g{i}.png", png(synthetic_rgb(i, 48)), "image/png")) for i in range(3)]
    form = {"name": "raced", "method": "stpm", "backbone": "resnet18", "pretrained": "false", "epochs": "1"}
    accepted_counts: dict[int, int] = {}
    with TestClient(create_app(s, scorer_factory=InstantScorer)) as c:
        for _ in range(TRIALS):
            answers = at_once(*[lambda: c.post("/train", data=form, files=images)] * clients)
            codes = sorted(r.status_code for r in answers)
            accepted = [r.json()["job_id"] for r in answers if r.status_code == 202]
            assert set(codes) <= {202, 429}, [r.text for r in answers]
            assert len(accepted) == cap, codes
            queued = c.get("/train", params={"state": "queued"}).json()["jobs"]
            assert len(queued) == cap
            accepted_counts[len(accepted)] = accepted_counts.get(len(accepted), 0) + 1
            for job_id in accepted:
                assert c.delete(f"/train/{job_id}").status_code == 200
        assert c.get("/train", params={"state": "queued"}).json()["jobs"] == []
    shutil.rmtree(no_worker / "jobs", ignore_errors=True)
    print(f"{TRIALS} trials of {clients} submits: accepted {accepted_counts}")


def test_simultaneous_publishes_get_distinct_versions(fast_dir):
    models = fast_dir / "models"
    publish_tiny(models)
    for _ in range(TRIALS):
        a, b = at_once(lambda: publish_tiny(models), lambda: publish_tiny(models))
        assert a != b and (models / "demo" / a).is_dir() and (models / "demo" / b).is_dir(), (a, b)
    versions = sorted(int(p.name[1:]) for p in (models / "demo").glob("v*"))
    assert versions == list(range(1, 2 * TRIALS + 2))
