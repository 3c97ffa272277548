"""The web page in a real browser: Playwright for Python driving Debian's chromium (headless) against the
app served by uvicorn on 127.0.0.1.

Needs `/usr/bin/chromium` (apt-get install chromium) and the `playwright` package; never runs
`playwright install`. Real images come from ../shared/data (or $STPM_SHARED_DATA). Screenshots go to
test-artifacts/; with STPM_UPDATE_DOC_IMAGES=1 the train view is also written to docs/img/.

    .venv/bin/python -m pytest -m browser tests/test_ui_browser.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from stpm import bundle
from tests.test_api_helpers import REPO, make_store, real_images, start_uvicorn, stop

CHROMIUM = Path(os.environ.get("STPM_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts"
DOC_IMAGES = REPO / "docs" / "img"
KEY = "s3cret-ui-key"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="the playwright package is not installed"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]


def need_images(kind: str, n: int) -> list[Path]:
    imgs = real_images(kind, n)
    if len(imgs) < n:
        pytest.skip(f"real images not found (bottle/test/{kind} under ../shared/data or $STPM_SHARED_DATA)")
    return imgs


def train_images(n: int) -> list[Path]:
    from tests.test_api_helpers import bottle_dir

    d = bottle_dir() / "train" / "good"
    imgs = sorted(d.glob("*.png"))[:n] if d.is_dir() else []
    return imgs if len(imgs) == n else need_images("good", n)


def shot(page, name: str, doc: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if doc and os.environ.get("STPM_UPDATE_DOC_IMAGES") == "1":
        from PIL import Image

        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:  # 256 colours: a third of the size, same look
            im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                DOC_IMAGES / f"ui-{name}.png", optimize=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield b
        b.close()


_MODELS: dict[str, Path] = {}  # server url -> its models folder


def server_models(url: str) -> Path:
    return _MODELS[url]


def record_eval(models: Path, name: str, version: str) -> None:
    """Record an evaluation as `stpm eval` does (bundle.record_evaluation), with operating points. The
    figures are fixed rendering data (those of the defaults on MPDD metal plate), not this bundle's."""
    def point(t: float, fpr: float, recall: float, current: bool = False) -> dict:
        return {"target_fpr": t, "threshold": 50.0 - 100 * t, "expected_fpr": t, "expected_fpr_interval": None,
                "synthetic_recall": 0.3, "fpr_on_test_good": fpr, "n_flagged_good": round(26 * fpr),
                "precision": 1.0 if fpr == 0 else 0.98, "recall": recall, "current": current}

    bundle.record_evaluation(models / name / version, "metal_plate", {
        "data": "metal_plate", "evaluated_at": bundle.utc_now(), "image_auroc": 0.9986,
        "at_calibrated_threshold": {"fpr": 0.0, "precision": 1.0, "recall": 0.78},
        "operating_points": [point(0.005, 0.0, 0.68), point(0.01, 0.0, 0.78, current=True), point(0.02, 0.0, 0.86),
                             point(0.05, 0.0, 1.0), point(0.1, 2 / 26, 1.0)]})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server holding demo/v1 and demo/v2 (tiny random-init bundles); training jobs publish here too."""
    root = tmp_path_factory.mktemp("ui")
    models = make_store(root, versions=2)
    bundle.set_active(models, "demo", "v2")  # the first version is activated by publishing; v2 by asking
    proc, url = start_uvicorn(models, {"STPM_DATA_DIR": str(root / "data"), "STPM_TRAIN_THREADS": "2"})
    _MODELS[url] = models
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def framed_server(tmp_path_factory):
    """A server holding one model whose image score discounts a position prior: PatchCore on a random teacher
    (pretrained=False: what is shown, not how good it is) trained on twelve 64 px images with a bright rim."""
    import numpy as np
    from PIL import Image

    from stpm.options import CalibrationOptions, ModelOptions, TrainingOptions, TrainOptions
    from stpm.training.pipeline import run_training

    root = tmp_path_factory.mktemp("ui-framed")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        a = rng.integers(90, 110, (64, 64, 3), dtype=np.uint8)
        a[:, -8:] = 230  # the rim every good part has
        paths.append(root / f"good{i:02d}.png")
        Image.fromarray(a).save(paths[-1])
    cfg = TrainingOptions(model=ModelOptions(backbone="resnet18", pretrained=False, image_size=64, sigma=4.0,
                                             image_score="max", position_prior="on"),
                          train=TrainOptions(device="cpu", val_fraction=0.25),
                          calibration=CalibrationOptions(folds=3))
    run_training(paths, "framed", root / "models", cfg, show_bar=False)
    # and one whose resolution was searched: 40 images of 128 px at 64 px tiles, 10 held out (the search's minimum)
    searched = []
    for i in range(40):
        searched.append(root / f"part{i:02d}.png")
        Image.fromarray(rng.integers(60, 200, (128, 128, 3), dtype=np.uint8)).save(searched[-1])
    cfg = TrainingOptions(model=ModelOptions(backbone="resnet18", pretrained=False, image_size=64, layers=("layer2",),
                                             sigma=4.0, image_score="max", position_prior="off"),
                          train=TrainOptions(device="cpu", val_fraction=0.25, search_settings="on"))
    run_training(searched, "searched", root / "models", cfg, show_bar=False, export=False)
    proc, url = start_uvicorn(root / "models", {"STPM_DATA_DIR": str(root / "data")})
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A server with an API key and no model at all."""
    root = tmp_path_factory.mktemp("ui-key")
    (root / "models").mkdir()
    proc, url = start_uvicorn(root / "models", {"STPM_API_KEY": KEY, "STPM_DATA_DIR": str(root / "data")})
    yield url
    stop(proc)


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1, reduced_motion="reduce")
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(20_000)
    # Turn file-chooser interception on now: the first expect_file_chooser() enables it lazily, and a
    # key press can race ahead of that and open a real (invisible) dialog instead.
    pg.on("filechooser", lambda chooser: None)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def loaded(img) -> bool:
    return img.evaluate("i => i.complete && i.naturalWidth > 0")


