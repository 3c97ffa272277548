"""The web page shows elongated images and their overlays unsquashed (a tiled model, real Chromium)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA, require
from tests.test_api_helpers import IMAGE_SIZE, build_bundle, start_uvicorn, stop
from tests.test_ui_browser import CHROMIUM, browser, loaded, page, shot  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="the playwright package is not installed"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory):
    from stpm.imaging.geometry import Geometry

    root = tmp_path_factory.mktemp("ui-tiled")
    build_bundle(root / "models", "strips", geometry=Geometry(IMAGE_SIZE, IMAGE_SIZE / 120))
    proc, url = start_uvicorn(root / "models", {"STPM_DATA_DIR": str(root / "data")})
    yield url
    stop(proc)


def elongated_inputs(tmp_path: Path) -> list[Path]:
    crack = require(SHARED_DATA / "kolektorsdd_half" / "kolektorsdd" / "test" / "crack")
    real = sorted(crack.glob("*.png"))[:1]
    assert real, f"no PNG under {crack}"
    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.png"  # 1:2.5 lying down
    Image.fromarray(rng.integers(0, 255, (120, 300, 3), dtype=np.uint8)).save(wide)
    return real + [wide]


def test_elongated_overlays_keep_their_aspect_ratio(page, tiled_server, tmp_path):  # noqa: F811
    files = elongated_inputs(tmp_path)
    page.goto(tiled_server + "/")
    page.wait_for_selector("#score-model option[value='strips']", state="attached")
    page.set_input_files("#score-files", [str(p) for p in files])
    n = len(files)
    page.wait_for_function(f"() => document.querySelectorAll('#results .result:not(.pending)').length === {n}")
    cards = page.locator("#results .result")
    for i in range(n):
        card = cards.nth(i)
        assert card.get_attribute("data-decision") in ("ok", "anomaly"), card.inner_text()
        page.wait_for_function("c => [...c.querySelectorAll('img')].every(i => i.complete)", arg=card.element_handle())
        orig, ov = card.locator("img.original"), card.locator("img.overlay")
        assert loaded(orig) and loaded(ov)
        nat = ov.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert nat == orig.evaluate("i => [i.naturalWidth, i.naturalHeight]")  # the heatmap covers the whole input
        for img in (orig, ov):
            box = img.bounding_box()
            assert abs(box["height"] / box["width"] - nat[1] / nat[0]) < 0.03, (box, nat)  # shown unsquashed
        raw = card.locator("details.raw pre").evaluate("e => JSON.parse(e.textContent)")
        assert raw["tiles"] > 1 and raw["width"] == nat[0] and raw["height"] == nat[1]
    shot(page, "score-elongated")
