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


PUBLISHER = """
import json, shutil, sys, time
from pathlib import Path
from stpm import bundle
models, source, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
staging = bundle.new_staging_dir(models, "late")
shutil.copytree(source, staging, dirs_exist_ok=True)
man = json.loads((staging / "manifest.json").read_text())
man["version"] = None
(staging / "manifest.json").write_text(json.dumps(man))
print("STAGED", staging.name, flush=True)
while not go.exists():  # e.g. the ONNX export and parity check of `stpm train`, still running
    time.sleep(0.05)
print("PUBLISHED", bundle.publish(staging, models, "late")[0], flush=True)
"""


def test_a_server_start_leaves_a_live_publish_alone(tmp_path):
    """Issue 14 #5: a server start removed every `.staging-*` folder, failing an `stpm train` that was
    publishing at that moment. Now only folders whose process is gone are removed."""
    import subprocess
    import sys
    import time

    from test_api_helpers import cached_bundle

    from stpm.bundle import store

    models = make_store(tmp_path, versions=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = models / "demo" / f".staging-{dead.pid}-{store._host_tag()}-{'0' * 32}"
    leftover.mkdir()
    go = tmp_path / "go"
    pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(models), str(cached_bundle()), str(go)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert pub.stdout.readline().startswith("STAGED")
        proc, url = start_uvicorn(models, {"STPM_DATA_DIR": str(tmp_path / "data")})
        try:
            deadline = time.monotonic() + 30
            while leftover.exists() and time.monotonic() < deadline:  # start-up recovery has run
                time.sleep(0.1)
            assert not leftover.exists()
            go.touch()
            out, _ = pub.communicate(timeout=60)
            assert pub.returncode == 0 and "PUBLISHED v1" in out, out
            with httpx.Client(base_url=url, timeout=60) as c:
                f = [("files", ("x.png", png(synthetic_rgb(1)), "image/png"))]
                r = c.post("/score", files=f, params={"model": "late"})
                assert r.status_code == 200 and r.json()["version"] == "v1", r.text
        finally:
            stop(proc)
    finally:
        if pub.poll() is None:
            pub.kill()
