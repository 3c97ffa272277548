"""Choosing a model's resolution and feature layers without a single defect image.

The default scale (tile / median short side) shrinks a 1024 px part to 256 px, where a scratch or a
pin-hole of a few pixels vanishes; the default layers see the image at stride 8 / 16. What the user leaves
open (no `--scale` / `--resolution`, no `--layers`) is chosen here, before the final fit (`search_settings`:
auto, the default, the scale alone and only where the default scale shrinks the images 2x or more; on, the
scale and the layers; off): every candidate (the default scale and 2x finer, within the tile budget; with
on, the method's layer sets) is fitted on a sample of the training images and scored on synthetic
anomalies of the held-out good images (all kinds, including `fine` ones a few input pixels wide:
stpm.training.synthetic), exactly as model selection scores its smoothing. The highest synthetic image
AUROC wins; a finer (costlier) scale or another layer set must beat the cheapest candidate by TOLERANCE,
so detail is bought only where the data shows it matters. Candidates whose full fit or trial would exceed
the time budgets (extrapolated from the trials so far) are left out; with auto, so is a finer scale whose
whole training (the search, then the final fit and its scoring passes) is expected beyond TRAIN_BUDGET_S.
Every candidate, those left out and why, and the choice go into the manifest (`training.settings`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from stpm.imaging.geometry import Geometry, plan, tile_images
from stpm.methods import registry
from stpm.methods.base import FitData, FitRun
from stpm.options import ModelOptions, TrainingOptions, updated
from stpm.training.selection import PER_IMAGE, select

log = logging.getLogger("stpm.training.settings")

# multiples of the default scale tried when the scale is left open; 4x finer would need 16x the default's model
# input (a 1024 px tile where the default needs one of 256), and 16x its scoring cost
SCALE_FACTORS = (1.0, 2.0)
# a finer scale is tried only if the median image then needs at most this many default tiles' pixels
MAX_TILES_PER_IMAGE = 16
MAX_TILE = 1024  # the largest tile a finer scale grows to (ModelOptions.image_size's bound)
SAMPLE_IMAGES = 24  # training images each candidate is fitted on (the final fit uses all of them)
TOLERANCE = 0.01  # synthetic image AUROC a costlier candidate must gain over the cheapest one
BUDGET_S = 600.0  # a candidate whose full fit would take longer (extrapolated) is not tried further
SEARCH_BUDGET_S = 480.0  # once the search has taken this long, the candidates not yet tried are left out
# below this many held-out good images the synthetic AUROC of two settings differs by noise more than by
# TOLERANCE (10 images: 10 good vs 20 synthetic, a step of 0.005), so the defaults are kept
MIN_HELD_OUT = 10
# search_settings auto: a finer candidate only where the whole training it leads to is expected within this
# (the search so far, then the final fit and its scoring passes: `expected_final_s`), so that the defaults keep
# to the 15 minutes on two CPU cores with room for a slower CPU and the export
TRAIN_BUDGET_S = 720.0
# the final model's scoring costs more per image than the trial's: its memory bank holds 1 % of every
# training image's patches, not of the sample's (at least MIN_BANK rows either way); measured on bottle at
# 2x (docs/BENCHMARKS.md, "The settings search by default")
FINAL_SCORING_FACTOR = 1.5
# search_settings auto: only where the default scale shrinks the (median) image by 2x or more, as a 512 px or
# larger part at tile 256, where a defect 2 px wide is at most one pixel of model input
AUTO_MAX_SCALE = 0.5


@dataclass(frozen=True)
class Setting:
    factor: float  # the scale as a multiple of the default scale
    layers: tuple[str, ...]
    cost: int = field(default=0, compare=False)  # the median image's model input in pixels (0: not planned)

    def describe(self) -> str:
        return f"scale x{self.factor:g}, layers {','.join(self.layers)}"


def candidates(config: TrainingOptions, model_cfg: ModelOptions, geometry: Geometry,
               sizes: Sequence[tuple[int, int]], n_held_out: int) -> list[Setting]:
    """The settings to try, cheapest first: what the options fix is fixed, what they leave open is searched
    (`search_settings` on: the scale and the layers; auto: the scale alone, only where the default scale
    shrinks the images by 1 / AUTO_MAX_SCALE or more; only for a method cheap to fit again, with at least
    MIN_HELD_OUT held-out images to judge by)."""
    t, mode = config.tiling, config.train.search_settings
    default = [Setting(1.0, model_cfg.layers)]
    if mode == "off" or not registry.spec(model_cfg.method).cheap_fit or n_held_out < MIN_HELD_OUT:
        return default
    if mode == "auto" and geometry.scale > AUTO_MAX_SCALE * (1 + 1e-6):
        return default  # the default scale keeps the detail (at most a 2x reduction): nothing to search
    median = (int(np.median([h for h, _ in sizes])), int(np.median([w for _, w in sizes])))
    factors = {1.0: _input_pixels(median, geometry)}
    if t.mode == "tile" and t.scale is None and t.resolution is None:
        largest = max(sizes, key=lambda s: s[0] * s[1])
        for f in SCALE_FACTORS[1:]:
            g = finer(geometry, f)
            if (_input_pixels(median, g) > MAX_TILES_PER_IMAGE * geometry.tile ** 2
                    or plan(*largest, g).n_tiles > g.max_tiles):
                break
            factors[f] = _input_pixels(median, g)
    layer_sets = [model_cfg.layers]
    if mode == "on" and not config.model.layers:  # left open: the method's alternatives too
        layer_sets += [ls for ls in registry.spec(model_cfg.method).layer_candidates(model_cfg.backbone)
                       if ls != model_cfg.layers]
    return [Setting(f, ls, n) for f, n in factors.items() for ls in layer_sets]


def finer(geometry: Geometry, factor: float) -> Geometry:
    """The geometry at `factor` x the default scale. The tile grows with it (up to MAX_TILE px), so an image
    needs as many tiles as at the default scale, each factor^2 the pixels: bottle at 2x is one 512 px tile,
    not nine overlapping 256 px ones (2.25x the pixels, and tile borders inside the part): 38 ms per image
    instead of 117, pixel AUROC 0.985 instead of 0.983, and metal plate's 2x then wins its search
    (docs/BENCHMARKS.md, "The settings search by default"). max_tiles shrinks to keep the pixel budget
    (max_tiles x tile^2)."""
    if factor == 1.0:
        return geometry
    tile = min(int(round(geometry.tile * factor)), MAX_TILE)
    return replace(geometry, scale=geometry.scale * factor, tile=tile,
                   max_tiles=max(1, geometry.max_tiles * geometry.tile ** 2 // tile ** 2))


def _input_pixels(size: tuple[int, int], geometry: Geometry) -> int:
    """Model input pixels an image of `size` needs at `geometry`: its tiles x the tile's pixels."""
    return plan(*size, geometry).n_tiles * geometry.tile ** 2


