"""Issue 24: the twelve defects a hostile review of the service found, each reproduced as the review did it.

In-process (TestClient) wherever the defect does not need a real server; the server limits (#4), the
races (#5, #11) and the request budget's measured cost (#2, #3) have their own tests
(test_api_server_limits.py, test_api_races.py, benchmarks/request_limits.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_api_helpers import build_bundle, make_store, png, synthetic_rgb

from app.jobs.run_job import readable_error
from app.main import create_app
from app.settings import Settings
from stpm import bundle
from stpm.imaging.geometry import Geometry


def settings(models_dir: Path, **kw) -> Settings:
    return Settings(_env_file=None, models_dir=models_dir, reload_interval_s=0, **kw)


def upload(*blobs: bytes, field: str = "files") -> list:
    return [(field, (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def solid_png(w: int, h: int) -> bytes:
    """Many pixels in few bytes (the review's black PNGs)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path, versions=2)


@pytest.fixture(scope="module")
def tiled_store(tmp_path_factory):
    """The review's model: through POST /train's bounds of the time, `scale=4 max_tiles=4096 image_size=64`."""
    models = tmp_path_factory.mktemp("tiled") / "models"
    build_bundle(models, "fine", geometry=Geometry(64, scale=4.0, max_tiles=4096))
    return models


def no_decoding(monkeypatch) -> list[str]:
    """Fail loudly if any image of the request is decoded; -> the names decoding was asked for."""
    from stpm.runtime import images

    asked: list[str] = []

    def refuse(data, name="<bytes>", max_pixels=0):
        asked.append(name)
        raise AssertionError(f"{name} was decoded")

    monkeypatch.setattr(images, "decode_image", refuse)
    return asked


# ----------------------------------------------------------------------------- 1: /ui/%00


@pytest.mark.parametrize("path", ["/ui/%00", "/ui/a%00.js", "/ui/%ff%fe", "/ui/" + "a" * 5000 + ".js",
                                  "/ui/..%2findex.html", "/ui/%2e%2e"])
def test_1_odd_asset_names_are_404_not_500(store, path):
    with TestClient(create_app(settings(store)), raise_server_exceptions=False) as c:
        r = c.get(path)
        assert r.status_code == 404, r.text
        assert r.json()["error"] == "not_found"


# ----------------------------------------------------------------------------- 2 + 3: the request budget


def test_2_a_refused_tile_count_is_refused_before_any_pixel_is_decoded(tiled_store, monkeypatch):
    """Three large black PNGs that the model's geometry refuses: 422 from the headers, nothing decoded."""
    with TestClient(create_app(settings(tiled_store))) as c:
        asked = no_decoding(monkeypatch)
        big = solid_png(1100, 1100)  # 4400 x 4400 at scale 4: 8281 tiles of 64 px (max_tiles 4096)
        r = c.post("/score", files=upload(big, big, big))
        assert r.status_code == 422 and r.json()["error"] == "unsupported_image_size", r.text
        assert "max_tiles" in r.json()["detail"] and asked == []


def test_2_reading_a_png_s_header_loads_no_pixels(tiled_store, monkeypatch):
    """PIL's PNG getexif() decodes the whole image when the eXIf chunk is not before the pixels: the header
    read must not ask for it (the review's 3 x 6300 x 6300 black PNGs cost 0.8 CPU-s and +152 MB that way,
    benchmarks/request_limits.py)."""
    from PIL import PngImagePlugin

    def no_load(self):
        raise AssertionError(f"{self.size} PNG loaded while reading its header")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    with TestClient(create_app(settings(tiled_store))) as c:
        asked = no_decoding(monkeypatch)
        r = c.post("/score", files=upload(solid_png(6300, 6300), solid_png(6300, 6300), solid_png(6300, 6300)))
        assert r.status_code == 422 and r.json()["error"] == "unsupported_image_size", r.text
        assert asked == []


def test_2_an_exif_orientation_before_the_pixels_is_still_read_from_the_header():
    from stpm.runtime.images import header_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: height and width swap
    buf = io.BytesIO()
    Image.new("RGB", (40, 10)).save(buf, format="PNG", exif=exif)
    assert header_size(buf.getvalue()) == (40, 10)


def test_3_the_work_a_model_makes_of_a_request_is_bounded_before_decoding(tiled_store, monkeypatch):
    """One 770 x 770 image (0.6 % of the pixel budget) becomes 4,096 tiles at scale 4: refused from its
    header by the tile budget (model pixels: tiles x tile^2), not scored for 22 CPU-s."""
    with TestClient(create_app(settings(tiled_store))) as c:
        asked = no_decoding(monkeypatch)
        r = c.post("/score", files=upload(solid_png(770, 770)))
        assert r.status_code == 413 and r.json()["error"] == "too_many_tiles", r.text
        detail = r.json()["detail"]
        assert "4096 tiles" in detail and "max_request_tile_pixels" in detail and asked == []


def test_3_small_enough_images_of_the_same_model_are_scored(tiled_store):
    with TestClient(create_app(settings(tiled_store))) as c:
        r = c.post("/score", files=upload(png(synthetic_rgb(1, 40))))  # 160 px at scale 4: 9 tiles
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["tiles"] == 9


def test_3_training_options_cannot_make_such_a_model():
    from stpm.options import MAX_TILE_PIXELS, build

    with pytest.raises(ValueError, match="max_tiles"):
        build({"scale": 4, "max_tiles": 4096, "image_size": 64})
    # the largest legal tile budget of one image fits the server's default request budget
    assert MAX_TILE_PIXELS <= Settings(_env_file=None).max_request_tile_pixels
    build({"max_tiles": MAX_TILE_PIXELS // 256**2, "image_size": 256})


def test_3_train_form_refuses_the_review_s_options(store, tmp_path):
    s = settings(store, data_dir=tmp_path / "data", train_min_images=3)
    with TestClient(create_app(s)) as c:
        r = c.post("/train", data={"name": "fine", "scale": "4", "max_tiles": "4096", "image_size": "64"},
                   files=upload(*[png(synthetic_rgb(i)) for i in range(3)]))
        assert r.status_code == 422, r.text
        assert "max_tiles" in r.json()["detail"] and c.get("/train").json()["jobs"] == []


# ----------------------------------------------------------------------------- 6: activate racing a delete


def test_6_a_version_deleted_while_it_loads_is_404_not_503(store, monkeypatch):
    """Activation loads the version first; a delete between the scorer reading its manifest and opening its
    graph left it without scorer.onnx, and the answer was 503 "run `stpm export`". The version is gone:
    404, and nothing is activated."""
    from stpm.runtime.scorer import Scorer

    read_manifest = Scorer._read_manifest

    def deleted_meanwhile(self) -> None:
        read_manifest(self)
        bundle.delete_version(store, self.bundle_dir.parent.name, self.bundle_dir.name)

    monkeypatch.setattr(Scorer, "_read_manifest", deleted_meanwhile)
    with TestClient(create_app(settings(store))) as c:
        r = c.post("/models/demo/versions/v2/activate")
        assert r.status_code == 404 and r.json()["error"] == "model_not_found", r.text
        assert "stpm export" not in r.text
        assert bundle.get_active(store, "demo") == "v1"


# ----------------------------------------------------------------------------- 7: a read-only model store


@pytest.fixture()
def read_only(monkeypatch):
    """Writes under `root` fail with EROFS, as on a read-only mount (root ignores chmod, so the syscalls
    the store makes are refused here instead)."""

    def install(root: Path) -> None:
        root = str(root.resolve())
        real_open, real_mkdir, real_rename = os.open, os.mkdir, os.rename

        def under(path) -> bool:
            return str(Path(os.fsdecode(path)).resolve()).startswith(root)

        def erofs(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

        def open_(path, flags, *a, **kw):
            if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                erofs(path)
            return real_open(path, flags, *a, **kw)

        def mkdir_(path, *a, **kw):
            if under(path):
                erofs(path)
            return real_mkdir(path, *a, **kw)

        def rename_(src, dst, *a, **kw):
            if under(src) or under(dst):
                erofs(dst)
            return real_rename(src, dst, *a, **kw)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "mkdir", mkdir_)
        monkeypatch.setattr(os, "rename", rename_)

    return install


def test_7_a_read_only_store_answers_503_naming_it_and_keeps_the_connection(store, tmp_path, read_only):
    s = settings(store, data_dir=tmp_path / "data", train_min_images=3)
    with TestClient(create_app(s)) as c:
        read_only(store)
        for r in (c.post("/models/demo/versions/v2/activate"), c.delete("/models/demo/versions/v2")):
            assert r.status_code == 503 and r.json()["error"] == "model_store_not_writable", r.text
            assert str(store) not in r.text and "demo" in r.json()["detail"]
        # POST /train is refused up front instead of training fully and failing at publish
        r = c.post("/train", data={"name": "demo"}, files=upload(*[png(synthetic_rgb(i)) for i in range(3)]))
        assert r.status_code == 503 and r.json()["error"] == "model_store_not_writable", r.text
        assert str(store) not in r.text and c.get("/train").json()["jobs"] == []
        assert c.get("/models").status_code == 200  # reading still works
    assert bundle.get_active(store, "demo") == "v1" and bundle.list_versions(store, "demo") == ["v1", "v2"]


def test_7_a_job_error_names_no_server_path(tmp_path):
    from app.jobs.run_job import redact

    models, data = tmp_path / "models", tmp_path / "data"
    msg = redact(f"[Errno 30] Read-only file system: '{models}/demo/.lock' (uploads in {data}/jobs/x)",
                 [models, data])
    assert str(tmp_path) not in msg and "<models>/demo/.lock" in msg and "<data>/jobs/x" in msg


# ----------------------------------------------------------------------------- 8: a full TMPDIR


@pytest.fixture()
def full_tmpdir(monkeypatch):
    """Starlette spools an upload over 1 MB to TMPDIR: make that disk full."""
    import tempfile

    import starlette.formparsers as fp

    class Full(tempfile.SpooledTemporaryFile):
        def rollover(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fp, "SpooledTemporaryFile", Full)


def test_8_a_full_tmpdir_is_507_not_500(store, tmp_path, full_tmpdir):
    s = settings(store, data_dir=tmp_path / "data", train_min_images=3)
    big = os.urandom(3 << 20)  # over Starlette's 1 MB spool threshold
    with TestClient(create_app(s)) as c:
        for path, data in (("/score", None), ("/score/overlay", None), ("/train", {"name": "x"})):
            r = c.post(path, files=upload(big), data=data)
            assert r.status_code == 507 and r.json()["error"] == "insufficient_storage", (path, r.text)
            assert "temporary" in r.json()["detail"]
        assert c.post("/score", files=upload(png(synthetic_rgb(1)))).status_code == 200  # small: in memory


# ----------------------------------------------------------------------------- 9: malformed manifests


@pytest.mark.parametrize("manifest", ["[]", '{"model": 5}', "exports-oops", "{not json"])
def test_9_one_malformed_manifest_breaks_neither_the_list_nor_leaks_the_path(store, manifest):
    """Already fixed by the typed Manifest (issue 23): GET /models lists the good versions; the bad one's
    own routes answer 503 naming name/version and the problem, never the store's path, never 400
    `invalid_model_name` (the name is fine)."""
    path = store / "demo" / "v2" / "manifest.json"
    if manifest == "exports-oops":
        manifest = json.dumps({**json.loads(path.read_text()), "exports": "oops"})
    path.write_text(manifest)
    with TestClient(create_app(settings(store))) as c:
        r = c.get("/models")
        assert r.status_code == 200 and [v["version"] for v in r.json()["models"][0]["versions"]] == ["v1"]
        assert c.get("/models/demo").status_code == 200
        for r in (c.get("/models/demo/versions/v2"), c.post("/score", files=upload(png(synthetic_rgb(1))),
                                                            params={"model": "demo/v2"})):
            assert r.status_code == 503 and r.json()["error"] == "model_unavailable", r.text
            assert "demo/v2" in r.json()["detail"] and "manifest" in r.json()["detail"]
            assert str(store) not in r.text
        r = c.post("/models/demo/versions/v2/activate")
        assert r.status_code == 503 and str(store) not in r.text
        assert bundle.get_active(store, "demo") == "v1"


def test_9_evaluations_of_a_malformed_manifest_name_no_path(store):
    (store / "demo" / "v2" / "manifest.json").write_text("[]")
    with pytest.raises(bundle.BundleError) as e:
        bundle.read_evaluations(store / "demo" / "v2")
    assert str(store) not in str(e.value) and "demo/v2" in str(e.value)


# ----------------------------------------------------------------------------- 10: unknown /train fields


def test_10_unknown_train_fields_and_bad_layers_are_422_naming_them(store, tmp_path):
    """Already fixed by the restructuring (issue 23): the form model forbids unknown fields; the method's
    spec checks layers against the teacher."""
    s = settings(store, data_dir=tmp_path / "data", train_min_images=3)
    files = upload(*[png(synthetic_rgb(i)) for i in range(3)])
    with TestClient(create_app(s)) as c:
        r = c.post("/train", data={"name": "x", "epoch": "5", "bogus_option": "1"}, files=files)
        assert r.status_code == 422, r.text
        assert "'epoch'" in r.json()["detail"] and "'bogus_option'" in r.json()["detail"]
        r = c.post("/train", data={"name": "x", "layers": "bogus,../../etc"}, files=files)
        assert r.status_code == 422 and "bogus" in r.json()["detail"] and "available" in r.json()["detail"]
        assert c.get("/train").json()["jobs"] == []


# ----------------------------------------------------------------------------- 12: the minor ones


def test_12_a_model_shows_no_training_data_path(store):
    path = store / "demo" / "v1" / "manifest.json"
    man = json.loads(path.read_text())
    man["data"].update(source="/srv/secret/line-3/good", skipped=["/srv/secret/line-3/good/bad.png"])
    path.write_text(json.dumps(man))  # the digest check is the scorer's; listing reads the manifest only
    with TestClient(create_app(settings(store))) as c:
        for r in (c.get("/models/demo"), c.get("/models/demo/versions/v1")):
            assert r.status_code == 200 and "/srv/secret" not in r.text, r.text
            assert r.json()["manifest"]["data"]["source"] == "good"
            assert r.json()["manifest"]["data"]["skipped"] == ["bad.png"]


def test_12_healthz_tells_unauthenticated_clients_no_host_or_port(store):
    with TestClient(create_app(settings(store, api_key="k3y", replica_name="box-7:8000"))) as c:
        assert "replica" not in c.get("/healthz").json()
        assert c.get("/healthz", headers={"X-API-Key": "k3y"}).json()["replica"] == "box-7:8000"
    with TestClient(create_app(settings(store, replica_name="box-7:8000"))) as c:  # no key: nothing is private
        assert c.get("/healthz").json()["replica"] == "box-7:8000"


def test_12_disk_full_inside_safetensors_reads_disk_full():
    from safetensors import SafetensorError

    e = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                        '"No space left on device" })')
    assert readable_error(e).startswith("disk full:"), readable_error(e)


def test_12_head_and_options_on_get_routes(store):
    with TestClient(create_app(settings(store))) as c:
        for path in ("/healthz", "/models", "/models/demo", "/", "/ui/app.js"):
            get, head = c.get(path), c.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code)
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        r = c.options("/models/demo/versions/v1")
        assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE", "OPTIONS"}
        r = c.put("/models/demo/versions/v1")
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE", "OPTIONS"}
        assert c.options("/nowhere").status_code == 404


def test_12_the_model_parameter_s_pattern_is_in_the_schema_and_enforced(store):
    import re

    with TestClient(create_app(settings(store))) as c:
        spec = c.get("/openapi.json").json()
        for path in ("/score", "/score/overlay"):
            [model] = [p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "model"]
            pattern = json.dumps(model["schema"])
            assert bundle.MODEL_REF_PATTERN.replace("\\", "\\\\") in pattern, pattern
        ref = re.compile(bundle.MODEL_REF_PATTERN)
        for good in ("demo", "demo/v1", ""):
            assert ref.fullmatch(good)
        for bad in (" demo", "demo/", "demo/v0", "../x", "a/b/c"):
            assert not ref.fullmatch(bad)
            r = c.post("/score", files=upload(png(synthetic_rgb(1))), params={"model": bad})
            assert r.status_code == 400 and r.json()["error"] == "invalid_model_name", (bad, r.text)
