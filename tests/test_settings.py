"""Choosing resolution and feature layers on synthetic anomalies (stpm.training.settings, issue 25 part 3).

Which settings are tried (only what the options leave open, only within the tile budget, only with enough
held-out images to judge by), the choice rule (the cheapest unless another is clearly better), the `fine`
synthetic kind (a few input pixels, whatever the image size), and the search deterministic given its seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from stpm.imaging.geometry import Geometry
from stpm.methods.base import FitRun
from stpm.options import ModelOptions, TilingOptions, TrainingOptions, TrainOptions, build
from stpm.training import settings
from stpm.training.pipeline import resolved
from stpm.training.reproducible import reproducible
from stpm.training.synthetic import fine, scar

HELD_OUT = settings.MIN_HELD_OUT


def _candidates(config: TrainingOptions, size: int = 1024, held_out: int = HELD_OUT, aspect: int = 1):
    model_cfg = resolved(config.model)
    geometry = Geometry(tile=config.model.image_size, scale=config.model.image_size / size)
    return settings.candidates(config, model_cfg, geometry, [(size, aspect * size)] * 30, held_out)


def test_the_search_covers_what_the_options_leave_open_within_the_tile_budget():
    open_ = _candidates(build({"search_settings": "on"}))
    default_layers = resolved(ModelOptions()).layers
    assert open_[0] == settings.Setting(1.0, default_layers)  # the default first: it wins ties
    # square parts at tile 256: x2 needs 9 tiles per image (within MAX_TILES_PER_IMAGE)
    assert sorted({s.factor for s in open_}) == [1.0, 2.0]
    assert len({s.layers for s in open_}) == 2 and len(open_) == 4
    # the finer layer set is the default pair with the stage below it: a stride-4 grid, the same receptive fields
    finer = next(s.layers for s in open_ if s.layers != default_layers)
    assert finer[1:] == default_layers and len(finer) == 3
    # elongated ones (1:4, as KolektorSDD): x2 would need 3 x 11 tiles, so only the default scale is tried
    assert {s.factor for s in _candidates(build({"search_settings": "on"}), size=256, aspect=4)} == {1.0}
    # what the user fixes stays fixed
    assert {s.factor for s in _candidates(build({"search_settings": "on", "scale": 0.25}))} == {1.0}
    assert {s.factor for s in _candidates(build({"search_settings": "on", "resolution": 256}))} == {1.0}
    fixed_layers = _candidates(build({"search_settings": "on", "layers": "blocks.1,blocks.2"}))
    assert {s.layers for s in fixed_layers} == {("blocks.1", "blocks.2")}
    # a method with a training loop, or too few held-out images to judge by: the defaults, no search
    assert len(_candidates(build({"search_settings": "on", "method": "stpm"}))) == 1
    assert _candidates(build({"search_settings": "on"}), held_out=HELD_OUT - 1) == [settings.Setting(1.0, default_layers)]
    assert _candidates(build({"search_settings": "off"})) == [settings.Setting(1.0, default_layers)]


def test_auto_searches_the_scale_alone_where_the_default_scale_loses_detail():
    """The default (auto): where the default scale shrinks the images 2x or more (a 1024 px part at tile 256,
    and the 512 px boundary itself), the default scale and 2x finer on the default layers; elsewhere (a part
    shown at 0.64x) nothing is searched. A job queued when the option was a boolean still reads."""
    default_layers = resolved(ModelOptions()).layers
    assert build({}).train.search_settings == "auto"
    for size in (1024, 512):
        assert _candidates(build({}), size=size) == [settings.Setting(1.0, default_layers),
                                                     settings.Setting(2.0, default_layers)]
    assert _candidates(build({}), size=400) == [settings.Setting(1.0, default_layers)]
    # 2x grows the tile with the scale: a 1024 px part is one 256 px tile at the default scale and one 512 px
    # tile at 2x (not nine overlapping 256 px ones), within the same pixel budget; the time budgets scale the
    # default's trial by the model input
    one, two = _candidates(build({}), size=1024)
    assert (one.cost, two.cost) == (256 ** 2, 512 ** 2)
    assert settings._cost_ratio(settings.Trial(one, 1.0, 1.0, 1.0, 0.9, 0.9, {}), two) == 4
    g = Geometry(tile=256, scale=0.25, max_tiles=64)
    assert settings.finer(g, 1.0) is g
    assert (settings.finer(g, 2.0).tile, settings.finer(g, 2.0).scale, settings.finer(g, 2.0).max_tiles) == (512, 0.5, 16)
    assert settings.finer(Geometry(tile=768, scale=0.25), 2.0).tile == settings.MAX_TILE
    assert _candidates(build({}), held_out=HELD_OUT - 1) == [settings.Setting(1.0, default_layers)]
    assert build({"search_settings": True}).train.search_settings == "on"
    assert build({"search_settings": False}).train.search_settings == "off"


def test_auto_buys_a_finer_scale_only_where_the_whole_training_fits_its_budget():
    """The final training at a setting is expected from its trial (the sample fit scaled to every training
    image; the trial's scoring per image scaled to the final passes); auto leaves 2x out before its trial
    when the default's trial at the area ratio (4x: a lower bound, whatever the tiles) says the whole training
    would overrun, and after it when its own trial says so. `on` has no whole-training budget."""
    base = settings.Trial(settings.Setting(1.0, ("a",)), 1.0, 1.0, 5.0, 0.9, 0.9, {}, trial_s=31.0)
    budget = settings.Budget(n_train=20, n_val=10, spent_before_s=5.0)
    # scoring: 30 s for 10 held-out images and their 20 synthetic anomalies -> 1 s per image, 50 images
    assert settings.expected_final_s(base, budget) == pytest.approx(5 + settings.FINAL_SCORING_FACTOR * 50)
    assert settings.expected_final_s(base, budget, 4.0) == pytest.approx(4 * settings.expected_final_s(base, budget))
    finer = settings.Setting(2.0, ("a",))
    whole = budget.spent_before_s + 31 + 4 * 31 + 4 * settings.expected_final_s(base, budget)
    assert whole < settings.TRAIN_BUDGET_S and settings._left_out_because(finer, [base], 31.0, budget) is None
    big = settings.Budget(n_train=1000, n_val=10, spent_before_s=5.0)
    assert "whole training" in settings._left_out_because(finer, [base], 31.0, big)
    assert settings._left_out_because(finer, [base], 31.0, settings.Budget(1000, 10, None)) is None  # on
    # planned at 9 overlapping tiles, 2x would overrun by the tiles, but the screen leaves out only what cannot fit
    tiled = settings.Trial(settings.Setting(1.0, ("a",), 1), 1.0, 1.0, 5.0, 0.9, 0.9, {}, trial_s=31.0)
    assert budget.spent_before_s + 31 + 9 * 31 + 9 * settings.expected_final_s(base, budget) > settings.TRAIN_BUDGET_S
    assert settings._left_out_because(settings.Setting(2.0, ("a",), 9), [tiled], 31.0, budget) is None
    assert settings._over_budget(base, 0.0, budget) is None
    assert "whole training" in settings._over_budget(base, settings.TRAIN_BUDGET_S, budget)


def _trial(factor: float, layers: tuple[str, ...], auroc: float) -> settings.Trial:
    return settings.Trial(settings.Setting(factor, layers), 1.0 * factor ** 2, 1.0, 10.0, auroc, 0.9, {})


def test_a_costlier_setting_must_beat_the_cheapest_by_the_tolerance():
    base = _trial(1.0, ("a",), 0.90)
    close = _trial(2.0, ("a",), 0.90 + settings.TOLERANCE / 2)
    assert settings._choose([base, close]) is base  # a finer scale for noise is not bought
    clear = _trial(2.0, ("a",), 0.90 + 2 * settings.TOLERANCE)
    best = _trial(1.0, ("b",), 0.90 + 3 * settings.TOLERANCE)
    assert settings._choose([base, close, clear]) is clear
    assert settings._choose([base, clear, best]) is best
    assert settings._choose([_trial(1.0, ("a",), 0.99), _trial(2.0, ("a",), 0.80)]).setting.factor == 1.0


def test_the_time_budgets_leave_costly_candidates_out_never_the_default():
    finer = settings.Setting(2.0, ("a",))
    assert settings._left_out_because(settings.Setting(1.0, ("a",)), [], 1e9) is None  # the default always runs
    cheap = _trial(1.0, ("a",), 0.9)  # its full fit: 10 s
    assert settings._left_out_because(finer, [cheap], 0.0) is None
    assert "search" in settings._left_out_because(finer, [cheap], settings.SEARCH_BUDGET_S + 1)
    slow = settings.Trial(settings.Setting(1.0, ("a",)), 1.0, 1.0, settings.BUDGET_S / 2, 0.9, 0.9, {})
    assert "full fit" in settings._left_out_because(finer, [slow], 0.0)  # 4x the tiles: over the budget
    # a trial's time (fit + scoring the synthetic anomalies), scaled by the tiles, must fit in what is left
    timed = settings.Trial(settings.Setting(1.0, ("a",)), 1.0, 1.0, 10.0, 0.9, 0.9, {}, trial_s=60.0)
    assert settings._left_out_because(finer, [timed], settings.SEARCH_BUDGET_S - 4 * 60.0) is None
    why = settings._left_out_because(finer, [timed], settings.SEARCH_BUDGET_S - 4 * 60.0 + 1)
    assert "past its" in why and "about 240 s more" in why
    assert settings._left_out_because(settings.Setting(1.0, ("b",)), [timed], settings.SEARCH_BUDGET_S - 61) is None


def test_fine_anomalies_are_a_few_input_pixels_whatever_the_image_size():
    rng = np.random.default_rng(0)
    for size in (200, 800):
        img = np.full((size, size, 3), 128, np.uint8)
        areas, scar_areas = [], []
        for _ in range(40):
            out, mask = fine(img, rng)
            assert mask.any() and np.array_equal(out[~mask], img[~mask]) and not np.array_equal(out[mask], img[mask])
            # thin everywhere: no defect pixel lies more than 4 px from good ones (lines 1-3 px, pits <= 7 px across)
            assert ndimage.distance_transform_edt(mask).max() <= 4
            areas.append(mask.sum())
            scar_areas.append(scar(img, rng)[1].sum())
        assert max(areas) <= 200  # absolute: a 4x larger image gets no larger fine defects
        if size == 800:
            assert np.median(scar_areas) > 4 * np.median(areas)  # scars grow with the image; fine ones do not


@pytest.fixture(scope="module")
def tiny():
    """Random-texture images and a randomly initialised backbone (no weights needed), 64 px tiles."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (96, 96, 3), dtype=np.uint8)
    images = [np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8) for _ in range(10)]
    config = TrainingOptions(model=ModelOptions(pretrained=False, image_size=64, bank_size=500),
                             train=TrainOptions(seed=0, device="cpu", batch_size=8),
                             tiling=TilingOptions())
    return images[:6], images[6:], config


