"""Choosing a model's resolution and feature layers without a single defect image.

The default scale (tile / median short side) shrinks a 1024 px part to 256 px, where a scratch or a
pin-hole of a few pixels vanishes; the default layers see the image at stride 8 / 16. With
`search_settings` on (opt-in), what the user leaves open (no `--scale` / `--resolution`, no `--layers`) is
chosen here, before the final fit: every candidate
(the default scale and 2x finer, within the tile budget; the method's layer sets) is fitted on a
sample of the training images and scored on synthetic anomalies of the held-out good images (all kinds,
including `fine` ones a few input pixels wide: stpm.training.synthetic), exactly as model selection scores
its smoothing. The highest synthetic image AUROC wins; a finer (costlier) scale or another layer set must
beat the cheapest candidate by TOLERANCE, so detail is bought only where the data shows it matters.
Candidates whose full fit would exceed the time budget (extrapolated from their sample fit) are left out.
Every candidate, its numbers and the choice go into the manifest (`training.settings`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from stpm.imaging.geometry import Geometry, plan, tile_images
from stpm.methods import registry
from stpm.methods.base import FitData, FitRun
from stpm.options import ModelOptions, TrainingOptions, updated
from stpm.training.selection import select

log = logging.getLogger("stpm.training.settings")

# multiples of the default scale tried when the scale is left open; 4x finer would need 36 or more tiles per
# image (36x the scoring cost of one tile), beyond MAX_TILES_PER_IMAGE for any shape of image
SCALE_FACTORS = (1.0, 2.0)
MAX_TILES_PER_IMAGE = 16  # a finer scale is tried only if the median image then needs at most this many tiles
SAMPLE_IMAGES = 24  # training images each candidate is fitted on (the final fit uses all of them)
TOLERANCE = 0.01  # synthetic image AUROC a costlier candidate must gain over the cheapest one
BUDGET_S = 600.0  # a candidate whose full fit would take longer (extrapolated) is not tried further
SEARCH_BUDGET_S = 480.0  # once the search has taken this long, the candidates not yet tried are left out
# below this many held-out good images the synthetic AUROC of two settings differs by noise more than by
# TOLERANCE (10 images: 10 good vs 20 synthetic, a step of 0.005), so the defaults are kept
MIN_HELD_OUT = 10


@dataclass(frozen=True)
class Setting:
    factor: float  # the scale as a multiple of the default scale
    layers: tuple[str, ...]

    def describe(self) -> str:
        return f"scale x{self.factor:g}, layers {','.join(self.layers)}"


def candidates(config: TrainingOptions, model_cfg: ModelOptions, geometry: Geometry,
               sizes: Sequence[tuple[int, int]], n_held_out: int) -> list[Setting]:
    """The settings to try, cheapest first: what the options fix is fixed, what they leave open is searched
    (unless `search_settings` is off; only for a method cheap to fit again, with at least MIN_HELD_OUT
    held-out images to judge by)."""
    t = config.tiling
    factors = [1.0]
    if not (config.train.search_settings and registry.spec(model_cfg.method).cheap_fit) or n_held_out < MIN_HELD_OUT:
        return [Setting(1.0, model_cfg.layers)]
    if t.mode == "tile" and t.scale is None and t.resolution is None:
        median = (int(np.median([h for h, _ in sizes])), int(np.median([w for _, w in sizes])))
        largest = max(sizes, key=lambda s: s[0] * s[1])
        for f in SCALE_FACTORS[1:]:
            g = replace(geometry, scale=geometry.scale * f)
            if plan(*median, g).n_tiles > MAX_TILES_PER_IMAGE or plan(*largest, g).n_tiles > g.max_tiles:
                break
            factors.append(f)
    layer_sets = [model_cfg.layers]
    if not config.model.layers:  # left open: the method's alternatives too
        layer_sets += [ls for ls in registry.spec(model_cfg.method).layer_candidates(model_cfg.backbone)
                       if ls != model_cfg.layers]
    return [Setting(f, ls) for f in factors for ls in layer_sets]


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

    def record(self) -> dict[str, Any]:
        return {"scale_factor": self.setting.factor, "layers": list(self.setting.layers),
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
    g = replace(geometry, scale=geometry.scale * setting.factor)
    train, val = tile_images(train_images, g), tile_images(val_images, g)
    cfg = updated(model_cfg, layers=setting.layers)
    quiet = replace(run, progress=None, show_bar=False)
    t0 = time.monotonic()
    fitted = registry.method(cfg.method).fit(cfg, config.train, FitData(train, val, config.train.seed, gen), quiet)
    sample_s = time.monotonic() - t0
    chosen = select(fitted.amap.to(run.device), run.device, val, val_images, g, cfg, config.train.seed,
                    config.train.batch_size)
    best = max(chosen.report["candidates"], key=lambda r: r["synthetic_image_auroc"])
    return Trial(setting, len(train.tiles) / max(len(train_images), 1), sample_s,
                 sample_s * n_train / max(len(train_images), 1), best["synthetic_image_auroc"],
                 best["synthetic_pixel_auroc"], best.get("per_kind_image_auroc", {}), time.monotonic() - t0)


def _choose(trials: list[Trial]) -> Trial:
    """The cheapest trial (the first) unless another beats it by TOLERANCE; among those that do, the best."""
    base = trials[0]
    better = [t for t in trials[1:] if t.synthetic_image_auroc >= base.synthetic_image_auroc + TOLERANCE]
    if not better:
        return base
    return max(better, key=lambda t: (t.synthetic_image_auroc, np.nan_to_num(t.synthetic_pixel_auroc, nan=-1.0),
                                      -t.tiles_per_image))


@dataclass
class Choice:
    setting: Setting
    report: dict[str, Any]


def choose(settings: list[Setting], train_images: list[np.ndarray], val_images: list[np.ndarray],
           n_train: int, geometry: Geometry, model_cfg: ModelOptions, config: TrainingOptions, run: FitRun,
           gen: torch.Generator) -> Choice:
    """Try every setting on a sample of the training images (cheapest first, within the time budget)."""
    trials: list[Trial] = []
    left_out: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for s in settings:
        why = _left_out_because(s, trials, time.monotonic() - t0)
        if why:
            log.info("settings: %s left out (%s)", s.describe(), why)
            left_out.append({"scale_factor": s.factor, "layers": list(s.layers), "why": why})
            continue
        run.check_stop()
        run.report({"phase": f"settings: {s.describe()}", "epoch": 1, "epochs": 1, "step": len(trials) + 1,
                    "steps": len(settings)})
        trials.append(_try(s, train_images, val_images, n_train, geometry, model_cfg, config, run, gen))
        log.info("settings: %s: synthetic image AUROC %.4f (%.0f s on %d images)", s.describe(),
                 trials[-1].synthetic_image_auroc, trials[-1].sample_fit_s, len(train_images))
    best = _choose(trials)
    report = {"candidates": [t.record() for t in trials], "left_out": left_out, "chosen": best.record(),
              "n_sample_images": len(train_images), "tolerance": TOLERANCE, "budget_s": BUDGET_S,
              "search_budget_s": SEARCH_BUDGET_S, "search_s": round(time.monotonic() - t0, 1),
              "reason": "the cheapest setting (default scale and layers first) unless another beats its synthetic "
                        f"image AUROC by {TOLERANCE}; then the best of those"}
    return Choice(best.setting, report)


def _left_out_because(s: Setting, trials: list[Trial], spent_s: float) -> str | None:
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
    return None


def _cost_ratio(base: Trial, s: Setting) -> float:
    """Roughly how much more a setting's fit costs than the base trial's: tiles grow with the scale squared."""
    return (s.factor / base.setting.factor) ** 2


__all__ = ["MIN_HELD_OUT", "SAMPLE_IMAGES", "Choice", "Setting", "candidates", "choose", "sample_indices"]