@dataclass
class Trial:
    setting: Setting
    tiles_per_image: float
    sample_fit_s: float
    full_fit_s: float  # extrapolated to every training image
    synthetic_image_auroc: float
    synthetic_pixel_auroc: float
    per_kind: dict[str, float]
    trial_s: float = 0.0  # the whole trial: the sample fit and the scoring of the synthetic anomalies
    tile: int = 0  # the tile size in pixels at this setting (finer)

    def record(self) -> dict[str, Any]:
        return {"scale_factor": self.setting.factor, "layers": list(self.setting.layers), "tile": self.tile,
                "tiles_per_image": round(self.tiles_per_image, 2), "sample_fit_s": round(self.sample_fit_s, 1),
                "full_fit_s_estimate": round(self.full_fit_s, 1), "trial_s": round(self.trial_s, 1),
                "synthetic_image_auroc": self.synthetic_image_auroc,
                "synthetic_pixel_auroc": self.synthetic_pixel_auroc, "per_kind_image_auroc": self.per_kind}


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """k of n indices, deterministic given the seed (the training images the candidates are fitted on)."""
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


def _try(setting: Setting, train_images: list[np.ndarray], val_images: list[np.ndarray], n_train: int,
         geometry: Geometry, model_cfg: ModelOptions, config: TrainingOptions, run: FitRun,
         gen: torch.Generator) -> Trial:
    """Fit `setting` on the sample and score it on the synthetic anomalies of the held-out images."""
    g = finer(geometry, setting.factor)
    train, val = tile_images(train_images, g), tile_images(val_images, g)
    cfg = updated(model_cfg, layers=setting.layers, image_size=g.tile)
    quiet = replace(run, progress=None, show_bar=False)
    t0 = time.monotonic()
    fitted = registry.method(cfg.method).fit(cfg, config.train, FitData(train, val, config.train.seed, gen), quiet)
    sample_s = time.monotonic() - t0
    chosen = select(fitted.amap.to(run.device), run.device, val, val_images, g, cfg, config.train.seed,
                    config.train.batch_size)
    best = max(chosen.report["candidates"], key=lambda r: r["synthetic_image_auroc"])
    return Trial(setting, len(train.tiles) / max(len(train_images), 1), sample_s,
                 sample_s * n_train / max(len(train_images), 1), best["synthetic_image_auroc"],
                 best["synthetic_pixel_auroc"], best.get("per_kind_image_auroc", {}), time.monotonic() - t0, g.tile)