def test_the_search_is_deterministic_given_the_seed_and_records_every_candidate(tiny):
    train, val, config = tiny
    model_cfg = resolved(config.model)
    geometry = Geometry(tile=64, scale=64 / 96)
    options = [settings.Setting(1.0, model_cfg.layers), settings.Setting(2.0, model_cfg.layers)]

    def run():  # seeded as run_training seeds it (the random-weights backbone draws from torch's RNG)
        with reproducible(0, torch.device("cpu")) as gen:
            return settings.choose(options, train, val, len(train), geometry, model_cfg, config,
                                   FitRun(torch.device("cpu"), show_bar=False), gen)

    a, b = run(), run()

    def strip(r):
        return [{k: v for k, v in c.items() if not k.endswith("_s") and k != "full_fit_s_estimate"}
                for c in r["candidates"]]

    assert strip(a.report) == strip(b.report) and a.setting == b.setting
    assert [c["scale_factor"] for c in a.report["candidates"]] == [1.0, 2.0]
    c1, c2 = a.report["candidates"]
    assert c2["tile"] == 2 * c1["tile"] == 128  # the tile grows with the scale
    assert c2["tiles_per_image"] * c2["tile"] ** 2 > c1["tiles_per_image"] * c1["tile"] ** 2
    assert a.report["chosen"]["scale_factor"] == a.setting.factor and a.report["reason"]


