"""docker-compose.scale.yml and its nginx config, parsed (no Docker engine runs here): the services the
scale-out needs, settings that exist, shared volumes at the same paths, GPUs on workers only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.settings import Settings

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.scale.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict:
    return service.get("environment") or {}


def test_services_and_how_they_start(compose):
    s = compose["services"]
    assert set(s) == {"redis", "postgres", "api", "worker", "proxy"}
    assert s["worker"]["entrypoint"][:4] == ["/usr/bin/tini", "--", "stpm", "worker"]
    assert "entrypoint" not in s["api"]  # the image's own: stpm serve
    assert "ports" not in s["api"] and "ports" not in s["worker"]  # replicas are reached through the proxy
    assert any(p.endswith(":8080") for p in s["proxy"]["ports"])
    assert "--appendonly" in s["redis"]["command"]  # queued tasks survive a Redis restart
    for name in ("api", "worker"):
        deps = s[name]["depends_on"]
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"


def test_gpu_reserved_on_workers_only(compose):
    s = compose["services"]
    devices = s["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in s["api"]


def test_every_stpm_variable_is_a_setting_and_the_mode_is_scaled(compose):
    fields = Settings.model_fields
    for name in ("api", "worker"):
        env = _env(compose["services"][name])
        for key in env:
            assert key.startswith("STPM_") and key[5:].lower() in fields, key
        assert env["STPM_QUEUE"] == "celery"
        assert env["STPM_BROKER_URL"].startswith("redis://redis:")
        assert env["STPM_JOBS_DB"].startswith("postgresql://stpm:") and env["STPM_JOBS_DB"].endswith("@postgres:5432/stpm")


def test_api_and_workers_share_the_stores_at_the_same_paths(compose):
    s = compose["services"]
    mounts = {name: {m.split(":")[1]: m.split(":")[0] for m in s[name]["volumes"]} for name in ("api", "worker")}
    assert mounts["api"] == mounts["worker"]
    env = _env(s["api"])
    assert {env["STPM_MODELS_DIR"], env["STPM_DATA_DIR"]} <= set(mounts["api"])
    assert set(mounts["api"].values()) <= set(compose["volumes"])


def test_worker_healthcheck_and_hostname_agree(compose):
    w = compose["services"]["worker"]
    name = next(a for a in w["entrypoint"] if a.startswith("--hostname="))
    assert w["healthcheck"]["test"][1:] == ["stpm", "worker", "--ping", name]


def test_proxy_config_balances_over_every_api_replica(compose):
    mount = next(v for v in compose["services"]["proxy"]["volumes"] if "nginx" in v)
    conf = (ROOT / mount.split(":")[0]).read_text()
    assert re.search(r"server\s+api:8000\s+resolve;", conf)  # re-resolved as replicas come and go
    assert "resolver 127.0.0.11" in conf and "listen 8080;" in conf
    assert "client_max_body_size 0;" in conf  # the API enforces its own limits


def test_replicas_run_the_scoring_image_and_workers_the_training_image(compose):
    """The api replicas are built from the `serve` target (no torch, so /train is switched back on here:
    the jobs go to Celery), the workers from `train-gpu` (torch + CUDA); both targets exist."""
    from test_docker import SERVE_IMAGES, TRAIN_IMAGES, parse_dockerfile

    dockerfile = parse_dockerfile()
    s = compose["services"]
    assert s["api"]["build"]["target"] == "serve" and "serve" in s["api"]["image"]
    assert s["worker"]["build"]["target"] == "train-gpu" and "train-gpu" in s["worker"]["image"]
    assert s["api"]["build"]["target"] in SERVE_IMAGES and s["worker"]["build"]["target"] in TRAIN_IMAGES
    assert dockerfile.env("serve")["STPM_TRAIN_ENABLED"] == "false"
    assert _env(s["api"])["STPM_TRAIN_ENABLED"] == "true"
    # the worker's entrypoint and health check are its image's own (repeated in the file)
    assert s["worker"]["entrypoint"] == dockerfile.command("train-gpu")
    assert s["worker"]["healthcheck"]["test"][0] == "CMD"
    assert s["worker"]["healthcheck"]["test"][1:] == json.loads(
        re.search(r"CMD\s+(\[.*\])", dockerfile.inherited("train-gpu", "HEALTHCHECK"))[1])