def _choose(trials: list[Trial]) -> Trial:
    """The cheapest trial (the first) unless another beats it by TOLERANCE; among those that do, the best."""
    base = trials[0]
    better = [t for t in trials[1:] if t.synthetic_image_auroc >= base.synthetic_image_auroc + TOLERANCE]
    if not better:
        return base
    return max(better, key=lambda t: (t.synthetic_image_auroc, np.nan_to_num(t.synthetic_pixel_auroc, nan=-1.0),
                                      -t.tiles_per_image * t.tile ** 2))


@dataclass
class Choice:
    setting: Setting
    report: dict[str, Any]


def choose(settings: list[Setting], train_images: list[np.ndarray], val_images: list[np.ndarray],
           n_train: int, geometry: Geometry, model_cfg: ModelOptions, config: TrainingOptions, run: FitRun,
           gen: torch.Generator, spent_before_s: float = 0.0) -> Choice:
    """Try every setting on a sample of the training images (cheapest first, within the time budgets; with
    `search_settings` auto also within TRAIN_BUDGET_S for the whole training, of which `spent_before_s`
    went before the search)."""
    trials: list[Trial] = []
    left_out: list[dict[str, Any]] = []
    budget = Budget(n_train, len(val_images), spent_before_s if config.train.search_settings == "auto" else None)
    t0 = time.monotonic()
    for s in settings:
        why = _left_out_because(s, trials, time.monotonic() - t0, budget)
        if why:
            log.info("settings: %s left out (%s)", s.describe(), why)
            left_out.append({"scale_factor": s.factor, "layers": list(s.layers), "why": why})
            continue
        run.check_stop()
        run.report({"phase": f"settings: {s.describe()}", "epoch": 1, "epochs": 1, "step": len(trials) + 1,
                    "steps": len(settings)})
        trial = _try(s, train_images, val_images, n_train, geometry, model_cfg, config, run, gen)
        log.info("settings: %s: synthetic image AUROC %.4f (%.0f s on %d images)", s.describe(),
                 trial.synthetic_image_auroc, trial.sample_fit_s, len(train_images))
        why = _over_budget(trial, time.monotonic() - t0, budget) if trials else None
        if why:  # measured, but the final training it would lead to is not affordable
            log.info("settings: %s not chosen (%s)", s.describe(), why)
            left_out.append({**trial.record(), "why": why})
            continue
        trials.append(trial)
    best = _choose(trials)
    report = {"candidates": [t.record() for t in trials], "left_out": left_out, "chosen": best.record(),
              "n_sample_images": len(train_images), "tolerance": TOLERANCE, "budget_s": BUDGET_S,
              "search_budget_s": SEARCH_BUDGET_S, "search_s": round(time.monotonic() - t0, 1),
              "reason": "the cheapest setting (default scale and layers first) unless another beats its synthetic "
                        f"image AUROC by {TOLERANCE}; then the best of those"}
    if budget.spent_before_s is not None:
        report.update(mode="auto", train_budget_s=TRAIN_BUDGET_S, spent_before_s=round(spent_before_s, 1),
                      expected_final_s={f"x{t.setting.factor:g}": round(expected_final_s(t, budget), 1)
                                        for t in trials})
    return Choice(best.setting, report)


