"""POST /score and /score/overlay against real (tiny) bundles: results, heatmaps, and every bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_api_helpers import make_store, png, real_images, synthetic_rgb

from app.main import create_app
from app.settings import Settings


def settings(models_dir, **kw) -> Settings:
    return Settings(_env_file=None, models_dir=models_dir, reload_interval_s=0, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("score"), versions=1)  # read-only in this module


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(settings(store, max_files=4))) as c:
        yield c


def upload(*blobs, field="files", names=None):
    names = names or [f"img{i}.png" for i in range(len(blobs))]
    return [(field, (n, b, "image/png")) for n, b in zip(names, blobs)]


def test_score_real_images_in_order_with_heatmaps(client):
    paths = real_images("good", 1) + real_images("broken_large", 1)
    if len(paths) < 2:
        pytest.skip("real MVTec bottle images not found (set STPM_SHARED_DATA)")
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths] + upload(png(synthetic_rgb(3)), names=["z.png"])
    r = client.post("/score", files=files, params={"heatmap": "both"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "demo" and body["version"] == "v1" and body["batch_images"] == 3
    assert [x["file"] for x in body["results"]] == [paths[0].name, paths[1].name, "z.png"]
    for x in body["results"]:
        assert 0.0 <= x["score"] <= 1.0
        assert x["is_anomaly"] == (x["raw_score"] >= x["threshold"])
        assert (x["score"] > 0.5) <= x["is_anomaly"]
        for key in ("overlay_png", "map_png"):
            img = Image.open(io.BytesIO(base64.b64decode(x[key])))
            assert img.size == (x["width"], x["height"])
        assert {"decode", "queue", "inference"} <= set(x["timings_ms"])
    assert body["results"][0]["width"] == 512


def test_heatmap_none_and_model_size(client):
    r = client.post("/score", files=upload(png(synthetic_rgb(1, 128))))
    x = r.json()["results"][0]
    assert x["overlay_png"] is None and x["map_png"] is None
    r = client.post("/score", files=upload(png(synthetic_rgb(1, 128))), params={"heatmap": "map", "heatmap_size": "model"})
    x = r.json()["results"][0]
    assert x["overlay_png"] is None
    assert Image.open(io.BytesIO(base64.b64decode(x["map_png"]))).size == (64, 64)


def test_overlay_png_directly(client):
    r = client.post("/score/overlay", files=upload(png(synthetic_rgb(2, 100))))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (100, 100)
    assert r.headers["x-stpm-model"] == "demo/v1"
    assert 0 <= float(r.headers["x-stpm-score"]) <= 1
    assert r.headers["x-stpm-is-anomaly"] in ("true", "false")
    r = client.post("/score/overlay", files=upload(png(synthetic_rgb(2)), png(synthetic_rgb(3))))
    assert r.status_code == 422 and r.json()["error"] == "validation_error"


# ----- conversions: scored, not refused


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_rgb(4)).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def _palette_png() -> bytes:
    return _save(Image.fromarray(synthetic_rgb(5)).convert("P", palette=Image.ADAPTIVE, colors=16))


def _save(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind",
    ["gray16", "cmyk", "palette", "rgba", "gray", "la"],
)
def test_unusual_formats_are_converted_and_scored(client, kind):
    rgb = synthetic_rgb(6)
    data = {
        "gray16": lambda: _save(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)),
        "cmyk": _cmyk_jpeg,
        "palette": _palette_png,
        "rgba": lambda: png(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        "gray": lambda: png(rgb[:, :, 1]),
        "la": lambda: _save(Image.fromarray(rgb[:, :, 1]).convert("LA")),
    }[kind]()
    r = client.post("/score", files=upload(data), params={"heatmap": "overlay"})
    assert r.status_code == 200, r.text
    x = r.json()["results"][0]
    assert (x["width"], x["height"]) == (96, 96) and 0 <= x["score"] <= 1


# ----- bad input: a clear 4xx, never a 5xx


def _bomb_png(w=60000, h=60000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (1-bit gray): a decompression bomb."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((w + 7) // 8 + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name,data,needle",
    [
        ("notes.txt", b"this is not an image at all", "not an image"),
        ("empty.png", b"", "empty"),
        ("truncated.png", png(synthetic_rgb(7))[:300], "cannot decode"),
        ("bomb.png", _bomb_png(), "decompression bomb"),
        ("big.png", _bomb_png(8000, 8000), "pixels exceeds the limit"),
        ("header_only.png", png(synthetic_rgb(7))[:40], ""),
    ],
)
def test_undecodable_files_get_422_naming_the_file(client, name, data, needle):
    good = png(synthetic_rgb(8))
    r = client.post("/score", files=upload(good, data, names=["good.png", name]))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_image"
    assert [f["file"] for f in body["files"]] == [name]
    assert needle in body["detail"]


def test_dimensions_over_the_limit(store):
    with TestClient(create_app(settings(store, max_pixels=50 * 50))) as c:
        r = c.post("/score", files=upload(png(synthetic_rgb(1, 60))))
        assert r.status_code == 422 and "exceeds the limit of 2500" in r.json()["detail"]
        assert c.post("/score", files=upload(png(synthetic_rgb(1, 40)))).status_code == 200


def test_wrong_multipart_field_and_no_body(client):
    r = client.post("/score", files=upload(png(synthetic_rgb(1)), field="file"))
    assert r.status_code == 422
    assert r.json()["error"] == "validation_error" and "'files'" in r.json()["detail"]
    r = client.post("/score", json={"files": "x"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post("/score", data={"files": "not a file"})
    assert r.status_code == 415 and "application/x-www-form-urlencoded" in r.json()["detail"]
    r = client.post("/score", data={"files": "not a file"}, files=[("other", (None, b"x"))])  # multipart, no file
    assert r.status_code == 422 and r.json()["error"] == "validation_error"


def test_too_many_files(client):
    r = client.post("/score", files=upload(*[png(synthetic_rgb(i, 32)) for i in range(5)]))
    assert r.status_code == 413 and r.json()["error"] == "too_many_files"


def test_file_too_large(store):
    with TestClient(create_app(settings(store, max_upload_bytes=1000))) as c:
        r = c.post("/score", files=upload(png(synthetic_rgb(1, 200))))
        assert r.status_code == 413 and r.json()["error"] == "file_too_large"


def test_request_too_large_by_content_length_and_streamed(store):
    app = create_app(settings(store, max_request_bytes=10_000))
    big = png(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    assert len(big) > 10_000
    with TestClient(app) as c:
        r = c.post("/score", files=upload(big))
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    received = []

    async def run():
        # A lying client: declares a small body in no Content-Length (chunked), streams a large one.
        async def body():
            yield (b'--abc\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n")
            for i in range(20):
                received.append(i)
                yield b"x" * 1000

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            r1 = await ac.post("/score", content=body(), headers={"content-type": "multipart/form-data; boundary=abc"})
            r2 = await ac.post("/score", content=b"x", headers={"content-length": "99999999",
                                                               "content-type": "multipart/form-data; boundary=a"})
            return r1, r2

    r1, r2 = asyncio.run(run())
    assert r1.status_code == 413 and r1.json()["error"] == "payload_too_large"
    assert len(received) < 15  # stopped reading soon after the limit
    assert r2.status_code == 413


def _solid_png(w: int, h: int) -> bytes:
    """A large but tiny-to-send image (one colour compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def test_pixel_budget_of_a_request_is_413_before_decoding(store):
    """Issue 14 #2: the per-image limit let 32 huge images (each under it) into one request. The sum of
    decoded pixels and heatmap pixels is capped; the answer says what was asked and what to change."""
    s = settings(store, max_files=8, max_pixels=1000 * 1000, max_request_pixels=2_000_000)
    with TestClient(create_app(s)) as c:
        one = _solid_png(1000, 1000)  # 1 Mpx: within the per-image limit
        assert c.post("/score", files=upload(one, one)).status_code == 200  # 2 Mpx decoded: fits
        r = c.post("/score", files=upload(one, one, one))
        assert r.status_code == 413 and r.json()["error"] == "too_many_pixels", r.text
        assert "3000000 pixels" in r.json()["detail"] and "max_request_pixels" in r.json()["detail"]
        # heatmaps count: one image with an overlay at its size is 2 Mpx, with both 3 Mpx
        assert c.post("/score", files=upload(one), params={"heatmap": "overlay"}).status_code == 200
        r = c.post("/score", files=upload(one), params={"heatmap": "both"})
        assert r.status_code == 413 and "heatmap" in r.json()["detail"]
        # ... but not at the model's size (64 x 64)
        assert c.post("/score", files=upload(one), params={"heatmap": "both", "heatmap_size": "model"}).status_code == 200
        assert c.post("/score/overlay", files=upload(one)).status_code == 200
        r = c.post("/score/overlay", files=upload(_solid_png(1000, 1001)))
        assert r.status_code == 413 and r.json()["error"] == "too_many_pixels"
        assert 'stpm_rejected_inputs_total{reason="too_many_pixels"} 3.0' in c.get("/metrics").text


def test_no_reference_to_a_request_s_images_outlives_it(store):
    """Issue 14 #2: after a request, nothing keeps its decoded images alive (the micro-batcher kept the
    last batch referenced until the next request arrived)."""
    import gc
    import weakref

    from app.registry import default_scorer_factory

    base = default_scorer_factory(settings(store))
    seen: list[weakref.ref] = []

    class Recording:
        """A scorer without the two phases: the batcher calls its `score` with what the route prepared."""

        def __init__(self, path):
            self.inner = base(path)
            self.image_size = self.inner.image_size
            self.providers = self.inner.providers
            self.read, self.decode = self.inner.read, self.inner.decode

        def warmup(self):
            self.inner.warmup()

        def score(self, images, **kw):
            seen.extend(weakref.ref(im) for im in images)
            return self.inner.score(images, **kw)

    # one image per batch: the request's two images are more than a batch (the batcher's loop then
    # takes no second job and must still survive)
    with TestClient(create_app(settings(store, batch_max_images=1), scorer_factory=Recording)) as c:
        r = c.post("/score", files=upload(png(synthetic_rgb(1, 300)), png(synthetic_rgb(2, 200))),
                   params={"heatmap": "both"})
        assert r.status_code == 200
        gc.collect()
        alive = [w() is not None for w in seen]
        assert len(seen) == 2 and alive == [False, False], alive
        [lm] = c.app.state.registry.loaded()
        assert not lm.batcher._task.done()  # the batching loop is alive and waiting


def test_models_unknown_and_malformed(client):
    f = upload(png(synthetic_rgb(1)))
    assert client.post("/score", files=f, params={"model": "nosuch"}).status_code == 404
    assert client.post("/score", files=f, params={"model": "demo/v9"}).json()["error"] == "model_not_found"
    for bad in ("../etc", "demo/../../x", "a/b/c", "bad name", "demo/latest", ".hidden"):
        r = client.post("/score", files=f, params={"model": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "invalid_model_name"
    r = client.post("/score", files=f, params={"model": "x" * 300})
    assert r.status_code == 422
    r = client.post("/score", files=f, params={"model": "demo/v1"})
    assert r.status_code == 200 and r.json()["version"] == "v1"


def test_no_model_yet_is_409_with_instructions(tmp_path):
    with TestClient(create_app(settings(tmp_path / "empty"))) as c:
        r = c.post("/score", files=upload(png(synthetic_rgb(1))))
        assert r.status_code == 409
        assert r.json()["error"] == "no_model" and "train" in r.json()["detail"]
        assert c.post("/score/overlay", files=upload(png(synthetic_rgb(1)))).status_code == 409
        assert c.get("/readyz").status_code == 503


def test_errors_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.get("/score")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = client.post("/score", files=upload(png(synthetic_rgb(1))), params={"heatmap": "rainbow"})
    assert r.status_code == 422 and r.json()["error"] == "validation_error"


def test_concurrent_requests_are_micro_batched_and_loop_stays_free(store):
    """Eight concurrent single-image requests share ONNX Runtime calls; /healthz answers meanwhile."""
    from app.registry import default_scorer_factory

    base = default_scorer_factory(settings(store))

    class Slow:
        def __init__(self, path):
            self.inner = base(path)
            self.image_size = self.inner.image_size
            self.providers = self.inner.providers
            self.read, self.decode = self.inner.read, self.inner.decode

        def warmup(self):
            self.inner.warmup()

        def score(self, *a, **kw):
            time.sleep(0.6)  # blocking, like a long inference: must not stall the event loop
            return self.inner.score(*a, **kw)

    # batching on explicitly: the measured BATCH_DEFAULTS may be batch 1 on a small CPU (benchmarks/batching.py)
    app = create_app(settings(store, batch_max_images=16, batch_wait_ms=5), scorer_factory=Slow)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as ac:
            await ac.post("/score", files=upload(png(synthetic_rgb(0)))) # load + warm
            t0 = time.perf_counter()
            scoring = [asyncio.create_task(ac.post("/score", files=upload(png(synthetic_rgb(i)), names=[f"{i}.png"])))
                       for i in range(8)]
            await asyncio.sleep(0.1)
            t1 = time.perf_counter()
            h = await ac.get("/healthz")
            t_health = time.perf_counter() - t1
            rs = await asyncio.gather(*scoring)
            return h, t_health, rs, time.perf_counter() - t0

    h, t_health, rs, total = asyncio.run(run())
    assert h.status_code == 200 and t_health < 0.4, t_health  # not stuck behind a 0.6 s inference
    assert [r.status_code for r in rs] == [200] * 8
    assert [r.json()["results"][0]["file"] for r in rs] == [f"{i}.png" for i in range(8)]
    lm = app.state.registry.loaded()[0]
    assert lm.batcher.batches <= 1 + 3, lm.batcher.batches  # warm-up request + a few batches, not 8
    assert total < 8 * 0.6 * 0.6  # far from serial


def test_fp16_setting_serves_a_version_without_the_fp16_graph(store):
    """STPM_PRECISION=fp16 and a version that has only its fp32 scorer: 200 from the fp32 graph, not 503."""
    with TestClient(create_app(settings(store, precision="fp16"))) as c:
        r = c.post("/score", files=[("files", ("a.png", png(synthetic_rgb(1)), "image/png"))])
        assert r.status_code == 200, r.text
        assert c.get("/readyz").status_code == 200


def test_each_image_is_decoded_and_planned_once(client, monkeypatch):
    """Issue 23: /score read each image's header, planned it (for the pixel budget and the geometry check)
    and decoded it, then the scorer converted, limit-checked and planned it again. Now the Scorer prepares
    it once and the prepared image travels to inference."""
    from stpm.runtime import images
    from stpm.runtime import scorer as scorer_module

    calls = {"plan": 0, "decode": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(images, "plan", counted("plan", images.plan))
    monkeypatch.setattr(images, "decode_image", counted("decode", images.decode_image))
    monkeypatch.setattr(scorer_module, "plan", counted("plan", scorer_module.plan))  # Scorer.plan: not used
    r = client.post("/score", files=upload(png(synthetic_rgb(1, 300)), png(synthetic_rgb(2, 200))),
                    params={"heatmap": "both", "heatmap_size": "model"})
    assert r.status_code == 200, r.text
    assert calls == {"plan": 2, "decode": 2}
    for x in r.json()["results"]:
        assert x["tiles"] >= 1 and x["scaled_width"] >= 1
