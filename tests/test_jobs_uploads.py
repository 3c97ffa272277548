"""POST /train validation and durable storage (no training runs here), the job store, archive guards."""

from __future__ import annotations

import errno
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_jobs_helpers import form, image_files, png_bytes

from app.jobs.run_job import readable_error
from app.jobs.store import JobStore
from app.jobs.uploads import Limits, UploadError, clean_incoming, store_upload
from app.main import create_app
from app.settings import Settings

LIM = Limits(min_images=3, max_images=50, max_image_bytes=1 << 20, max_archive_bytes=4 << 20, max_pixels=10**7)


@pytest.fixture()
def client(tmp_path):
    s = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", reload_interval_s=0, warmup=False,
                 train_min_images=4)
    with TestClient(create_app(s)) as c:
        yield c, tmp_path / "data"


def _stored(data: Path) -> list[Path]:
    jobs = data / "jobs"
    return sorted(jobs.iterdir()) if jobs.is_dir() else []


def test_invalid_uploads_get_422_naming_every_bad_file_and_nothing_is_stored(client):
    c, data = client
    files = image_files(5) + [
        ("files", ("broken.png", png_bytes(9)[:200], "image/png")),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("empty.png", b"", "image/png")),
    ]
    r = c.post("/train", data=form("demo"), files=files)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_upload"
    assert sorted(f["file"] for f in body["files"]) == ["broken.png", "empty.png", "notes.txt"]
    assert "broken.png" in body["detail"]
    assert _stored(data) == []
    assert c.get("/train").json()["jobs"] == []


def test_too_few_images_bad_name_and_bad_parameters_are_422(client):
    c, data = client
    r = c.post("/train", data=form("demo"), files=image_files(3))
    assert r.status_code == 422 and r.json()["error"] == "too_few_images", r.text
    assert "at least 4" in r.json()["detail"]
    r = c.post("/train", data=form("../etc"), files=image_files(5))
    assert r.status_code == 422 and r.json()["error"] == "invalid_name"
    r = c.post("/train", data=form("demo", backbone="vgg"), files=image_files(5))
    assert r.status_code == 422 and "backbone" in r.json()["detail"]
    r = c.post("/train", data=form("demo", epochs=0), files=image_files(5))
    assert r.status_code == 422 and "epochs" in r.json()["detail"]
    r = c.post("/train", data=form("demo"))
    assert r.status_code == 422 and "files" in r.json()["detail"]
    assert _stored(data) == []
    assert c.get("/train/0123456789abcdef0123456789abcdef").status_code == 404
    assert c.get("/train/nope").json()["error"] == "job_not_found"
    assert c.delete("/train/nope").status_code == 404


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_members_are_flattened_and_cannot_escape(tmp_path):
    blob = _zip({
        "../../evil.png": png_bytes(1), "/abs/path.png": png_bytes(2), "good/a.png": png_bytes(3),
        "good/b.png": png_bytes(4), "__MACOSX/good/._a.png": b"junk", "good/.DS_Store": b"junk",
    })
    out = store_upload([("set.zip", io.BytesIO(blob))], tmp_path / "jobs", "j1", LIM)
    assert out.job_dir == tmp_path / "jobs" / "j1"
    assert len(out.images) == 4
    assert all(p.parent == out.job_dir / "images" and p.is_file() for p in out.images)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert {p.name.split("-", 1)[1] for p in out.images} == {"evil.png", "path.png", "a.png", "b.png"}
    assert sorted((tmp_path / "jobs").iterdir()) == [out.job_dir]  # no .incoming- left


def test_tar_links_are_refused_and_bad_members_named(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(3):
            data = png_bytes(i)
            info = tarfile.TarInfo(f"imgs/{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("imgs/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        bad = tarfile.TarInfo("imgs/bad.png")
        bad.size = 5
        tf.addfile(bad, io.BytesIO(b"xxxxx"))
    with pytest.raises(UploadError) as e:
        store_upload([("set.tar.gz", io.BytesIO(buf.getvalue()))], tmp_path / "jobs", "j2", LIM)
    assert e.value.status == 422
    assert {f["file"] for f in e.value.files} == {"set.tar.gz:imgs/link.png", "set.tar.gz:imgs/bad.png"}
    assert list((tmp_path / "jobs").iterdir()) == []


def test_zip_bomb_is_refused_before_expanding(tmp_path):
    lim = Limits(3, 50, 8 << 20, 1 << 20, 10**7)
    blob = _zip({f"{i}.png": b"\0" * (600 << 10) for i in range(3)})  # 1.8 MB of zeros in a few KB
    assert len(blob) < 50_000
    with pytest.raises(UploadError) as e:
        store_upload([("bomb.zip", io.BytesIO(blob))], tmp_path / "jobs", "j3", lim)
    assert e.value.status == 413 and e.value.error == "archive_too_large"
    assert list((tmp_path / "jobs").iterdir()) == []


def test_archive_upload_through_the_api_and_cancel_while_queued(tmp_path):
    s = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", reload_interval_s=0, warmup=False,
                 train_min_images=4, train_concurrency=1)
    app = create_app(s)
    with TestClient(app) as c:
        app.state.job_runner.concurrency = 0  # hold the queue: nothing starts in this test
        blob = _zip({f"set/{i}.png": png_bytes(i) for i in range(5)})
        r = c.post("/train", data=form("demo", epochs=1), files=[("files", ("set.zip", blob, "application/zip"))])
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/train/{job['job_id']}"
        assert job["state"] == "queued" and job["n_images"] == 5 and job["queue_position"] == 1
        assert job["params"]["model"]["image_size"] == 64 and job["params"]["train"]["epochs"] == 1
        stored = tmp_path / "data" / "jobs" / job["job_id"] / "images"
        assert len(list(stored.iterdir())) == 5
        r = c.delete(f"/train/{job['job_id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert c.delete(f"/train/{job['job_id']}").status_code == 409
        assert [j["state"] for j in c.get("/train").json()["jobs"]] == ["cancelled"]
        assert c.get("/train", params={"state": "queued"}).json()["jobs"] == []
        assert stored.is_dir()  # retention "keep" (the default)


def test_store_claims_in_order_and_guards_by_token(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    for i in range(3):
        store.create(f"{i:032x}", "demo", {}, tmp_path, 10, None)
    job, token = store.claim_next()
    assert job.id == f"{0:032x}" and job.state == "running"
    assert store.queue_position(store.get(f"{2:032x}")) == 2
    assert not store.finish(job.id, "succeeded", token="not-the-owner", version="v1")
    assert store.finish(job.id, "failed", error="server restarted")
    assert not store.set_progress(job.id, token, {"epoch": 1})  # a late writer cannot change the truth
    assert store.get(job.id).state == "failed"


def test_clean_incoming_removes_half_stored_uploads(tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / ".incoming-abc" / "images").mkdir(parents=True)
    (jobs / "orphan").mkdir()
    (jobs / "known").mkdir()
    clean_incoming(jobs, {"known"})
    assert [p.name for p in jobs.iterdir()] == ["known"]


def test_readable_errors():
    assert readable_error(OSError(errno.ENOSPC, "No space left on device", "/data/x")).startswith("disk full")
    assert "lower batch_size" in readable_error(MemoryError())
    assert readable_error(RuntimeError("boom")) == "RuntimeError: boom"


def test_backbone_list_matches_the_library():
    pytest.importorskip("torch")
    from app.routes.train import BACKBONES
    from stpm.backbones import SPECS

    assert set(BACKBONES) == set(SPECS)
