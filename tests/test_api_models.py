"""Model registry routes, hot reload, readiness, metrics, the API key, and the torch-free scoring process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from test_api_helpers import REPO, add_version, make_store, png, synthetic_rgb

from app.main import create_app
from app.settings import Settings
from stpm import bundle


def settings(models_dir, **kw) -> Settings:
    return Settings(_env_file=None, models_dir=models_dir, reload_interval_s=0, **kw)


def one_file():
    return [("files", ("a.png", png(synthetic_rgb(1)), "image/png"))]


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path, versions=2)


def test_list_get_activate_delete(store):
    with TestClient(create_app(settings(store))) as c:
        r = c.get("/models")
        assert r.status_code == 200
        body = r.json()
        assert body["default_model"] == "demo"
        [m] = body["models"]
        assert m["active_version"] == "v1" and m["default"]  # the first version; v2 was never activated
        assert [v["version"] for v in m["versions"]] == ["v1", "v2"]
        assert m["versions"][1]["threshold"] > 0 and m["versions"][1]["image_size"] == 64

        d = c.get("/models/demo").json()
        assert d["manifest"]["version"] == "v1" and "calibration" in d["manifest"]
        v = c.get("/models/demo/versions/v2").json()
        assert v["version"] == "v2" and v["active"] is False and v["manifest"]["name"] == "demo"

        assert c.post("/score", files=one_file()).json()["version"] == "v1"
        r = c.post("/models/demo/versions/v2/activate")
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "demo", "active_version": "v2", "previous_version": "v1", "loaded": True}
        assert c.post("/score", files=one_file()).json()["version"] == "v2"

        # the active version is protected; the other one is not
        r = c.delete("/models/demo/versions/v2")
        assert r.status_code == 409 and r.json()["error"] == "version_in_use"
        r = c.delete("/models/demo/versions/v1")
        assert r.status_code == 200 and r.json()["active_version"] == "v2"
        assert not (store / "demo" / "v1").exists()
        r = c.delete("/models/demo/versions/v2", params={"force": "true"})
        assert r.status_code == 200 and r.json()["active_version"] is None
        assert c.get("/models").json()["models"] == []
        assert c.post("/score", files=one_file()).status_code == 409
        assert add_version(store) == "v3"  # numbers are never reused; a name with no versions left is new again
        assert c.post("/score", files=one_file()).json()["version"] == "v3"


def test_an_unactivated_version_never_becomes_what_score_serves(store):
    """Issue 14 #1: a publish without activation (`stpm train` without --activate, a job with
    activate=false) must not change what /score without `model=` or with `model=NAME` uses."""
    with TestClient(create_app(settings(store))) as c:
        assert c.post("/score", files=one_file()).json()["version"] == "v1"
        assert add_version(store) == "v3"
        assert add_version(store, "throwaway") == "v1"  # a second name: the default is now ambiguous
        r = c.post("/score", files=one_file())
        assert r.status_code == 400 and r.json()["error"] == "model_required", r.text
        assert "model=NAME" in r.json()["detail"]
        assert c.post("/score", files=one_file(), params={"model": "demo"}).json()["version"] == "v1"
        assert c.post("/score", files=one_file(), params={"model": "demo/v3"}).json()["version"] == "v3"
        assert c.get("/models").json()["default_model"] is None
    with TestClient(create_app(settings(store, default_model="demo"))) as c:
        r = c.post("/score", files=one_file())
        assert r.status_code == 200 and (r.json()["model"], r.json()["version"]) == ("demo", "v1")
        assert c.get("/models").json()["default_model"] == "demo"


def test_a_name_without_an_activated_version_is_409(store):
    bundle.delete_version(store, "demo", "v1")  # the activated one, e.g. deleted with force
    with TestClient(create_app(settings(store))) as c:
        r = c.post("/score", files=one_file())
        assert r.status_code == 409 and r.json()["error"] == "no_active_version", r.text
        assert "activate" in r.json()["detail"]
        assert c.post("/score", files=one_file(), params={"model": "demo/v2"}).status_code == 200


def test_a_deleted_or_replaced_version_is_never_served_from_the_cache(store):
    """Issue 14 #4: the loaded-model cache is keyed by name/version; a bundle deleted (or deleted and
    re-created under the same number by hand) must not keep serving from memory."""
    import shutil

    with TestClient(create_app(settings(store))) as c:
        assert c.post("/score", files=one_file(), params={"model": "demo/v2"}).status_code == 200
        reg = c.app.state.registry
        old = reg.peek("demo", "v2")
        assert old is not None
        r = c.delete("/models/demo/versions/v2")
        assert r.status_code == 200
        assert reg.peek("demo", "v2") is None  # forgotten at once
        assert c.post("/score", files=one_file(), params={"model": "demo/v2"}).status_code == 404
        assert add_version(store) == "v3"

        # by hand, behind the service's back: the whole name removed and published again (v1 reused)
        assert c.post("/score", files=one_file()).json()["version"] == "v1"
        cached = reg.peek("demo", "v1")
        shutil.rmtree(store / "demo")
        assert add_version(store) == "v1"
        r = c.post("/score", files=one_file())
        assert r.status_code == 200 and r.json()["version"] == "v1"
        fresh = reg.peek("demo", "v1")
        assert fresh is not cached and fresh.identity != cached.identity
        assert 'stpm_model_loads_total{model="demo/v1",result="replaced"} 1.0' in c.get("/metrics").text


def test_errors_name_neither_the_store_path_nor_other_models(store):
    with TestClient(create_app(settings(store))) as c:
        for r in (c.post("/score", files=one_file(), params={"model": "nosuch"}), c.get("/models/nosuch"),
                  c.get("/models/demo/versions/v9"), c.post("/score", files=one_file(), params={"model": "demo/v9"})):
            assert r.status_code == 404, r.text
            assert str(store) not in r.text and "demo, " not in r.text and "known" not in r.text, r.text
    empty = store.parent / "empty-models"
    with TestClient(create_app(settings(empty))) as c:
        r = c.post("/score", files=one_file())
        assert r.status_code == 409 and str(empty) not in r.text


def test_readyz_shows_model_details_only_with_the_key(store):
    with TestClient(create_app(settings(store, api_key="k3y"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"ready": True}
        r = c.get("/readyz", headers={"X-API-Key": "k3y"})
        assert r.json()["ready"] and r.json()["model"] == "demo" and r.json()["version"] == "v1"
    (store / "demo" / "v1" / "scorer.onnx").write_bytes(b"garbage")
    with TestClient(create_app(settings(store, api_key="k3y"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = c.get("/readyz", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
        assert str(store) not in r.text and "demo/v1" in r.json()["detail"]


def test_models_routes_reject_unknown_and_malformed(store):
    with TestClient(create_app(settings(store))) as c:
        assert c.get("/models/nosuch").status_code == 404
        assert c.get("/models/demo/versions/v7").status_code == 404
        assert c.post("/models/demo/versions/v7/activate").status_code == 404
        assert c.delete("/models/demo/versions/v7").status_code == 404
        for path in ("/models/..%2e", "/models/a%20b", "/models/demo/versions/x1", "/models/demo/versions/v1%2f..",
                     "/models/.env/versions/v1/activate"):
            r = c.get(path) if "activate" not in path else c.post(path)
            assert r.status_code in (400, 404), (path, r.text)
            assert r.json()["error"] in ("invalid_model_name", "not_found"), (path, r.text)
        assert c.get("/models/a%20b").json()["error"] == "invalid_model_name"
        assert c.delete("/models/demo/versions/latest").status_code == 400


def test_hot_reload_on_new_version(store):
    with TestClient(create_app(settings(store))) as c:
        assert c.post("/score", files=one_file()).json()["version"] == "v1"
        assert add_version(store) == "v3"
        assert c.post("/score", files=one_file()).json()["version"] == "v1"  # published, not activated
        bundle.set_active(store, "demo", "v3")  # e.g. `stpm activate demo/v3` in another process
        r = c.post("/score", files=one_file())
        assert r.json()["version"] == "v3"  # the very next request uses it
        loaded = {lm.version for lm in c.app.state.registry.loaded()}
        assert "v3" in loaded


def test_background_poll_loads_new_version_and_readyz(tmp_path):
    models = tmp_path / "models"
    s = Settings(_env_file=None, models_dir=models, reload_interval_s=0.2)
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "no_model"
        assert c.get("/healthz").status_code == 200
        make_store(tmp_path, versions=1)
        reg = c.app.state.registry
        deadline = time.monotonic() + 20
        while not reg.loaded() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [lm.ref for lm in reg.loaded()] == ["demo/v1"]  # loaded before any request
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] and r.json()["warm"]


def test_broken_bundle_is_503_not_500(store):
    (store / "demo" / "v1" / "scorer.onnx").write_bytes(b"garbage")
    with TestClient(create_app(settings(store))) as c:
        r = c.post("/score", files=one_file())
        assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
        assert str(store) not in r.json()["detail"]
        assert c.get("/readyz").status_code == 503
        assert c.post("/score", files=one_file(), params={"model": "demo/v2"}).status_code == 200


def test_metrics(store):
    with TestClient(create_app(settings(store))) as c:
        c.post("/score", files=one_file())
        c.post("/score", files=[("files", ("bad.png", b"nope", "image/png"))])
        text = c.get("/metrics").text
        assert 'stpm_http_requests_total{method="POST",route="/score",status="200"} 1.0' in text
        assert 'stpm_http_requests_total{method="POST",route="/score",status="422"} 1.0' in text
        assert 'stpm_images_scored_total{model="demo/v1"} 1.0' in text
        assert 'stpm_model_loads_total{model="demo/v1",result="ok"} 1.0' in text
        assert "stpm_anomaly_score_bucket" in text and "stpm_http_request_duration_seconds_bucket" in text
        assert "stpm_anomalies_flagged_total" in text or "stpm_anomalies_flagged" in text
        assert 'stpm_rejected_inputs_total{reason="invalid_image"} 1.0' in text
    # a second app in the same process has its own registry: no duplicate-metric error, fresh counts
    with TestClient(create_app(settings(store))) as c2:
        assert 'route="/score"' not in c2.get("/metrics").text


def test_api_key(store):
    s = settings(store, api_key="s3cret-key")
    with TestClient(create_app(s)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        for method, path in (("GET", "/models"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                             ("POST", "/score"), ("GET", "/nope")):
            r = c.request(method, path)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/models", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        r = c.post("/score", files=one_file(), headers={"X-API-Key": "s3cret-key"})
        assert r.status_code == 200
        schema = c.get("/openapi.json", headers={"X-API-Key": "s3cret-key"}).json()
        assert "ApiKey" in schema["components"]["securitySchemes"]


def test_openapi_has_examples(store):
    with TestClient(create_app(settings(store))) as c:
        schema = c.get("/openapi.json").json()
        comps = schema["components"]["schemas"]
        assert comps["ScoreResponse"]["examples"][0]["results"][0]["file"]
        assert "/score/overlay" in schema["paths"]
        assert "413" in schema["paths"]["/score"]["post"]["responses"]


def test_scoring_process_does_not_import_torch(store):
    code = f"""
import sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings
from PIL import Image
import io, numpy as np
buf = io.BytesIO(); Image.fromarray(np.zeros((70, 70, 3), np.uint8)).save(buf, "PNG")
with TestClient(create_app(Settings(_env_file=None, models_dir={str(store)!r}))) as c:
    r = c.post("/score", files=[("files", ("a.png", buf.getvalue(), "image/png"))], params={{"heatmap": "both"}})
    assert r.status_code == 200, r.text
    c.get("/models"); c.get("/readyz"); c.get("/metrics")
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision", "timm")))
print("LOADED", bad)
sys.exit(1 if bad else 0)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "LOADED []" in p.stdout


def test_routes_take_shared_state_from_the_app_dependencies(store, tmp_path):
    """The handlers name the registry, settings and job store in their signatures (app.deps): an override
    replaces what every route sees; without training the job routes answer 503 training_unavailable."""
    from app.deps import get_registry, get_settings
    from app.registry import ModelRegistry

    app = create_app(settings(store, train_enabled=False))
    other = settings(make_store(tmp_path / "other", name="other"), replica_name="replica-x")
    with TestClient(app) as c:
        other_registry = ModelRegistry(other, app.state.metrics)
        app.dependency_overrides[get_registry] = lambda: other_registry
        app.dependency_overrides[get_settings] = lambda: other
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["other"]
        assert c.get("/models/other/versions/v1").json()["active"] is True
        assert c.get("/healthz").json()["replica"] == "replica-x"
        app.dependency_overrides.clear()
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["demo"]
        for method, path in (("GET", "/train"), ("GET", "/train/" + "0" * 32), ("DELETE", "/train/" + "0" * 32)):
            r = c.request(method, path)
            assert r.status_code == 503 and r.json()["error"] == "training_unavailable", (method, path, r.text)