@dataclass(frozen=True)
class Budget:
    """What the whole-training budget (TRAIN_BUDGET_S) needs to know: the final fit's images, and the time
    spent before the search (None: no whole-training budget, `search_settings` on)."""

    n_train: int
    n_val: int
    spent_before_s: float | None


def expected_final_s(trial: Trial, budget: Budget, ratio: float = 1.0) -> float:
    """The final training at a trial's setting (x `ratio` the cost), expected from the trial: its sample fit
    scaled to every training image, and its scoring (each held-out image and its PER_IMAGE synthetic
    anomalies) scaled to the final model's passes: every training image out of fold, and the held-out images
    and their synthetic anomalies again (model selection), at FINAL_SCORING_FACTOR the cost per image."""
    scored = budget.n_val * (1 + PER_IMAGE)
    per_image = max(trial.trial_s - trial.sample_fit_s, 0.0) / max(scored, 1)
    return ratio * (trial.full_fit_s + FINAL_SCORING_FACTOR * per_image * (budget.n_train + scored))


def _over_budget(trial: Trial, spent_s: float, budget: Budget, ratio: float = 1.0, ahead_s: float = 0.0) -> str | None:
    """Why the whole training would overrun TRAIN_BUDGET_S (auto only) at `trial`'s setting, or at a setting
    `ratio` times as costly whose trial is still `ahead_s` away; else None."""
    if budget.spent_before_s is None:
        return None
    total = budget.spent_before_s + spent_s + ahead_s + expected_final_s(trial, budget, ratio)
    if total > TRAIN_BUDGET_S:
        return (f"the whole training would take about {total:.0f} s, over the {TRAIN_BUDGET_S:.0f} s of "
                "search_settings auto")
    return None


def _left_out_because(s: Setting, trials: list[Trial], spent_s: float, budget: Budget | None = None) -> str | None:
    """Why a setting is not tried (the time budgets), or None. A trial's time is mostly the scoring of the
    held-out images' synthetic anomalies, not its sample fit (bottle at 2x: 19 s of fit in a search of 762
    s), so the search budget is checked against the time the trial is expected to take (the first trial's,
    scaled by the tiles), not only the time already spent."""
    if trials and spent_s > SEARCH_BUDGET_S:
        return f"the search had taken {spent_s:.0f} s of its {SEARCH_BUDGET_S:.0f}"
    expected = trials[0].trial_s * _cost_ratio(trials[0], s) if trials else 0.0
    if trials and spent_s + expected > SEARCH_BUDGET_S:
        return (f"it would take the search past its {SEARCH_BUDGET_S:.0f} s (about {expected:.0f} s more after "
                f"{spent_s:.0f} s)")
    if trials and trials[0].full_fit_s * _cost_ratio(trials[0], s) > BUDGET_S:
        return f"its full fit would exceed {BUDGET_S:.0f} s"
    if trials and budget is not None:
        # the whole-training budget (auto) screens with the area ratio, a lower bound on the cost (tiles cover at
        # least the area; the trials' fixed costs do not grow): only what cannot fit is left out untried, and the
        # candidate's own trial then decides (choose). By the tiles, bottle's 2x would be expected at 474 s where
        # it took 319 s (Zen 5), and a CPU half as fast would never try it.
        area = (s.factor / trials[0].setting.factor) ** 2
        return _over_budget(trials[0], spent_s, budget, area, trials[0].trial_s * area)
    return None


def _cost_ratio(base: Trial, s: Setting) -> float:
    """Roughly how much more a setting's fit costs than the base trial's: as the model input its median
    image needs (tiles x tile pixels), else with the scale squared."""
    if s.cost and base.setting.cost:
        return s.cost / base.setting.cost
    return (s.factor / base.setting.factor) ** 2


__all__ = ["AUTO_MAX_SCALE", "MIN_HELD_OUT", "SAMPLE_IMAGES", "TRAIN_BUDGET_S", "Choice", "Setting", "candidates", "choose",
           "expected_final_s", "finer", "sample_indices"]
