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
    r = c.post("/train", data=form("demo"))  # no file: httpx sends a urlencoded form
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = c.post("/train", data=form("demo"), files=[("note", (None, b"no images here"))])
    assert r.status_code == 422 and "'files'" in r.json()["detail"]
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
        assert not stored.exists()  # retention "delete" (the default): uploads go when the job ends
        assert c.get(f"/train/{job['job_id']}").json()["uploads_kept"] is False


def _tar(members: list[tuple[str, bytes]], mode: str = "w:bz2", declared: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _lying_tar(declared_size: int) -> bytes:
    """A tar whose only member claims `declared_size` bytes and carries a few (a bomb's header)."""
    info = tarfile.TarInfo("huge.png")
    info.size = declared_size
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096


@pytest.mark.parametrize("kind", ["oversized_members", "junk_member", "lying_header"])
def test_tar_bombs_count_against_the_archive_cap(tmp_path, kind):
    """Issue 14 #3: members over the per-image cap (and junk) were skipped without counting, yet
    decompressed; a 118 KB tar.bz2 holding 16 GiB kept the server busy long after the client left."""
    lim = Limits(3, 50, max_image_bytes=1 << 20, max_archive_bytes=4 << 20, max_pixels=10**7)
    blob = {
        # six 2 MiB members: each over the per-image cap, together over the 4 MiB archive cap
        "oversized_members": lambda: _tar([(f"{i}.png", b"\0" * (2 << 20)) for i in range(6)]),
        # a 6 MiB junk member (skipped as junk, still decompressed)
        "junk_member": lambda: _tar([(".DS_Store", b"\0" * (6 << 20))] + [(f"{i}.png", png_bytes(i)) for i in range(3)]),
        # a header declaring 16 GiB: refused from the header, nothing decompressed
        "lying_header": lambda: _lying_tar(16 << 30),
    }[kind]()
    assert len(blob) < 40_000  # the three small PNGs are most of it
    with pytest.raises(UploadError) as e:
        store_upload([("bomb.tar.bz2" if kind != "lying_header" else "bomb.tar", io.BytesIO(blob))],
                     tmp_path / "jobs", "jb", lim)
    assert e.value.status == 413 and e.value.error == "archive_too_large", (e.value.status, e.value.detail)
    assert "train_max_archive_bytes" in e.value.detail
    assert list((tmp_path / "jobs").iterdir()) == []


def test_archives_with_too_many_entries_are_refused_before_parsing(tmp_path):
    lim = Limits(3, 10, 1 << 20, 4 << 20, 10**7)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(200):  # folders only: never counted as images, but parsed one by one
            zf.writestr(f"d{i}/", b"")
    with pytest.raises(UploadError) as e:
        store_upload([("dirs.zip", io.BytesIO(buf.getvalue()))], tmp_path / "jobs", "jz", lim)
    assert e.value.status == 413 and "200 entries" in e.value.detail
    dirs = io.BytesIO()
    with tarfile.open(fileobj=dirs, mode="w:gz") as tf:
        for i in range(200):
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    with pytest.raises(UploadError) as e:
        store_upload([("dirs.tgz", io.BytesIO(dirs.getvalue()))], tmp_path / "jobs", "jt", lim)
    assert e.value.status == 413 and "entries" in e.value.detail


def test_xz_with_a_huge_dictionary_is_refused(tmp_path, monkeypatch):
    import lzma

    from app.jobs import uploads

    monkeypatch.setattr(uploads, "XZ_MEMLIMIT", 1 << 20)  # the real limit is 256 MiB; 8 MiB dict here
    raw = _tar([(f"{i}.png", png_bytes(i)) for i in range(4)], mode="w")
    blob = lzma.compress(raw, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 8 << 20}])
    with pytest.raises(UploadError) as e:
        store_upload([("set.tar.xz", io.BytesIO(blob))], tmp_path / "jobs", "jx", LIM)
    assert e.value.status == 422 and "Memory usage limit" in e.value.detail
    monkeypatch.undo()
    ok = lzma.compress(raw, format=lzma.FORMAT_XZ)
    assert len(store_upload([("set.tar.xz", io.BytesIO(ok))], tmp_path / "jobs", "jy", LIM).images) == 4


def test_training_queue_is_capped(tmp_path):
    s = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", reload_interval_s=0, warmup=False,
                 train_min_images=4, train_max_queued=2)
    app = create_app(s)
    with TestClient(app) as c:
        app.state.job_runner.concurrency = 0  # nothing starts: jobs stay queued
        for i in range(2):
            assert c.post("/train", data=form("demo"), files=image_files(4, seed0=10 * i)).status_code == 202
        r = c.post("/train", data=form("demo"), files=image_files(4, seed0=50))
        assert r.status_code == 429 and r.json()["error"] == "queue_full", r.text
        assert "train_max_queued" in r.json()["detail"] and r.headers["retry-after"] == "60"
        assert len(c.get("/train").json()["jobs"]) == 2
        assert len(list((tmp_path / "data" / "jobs").iterdir())) == 2  # nothing stored for the refused one


@pytest.mark.parametrize("params", [{"offset": "18446744073709551616"}, {"offset": "-1"}, {"limit": "0"},
                                    {"limit": "100000"}, {"offset": "1e3"}])
def test_list_parameters_are_bounded(client, params):
    c, _ = client
    r = c.get("/train", params=params)
    assert r.status_code == 422 and r.json()["error"] == "validation_error", r.text
    assert next(iter(params)) in r.json()["detail"]


@pytest.mark.parametrize("field,value", [("epochs", "18446744073709551616"), ("lr", "nan"), ("lr", "inf"),
                                         ("momentum", "-inf"), ("patience", str(10**12)), ("max_steps", str(10**30)),
                                         ("val_fraction", "NaN"), ("weight_decay", "1e999")])
def test_train_numbers_are_bounded(client, field, value):
    c, data = client
    r = c.post("/train", data=form("demo", **{field: value}), files=image_files(5))
    assert r.status_code == 422 and r.json()["error"] == "validation_error", r.text
    assert field in r.json()["detail"]
    assert _stored(data) == []


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


def test_backbone_choices_are_the_library_table():
    from app.routes.train import API_OPTIONS
    from stpm.methods.backbone_specs import BACKBONES

    backbone = next(o for o in API_OPTIONS if o.name == "backbone")
    assert backbone.choices == tuple(BACKBONES)