def test_page_and_assets_are_public_and_safe(keyed_server):
    r = httpx.get(keyed_server + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert httpx.get(f"{keyed_server}/ui/{asset}").status_code == 200
    assert httpx.get(keyed_server + "/ui/../main.py").status_code in (401, 404)
    assert httpx.get(keyed_server + "/ui/nope.js").status_code == 404
    assert httpx.get(keyed_server + "/models").status_code == 401  # the API itself stays protected


def test_score_real_images_shows_overlays_scores_and_json(page, server):
    imgs = need_images("broken_large", 2) + need_images("good", 2)
    page.goto(server + "/")
    page.wait_for_selector("#score-model option[value='demo']", state="attached")
    assert page.locator("#score-version option").count() == 3  # active + v2 + v1
    page.set_input_files("#score-files", [str(p) for p in imgs])
    page.wait_for_function("() => document.querySelectorAll('#results .result:not(.pending)').length === 4")
    cards = page.locator("#results .result")
    assert cards.count() == 4
    for i in range(4):
        card = cards.nth(i)
        assert card.get_attribute("data-decision") in ("ok", "anomaly")
        card.locator("img.overlay").wait_for()
        page.wait_for_function("c => [...c.querySelectorAll('img')].every(i => i.complete)", arg=card.element_handle())
        assert loaded(card.locator("img.original")) and loaded(card.locator("img.overlay"))
        score = float(card.get_attribute("data-score"))
        assert 0.0 <= score <= 1.0
        width = card.locator(".scorebar-fill").evaluate("e => e.style.width")
        assert width.endswith("%") and abs(float(width[:-1]) - score * 100) < 0.06
        assert (card.get_attribute("data-decision") == "anomaly") == (score > 0.5)
    assert "4 images" in page.locator("#score-summary").inner_text()
    raw = cards.first.locator("details.raw")
    raw.locator("summary").click()
    text = raw.locator("pre").inner_text()
    assert '"score"' in text and '"model": "demo"' in text and "base64 chars" in text
    shot(page, "score")  # docs/img/ui-score.png shows a trained model instead (docs/UI.md)


def test_bad_file_is_named_and_the_rest_still_scored(page, server, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    good = need_images("good", 1)[0]
    page.goto(server + "/")
    page.wait_for_selector("#score-model option[value='demo']", state="attached")
    page.set_input_files("#score-files", [str(bad), str(good)])
    page.wait_for_function("() => document.querySelectorAll('#results .result:not(.pending)').length === 2")
    failed = page.locator(".result[data-decision='error']")
    assert failed.count() == 1
    msg = failed.locator(".msg").inner_text()
    assert "notes.txt" in msg and "not a readable image" in msg
    ok = page.locator(".result:not([data-decision='error'])")
    assert ok.count() == 1 and loaded(ok.locator("img.overlay"))
    assert "1 could not be scored" in page.locator("#score-summary").inner_text()
    shot(page, "bad-file")


def test_drag_and_drop_and_keyboard_pick(page, server):
    import base64

    img = need_images("broken_large", 1)[0]
    page.goto(server + "/")
    page.wait_for_selector("#score-model option[value='demo']", state="attached")
    # Keyboard and click open the file picker.
    page.focus("#dropzone")
    with page.expect_file_chooser() as fc:
        page.keyboard.press("Enter")
    assert fc.value.is_multiple()
    with page.expect_file_chooser() as fc:
        page.click("#dropzone")
    assert fc.value.element.get_attribute("id") == "score-files"
    data = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            return dt;
        }""",
        [base64.b64encode(img.read_bytes()).decode(), "dropped.png"],
    )
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": data})
    assert "drag" in page.get_attribute("#dropzone", "class")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": data})
    card = page.locator(".result:not(.pending)")
    card.wait_for()
    assert card.locator("h3").inner_text() == "dropped.png"
    assert loaded(card.locator("img.overlay"))
    page.click("#tab-train")
    with page.expect_file_chooser() as fc:
        page.click("label:has-text('Choose a folder')")
    assert fc.value.element.get_attribute("id") == "train-folder"


def test_api_key_flow_and_no_model_message(page, keyed_server):
    good = need_images("good", 1)[0]
    page.goto(keyed_server + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")  # the first API call answered 401: the page asks for the key
    assert "needs an API key" in page.locator("#key-reason").inner_text()
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    page.wait_for_selector("#key-reason:has-text('refused')")  # asked again, saying why
    page.click("#key-cancel")
    dialog.wait_for(state="hidden")
    page.set_input_files("#score-files", [str(good)])
    page.wait_for_selector(".result[data-decision='error']")
    assert "refused" in page.locator(".result .msg").first.inner_text()
    assert not dialog.is_visible()  # not nagged twice
    page.click("#key-button")
    page.fill("#key-input", KEY)
    assert not page.is_checked("#key-remember")  # session-only unless asked
    page.click("#key-save")
    assert page.evaluate("sessionStorage.getItem('stpm.apiKey')") == KEY
    assert page.evaluate("localStorage.getItem('stpm.apiKey')") is None
    page.wait_for_selector("#score-model-help:has-text('Train a model first')")
    page.click("#score-clear")
    page.set_input_files("#score-files", [str(good)])
    page.wait_for_selector(".result[data-decision='error']")
    assert "train one first" in page.locator(".result .msg").inner_text()
    assert "train one first" in page.locator("#banner-text").inner_text()
    page.click("#tab-models")
    page.wait_for_selector("#models-list:has-text('No models yet')")
    # The key survives a reload of this tab; no dialog this time.
    page.reload()  # back on #models
    page.wait_for_selector("#models-list:has-text('No models yet')")
    assert not dialog.is_visible()
    shot(page, "api-key")
    # Another tab does not have a session-only key; "Remember on this device" keeps it for all tabs.
    other = page.context.new_page()
    other.set_default_timeout(20_000)
    other.goto(keyed_server + "/")
    other.locator("#key-dialog").wait_for(state="visible")
    other.fill("#key-input", KEY)
    other.check("#key-remember")
    other.click("#key-save")
    assert other.evaluate("localStorage.getItem('stpm.apiKey')") == KEY
    third = page.context.new_page()
    third.goto(keyed_server + "/#models")
    third.wait_for_selector("#models-list:has-text('No models yet')")
    assert not third.locator("#key-dialog").is_visible()
    third.click("#key-button")
    third.click("#key-forget")
    assert third.evaluate("localStorage.getItem('stpm.apiKey')") is None


def test_narrow_screen_has_no_horizontal_scroll(browser, server):
    ctx = browser.new_context(viewport={"width": 390, "height": 800}, device_scale_factor=1, reduced_motion="reduce")
    try:
        pg = ctx.new_page()
        for tab in ("score", "train", "models"):
            pg.goto(f"{server}/#{tab}")
            pg.wait_for_selector(f"#panel-{tab}:not([hidden])")
            pg.wait_for_selector({"score": "#score-model option[value='demo']", "train": "#jobs-list:not(:has-text('—'))",
                                  "models": "section.model"}[tab], state="attached")
            overflow = pg.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{tab}: {overflow}px wider than a phone screen"
        shot(pg, "narrow-models")
    finally:
        ctx.close()


def test_models_tab_activate_and_delete(page, server):
    page.goto(server + "/#models")
    card = page.locator("section.model[data-model='demo']")
    card.wait_for()
    v1 = card.locator("tr[data-version='v1']")
    v2 = card.locator("tr[data-version='v2']")
    assert v2.locator(".pill:has-text('active')").count() == 1
    v1.locator("summary:has-text('Calibration')").click()
    v1.locator("dt:has-text('Threshold')").wait_for()
    assert "held-out good images" in v1.inner_text()
    # an evaluation recorded by `stpm eval` shows its other operating points (here: recorded for demo/v1 below)
    assert card.locator("li.operating-points").count() == 0
    record_eval(server_models(server), "demo", "v1")
    page.reload()
    card.wait_for()
    points = card.locator("tr[data-version='v1'] li.operating-points")
    points.wait_for()
    assert "2.0 % → FPR 0.0 %, R 0.86" in points.inner_text() and "10.0 % → FPR 7.7 %, R 1" in points.inner_text()
    assert "1.0 % →" not in points.inner_text()  # the model's own target is the line above it
    v1.locator("button:has-text('Activate')").click()
    page.wait_for_selector("section.model[data-model='demo'] tr[data-version='v1'] .pill:has-text('active')")
    shot(page, "models")
    # Delete the now inactive v2: asks first; Cancel keeps it.
    v2.locator("button:has-text('Delete')").click()
    page.locator("#confirm-dialog").wait_for(state="visible")
    assert "demo/v2" in page.locator("#confirm-title").inner_text()
    page.click("#confirm-no")
    assert v2.count() == 1
    v2.locator("button:has-text('Delete')").click()
    page.click("#confirm-yes")
    page.wait_for_selector("section.model[data-model='demo'] tr[data-version='v2']", state="detached")
    assert card.locator("tbody tr").count() == 1
    assert httpx.get(server + "/models/demo").json()["active_version"] == "v1"


def open_details(page, url: str, model: str, line: str):
    """The Models tab's row of `model`/v1 with its calibration details open and their `line` shown."""
    page.goto(url + "/#models")
    v1 = page.locator(f"section.model[data-model='{model}'] tr[data-version='v1']")
    v1.wait_for()
    v1.locator("summary:has-text('Calibration')").click()
    v1.locator(f"dt:has-text('{line}')").wait_for()
    return v1


def test_models_tab_names_the_position_prior(page, framed_server):
    text = open_details(page, framed_server, "framed", "Image score").inner_text()
    assert "max · less a position prior (8 × 8 grid)" in text  # 64 px maps in 8 px cells
    assert "kept (on): synthetic image AUROC" in text and "from 9 out-of-fold images" in text  # 12 less 3 held out
    # cross-fitted calibration: the count says where its good scores came from
    assert "12 good images: 3 held out, 9 training images scored out of fold" in text


def test_models_tab_names_the_resolution_the_search_chose(page, framed_server):
    v1 = open_details(page, framed_server, "searched", "Resolution")
    text = v1.locator("dt:has-text('Resolution') + dd").inner_text()
    # both scales tried (the layers were given), the choice with its tiles, and the search's time
    assert re.search(r"^x[12] the default scale, layers layer2 \(1 tile of (64|128) px per image\); synthetic image AUROC: "
                     r"x1 layer2 [\d.]+ · x2 layer2 [\d.]+ \(search [\d.]+ s\)$", text), text


def test_train_tiny_job_from_a_folder_cancel_another(page, server, tmp_path):
    folder = tmp_path / "good-bottles"
    folder.mkdir()
    for p in train_images(10):
        shutil.copyfile(p, folder / p.name)
    (folder / "README.txt").write_text("ignored: not an image")
    page.goto(server + "/#train")
    page.set_input_files("#train-folder", str(folder))
    page.wait_for_selector("#train-picked:has-text('10 images chosen')")
    assert "1 other file ignored" in page.locator("#train-picked").inner_text()
    assert page.input_value("#train-name") == "good-bottles"  # suggested from the folder name
    page.fill("#train-name", "tiny")
    page.select_option("#train-method", "stpm")  # epochs: a job long enough to cancel the next one behind
    page.select_option("#train-image-size", "64")
    page.fill("#train-epochs", "1")
    page.click("details.advanced summary")
    page.uncheck("#train-pretrained")
    page.fill("#train-batch-size", "4")
    page.click("#train-start")
    state = page.locator("#job-state")
    page.wait_for_selector("#job-title:has-text('tiny')")
    tiny_id = page.evaluate("() => localStorage.getItem('stpm.lastJob')")
    # A second job queues behind the first (one at a time); cancel it from the page.
    page.fill("#train-name", "to-cancel")
    page.fill("#train-epochs", "50")
    page.click("#train-start")
    page.wait_for_selector("#job-title:has-text('to-cancel')")
    page.click("#job-cancel")
    page.click("#confirm-yes")
    page.wait_for_selector("#job-state[data-state='cancelled']", timeout=120_000)
    assert "Cancelled" in page.locator("#job-progress-text").inner_text()
    # Back to the first job through the list of recent jobs; watch it finish.
    page.locator(f"#jobs-list tr[data-job='{tiny_id}'] button").click()
    page.wait_for_selector("#job-title:has-text('tiny')")
    page.wait_for_function(
        "() => ['succeeded', 'failed', 'cancelled'].includes(document.querySelector('#job-state').dataset.state)",
        timeout=240_000,
    )
    assert state.get_attribute("data-state") == "succeeded", page.locator("#job").inner_text()
    assert "Published tiny/v1 and made active" in page.locator("#job-result").inner_text()
    page.wait_for_selector("#job-result .calibration:has-text('calibrated on')")
    shot(page, "train", doc=True)
    page.click("#job-use")
    page.wait_for_selector("#panel-score:not([hidden])")
    assert page.input_value("#score-model") == "tiny"
    page.set_input_files("#score-files", [str(need_images("broken_large", 1)[0])])
    page.wait_for_selector(".result:not(.pending)")
    assert page.locator(".result .thr").inner_text().endswith("tiny/v1")
