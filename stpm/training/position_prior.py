"""Choosing and estimating a position prior (stpm.imaging.scores.PositionPrior) without a defect image.

Where parts are photographed in a fixed framing, some positions score high on every good part (the edge of
a commutator, a bright rim), and an image score that takes the map's maximum or top-k mean then ranks good
parts by how bright that position happens to be. The prior is what good images score at each position: the
mean of the training images' maps scored out of fold (stpm.training.crossfit: each by the bank without its
own fold, so they score as unseen good parts do), each reduced to a grid of CELL_PX-pixel cells over the
image in coordinates relative to its size. Calibration then sees every good score with a prior estimated
without that image: the held-out images with the prior of all folds, each out-of-fold image with the prior
of the other folds.

`auto` keeps the prior only where it raises the synthetic image AUROC (the held-out good images against
their synthetic anomalies, model selection's criterion; stpm.training.selection) by MARGIN: its estimate
never saw those images. It needs the out-of-fold maps, so methods without cross-fitting (stpm) go without.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stpm.evaluation import metrics
from stpm.imaging.scores import ImageScore, PositionPrior, image_scores

CELL_PX = 8  # a grid cell, in pixels of the model's scale: the teacher's finest feature stride
MAX_CELLS = 64  # per side, whatever the image size
MIN_IMAGES = 20  # out-of-fold maps `auto` needs for an estimate
MARGIN = 0.01  # synthetic image AUROC gain `auto` needs to keep a prior


def grid_for(shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The prior's grid for maps of these (h, w) at the model's scale: CELL_PX cells over the median size,
    at most MAX_CELLS a side."""
    if not shapes:
        raise ValueError("a position prior's grid needs at least one map size")
    h, w = (float(np.median([s[i] for s in shapes])) for i in (0, 1))
    return min(MAX_CELLS, max(1, math.ceil(h / CELL_PX))), min(MAX_CELLS, max(1, math.ceil(w / CELL_PX)))


def to_grid(amap: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """float [h, w] -> float32 [gh, gw]: each cell the mean of the map over its share of the image."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, grid)[0, 0].numpy()


def estimate(grids: Sequence[np.ndarray]) -> PositionPrior:
    """The mean of good maps reduced to the grid (to_grid)."""
    if not len(grids):
        raise ValueError("a position prior needs at least one good map")
    return PositionPrior(np.mean(np.stack(grids), axis=0, dtype=np.float64).astype(np.float32))


def leave_fold_out(grids: np.ndarray, folds: np.ndarray, fold: int) -> PositionPrior:
    """The prior estimated without `fold`'s images (grids [n, gh, gw] in the order of `folds`)."""
    return estimate(grids[folds != fold])


@dataclass
class PriorChoice:
    prior: PositionPrior | None  # None: the image score is the map's own
    report: dict[str, Any]  # manifest training.selection.position_prior


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """Synthetic image AUROC: good images against their synthetic anomalies (stpm.evaluation.metrics)."""
    return metrics.auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])


def choose(mode: str, oof_grids: np.ndarray | None, good_maps: Sequence[np.ndarray],
           synthetic_maps: Sequence[np.ndarray], spec: ImageScore) -> PriorChoice:
    """`mode` ("auto", "on", "off") and the out-of-fold grids ([n, gh, gw], None without cross-fitting) ->
    the prior to use, if any, and why. good_maps / synthetic_maps: the held-out good images' maps and their
    synthetic anomalies' (model selection's, under the chosen smoothing); spec: the chosen image score."""
    report: dict[str, Any] = {"mode": mode, "chosen": False}
    if mode == "off":
        return PriorChoice(None, {**report, "reason": "position_prior off"})
    if oof_grids is None:
        return PriorChoice(None, {**report, "reason": "needs the training images scored out of fold (cross-fitting: "
                                                      "calibration folds >= 2; stpm: with refit folds)"})
    report.update(grid=list(oof_grids.shape[1:]), cell_px=CELL_PX, n_images=len(oof_grids))
    if mode == "auto" and len(oof_grids) < MIN_IMAGES:
        return PriorChoice(None, {**report, "reason": f"auto needs at least {MIN_IMAGES} out-of-fold images"})
    prior = estimate(oof_grids)
    with_prior = ImageScore(spec.method, spec.topk, prior)
    if len(good_maps) and len(synthetic_maps):
        without = _auroc(image_scores(good_maps, spec), image_scores(synthetic_maps, spec))
        with_ = _auroc(image_scores(good_maps, with_prior), image_scores(synthetic_maps, with_prior))
        report.update(synthetic_image_auroc_without=round(without, 4), synthetic_image_auroc_with=round(with_, 4),
                      margin=MARGIN)
    elif mode == "auto":
        return PriorChoice(None, {**report, "reason": "auto needs held-out good images and their synthetic anomalies"})
    if mode == "on":
        return PriorChoice(prior, {**report, "chosen": True, "reason": "position_prior on"})
    gain = report["synthetic_image_auroc_with"] - report["synthetic_image_auroc_without"]
    chosen = gain >= MARGIN
    reason = (f"synthetic image AUROC {'rose' if gain > 0 else 'moved'} by {gain:+.4f} with the prior "
              f"({'at least' if chosen else 'under'} the {MARGIN} margin)")
    return PriorChoice(prior if chosen else None, {**report, "chosen": chosen, "reason": reason})


__all__ = ["CELL_PX", "MARGIN", "MAX_CELLS", "MIN_IMAGES", "PriorChoice", "choose", "estimate", "grid_for",
           "leave_fold_out", "to_grid"]