def test_training_records_the_search_and_uses_its_choice(tiny, tmp_path, monkeypatch):
    """Through the pipeline (the held-out minimum lowered for ten tiny images): every candidate is in
    `training.settings`, and the published geometry and layers are the chosen ones."""
    from PIL import Image

    from stpm.bundle.manifest import Manifest
    from stpm.training.pipeline import run_training

    train, val, config = tiny
    for i, img in enumerate(train + val):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(settings, "MIN_HELD_OUT", 2)
    config = build({"search_settings": "on", "pretrained": False, "image_size": 64, "bank_size": 500, "layers": "blocks.2,blocks.4",
                    "device": "cpu", "batch_size": 8, "val_fraction": 0.3})
    out = run_training(sorted(tmp_path.glob("*.png")), "searched", tmp_path / "models", config, export=False,
                       show_bar=False)
    m = Manifest.read(out.path)
    rec = m.training["settings"]
    assert [c["scale_factor"] for c in rec["candidates"]] == [1.0, 2.0]  # layers were given: only the scale
    assert m.geometry.scale == pytest.approx(64 / 96 * rec["chosen"]["scale_factor"])
    assert m.geometry.tile == m.model.image_size == 64 * rec["chosen"]["scale_factor"] == rec["chosen"]["tile"]
    assert list(m.model.layers) == rec["chosen"]["layers"] == ["blocks.2", "blocks.4"]


