"""The service under a real uvicorn process on 127.0.0.1 (random free port), stopped at the end."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
from test_api_helpers import make_store, png, real_images, start_uvicorn, stop, synthetic_rgb


@pytest.fixture()
def server(tmp_path):
    models = make_store(tmp_path, versions=1)
    proc, url = start_uvicorn(models, {"STPM_API_KEY": "k3y", "STPM_MAX_REQUEST_BYTES": "2000000"})
    try:
        yield url
    finally:
        stop(proc)
        assert proc.returncode is not None


def test_real_uvicorn_end_to_end(server):
    url, key = server, {"X-API-Key": "k3y"}
    paths = real_images("broken_large", 1) or []
    data = paths[0].read_bytes() if paths else png(synthetic_rgb(1, 300))
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/score", files=[("files", ("x.png", data, "image/png"))]).status_code == 401
        r = c.post("/score", files=[("files", ("x.png", data, "image/png"))], headers=key, params={"heatmap": "overlay"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["overlay_png"]
        r = c.post("/score/overlay", files=[("files", ("x.png", data, "image/png"))], headers=key)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get("/readyz").json()["ready"] is True
        # Content-Length over the limit: refused before the body is read
        r = c.post("/score", content=b"\0" * 2_500_000, headers={**key, "content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    def one(i):
        with httpx.Client(base_url=url, timeout=60) as c:
            f = [("files", (f"{i}.png", png(synthetic_rgb(i)), "image/png"))]
            return c.post("/score", files=f, headers=key)

    with cf.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(one, range(12)))
    assert [r.status_code for r in rs] == [200] * 12
    assert [r.json()["results"][0]["file"] for r in rs] == [f"{i}.png" for i in range(12)]
    with httpx.Client(base_url=url, timeout=60) as c:
        metrics = c.get("/metrics", headers=key).text
        assert 'stpm_http_requests_total{method="POST",route="/score",status="200"}' in metrics
