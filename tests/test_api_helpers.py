"""Shared pieces of the API tests (no tests here): tiny real bundles, images, a uvicorn runner.

Bundles are built with torch in the TEST process (random-init ResNet18 at 64 px, student perturbed so
maps are not zero, calibrated on a few images, exported to ONNX); the app under test only loads them
through stpm.runtime.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64


def shared_data() -> Path:
    env = os.environ.get("STPM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def bottle_dir() -> Path:
    return shared_data() / "mvtec_ad_bottle_512" / "bottle"


def real_images(kind: str = "good", n: int = 2) -> list[Path]:
    d = bottle_dir() / "test" / kind
    return sorted(d.glob("*.png"))[:n] if d.is_dir() else []


def png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def synthetic_rgb(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 128)], axis=2)
    return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


def build_bundle(models_dir: Path, name: str = "demo", seed: int = 0, geometry=None) -> tuple[str, Path]:
    """Publish a tiny exported bundle `name/vN` into models_dir; -> (version, path). Uses torch.
    geometry: a stpm.tiling.Geometry (default: squash to IMAGE_SIZE)."""
    import torch

    from stpm.training.calibration import calibrate
    from stpm.options import ModelOptions
    from stpm.export.onnx import export_bundle
    from stpm.methods.maps import tile_score as image_score
    from stpm.methods.stpm.loss import anomaly_map
    from stpm.methods.stpm.model import build_stpm
    from stpm.methods.stpm.anomaly_map import STPMMap
    from stpm.training.publish import build_manifest, publish_model

    torch.manual_seed(seed)
    cfg = ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=IMAGE_SIZE)
    model, _ = build_stpm(cfg, seed=seed)
    model.student.load_state_dict(model.teacher.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    imgs = [synthetic_rgb(i, IMAGE_SIZE) for i in range(4)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        t, s = model(x)
        scores = image_score(anomaly_map(t, s, (IMAGE_SIZE, IMAGE_SIZE))).numpy()
    cal = calibrate(scores)
    manifest = build_manifest(name, cfg, cal, "random-init", {"epochs": 0}, {"n_images": 4}, geometry)
    amap = STPMMap(model, manifest["model"]["combine"], manifest["model"]["sigma"])
    return publish_model(models_dir, amap, manifest, before_publish=lambda d: export_bundle(d))


_CACHE: dict[str, Path] = {}


def cached_bundle() -> Path:
    """One tiny bundle per test process (building takes seconds; copying it is instant)."""
    if "demo" not in _CACHE:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="stpm-api-bundle-"))
        _CACHE["demo"] = build_bundle(root, "demo")[1]
    return _CACHE["demo"]


def make_store(root: Path, versions: int = 1, name: str = "demo") -> Path:
    """A model store under `root` holding `name`/v1..vN (copies of the cached bundle); -> models dir."""
    models = root / "models"
    (models / name).mkdir(parents=True, exist_ok=True)
    for i in range(1, versions + 1):
        add_version(models, name)
    return models


def add_version(models: Path, name: str = "demo") -> str:
    """Publish the next version of `name` atomically (copy to staging, then rename); -> version."""
    import json
    import shutil

    from stpm import bundle

    staging = bundle.new_staging_dir(models, name)
    shutil.rmtree(staging)
    shutil.copytree(cached_bundle(), staging)
    man = json.loads((staging / "manifest.json").read_text())
    man["version"] = None
    (staging / "manifest.json").write_text(json.dumps(man))
    return bundle.publish(staging, models, name)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_uvicorn(models_dir: Path, env_extra: dict[str, str] | None = None, timeout: float = 60.0):
    """Start `python -m app.serve` (uvicorn) on 127.0.0.1:<free port>; -> (process, base url)."""
    import httpx

    port = free_port()
    env = {**os.environ, "STPM_MODELS_DIR": str(models_dir), "STPM_RELOAD_INTERVAL_S": "0.5", **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in time")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def raw_request(url: str, data: bytes, read_timeout: float = 30.0) -> bytes:
    """Send raw bytes to the server (requests httpx would refuse to make); -> all it answers until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    return out


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 answer -> (status, lower-cased headers, body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body