def test_the_search_runs_where_sigma_and_image_score_are_given(tiny):
    """Given sigma and image score, model selection has nothing to choose, yet the settings search still
    compares the scales by that candidate's synthetic AUROCs (it used to find none and fail), and the maps it
    keeps are those of the given sigma."""
    train, val, config = tiny
    config = config.model_copy(update={"model": config.model.model_copy(update={"sigma": 4.0, "image_score": "max"})})
    model_cfg = resolved(config.model)
    options = [settings.Setting(1.0, model_cfg.layers), settings.Setting(2.0, model_cfg.layers)]
    with reproducible(0, torch.device("cpu")) as gen:
        choice = settings.choose(options, train, val, len(train), Geometry(tile=64, scale=64 / 96), model_cfg, config,
                                 FitRun(torch.device("cpu"), show_bar=False), gen)
    rows = choice.report["candidates"]
    assert [r["scale_factor"] for r in rows] == [1.0, 2.0]
    assert all(0.0 <= r["synthetic_image_auroc"] <= 1.0 and set(r["per_kind_image_auroc"]) for r in rows)


def test_the_default_searches_the_scale_of_large_images_within_its_budget(tmp_path):
    """With no option but the data (a random teacher and 64 px tiles for speed), 128 px images are shrunk to
    half, so `auto` tries the default scale and 2x on the default layers and records its budget and the final
    training it expected of each; the published geometry is the chosen scale."""
    from PIL import Image

    from stpm.bundle.manifest import Manifest
    from stpm.training.pipeline import run_training

    rng = np.random.default_rng(1)
    paths = []
    for i in range(40):  # 10 of them held out (val_fraction 0.25): the search's minimum
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(rng.integers(60, 200, (128, 128, 3), dtype=np.uint8)).save(paths[-1])
    config = build({"pretrained": False, "image_size": 64, "device": "cpu", "batch_size": 8, "val_fraction": 0.25})
    assert config.train.search_settings == "auto"
    out = run_training(paths, "auto", tmp_path / "models", config, export=False, show_bar=False)
    m = Manifest.read(out.path)
    rec = m.training["settings"]
    default_layers = list(resolved(ModelOptions()).layers)
    assert [(c["scale_factor"], c["layers"]) for c in rec["candidates"] + rec["left_out"]] == [
        (1.0, default_layers), (2.0, default_layers)]
    assert rec["mode"] == "auto" and rec["train_budget_s"] == settings.TRAIN_BUDGET_S and rec["spent_before_s"] >= 0
    assert set(rec["expected_final_s"]) == {f"x{c['scale_factor']:g}" for c in rec["candidates"]}
    assert m.geometry.scale == pytest.approx(64 / 128 * rec["chosen"]["scale_factor"])
    assert m.geometry.tile == 64 * rec["chosen"]["scale_factor"]
