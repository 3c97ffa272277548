"""Cross-fitted calibration: every training image scored by a model fitted without it.

The threshold's tail estimate (stpm.training.calibration) is only as good as the number of good scores
it sees, and a run holds out a fifth of its images: eleven on a set of 54. A method whose fit can leave
a fold out at no extra cost (PatchCore: its coreset is chosen in chunks that never mix folds, so the bank
rows of the other folds are a coreset of those folds alone) scores each fold of the training images with
the bank of the other folds. These out-of-fold scores come from a model fitted on (K-1)/K of the
training images, so they run a little high rather than low: the threshold errs towards fewer false alarms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from stpm.imaging.geometry import TiledImages, predict_maps
from stpm.imaging.scores import ImageScore, image_scores
from stpm.methods.base import Fitted
from stpm.methods.maps import tile_fn

log = logging.getLogger("stpm.training")


def fold_labels(n_train: int, folds: int, seed: int) -> np.ndarray | None:
    """The fold of each of n_train training images (seeded, sizes within one of each other); None when
    cross-fitting is off (folds < 2) or there are fewer than two training images."""
    k = min(int(folds), n_train)
    if k < 2:
        return None
    labels = np.empty(n_train, dtype=np.int64)
    labels[np.random.default_rng(seed + 1).permutation(n_train)] = np.arange(n_train) % k
    return labels


def out_of_fold_scores(fitted: Fitted, train: TiledImages, labels: np.ndarray, device: torch.device,
                       spec: ImageScore | Callable[[int], ImageScore], batch_size: int,
                       on_fold: Callable[[int, int], None] | None = None,
                       on_maps: Callable[[np.ndarray, list[np.ndarray]], None] | None = None) -> np.ndarray:
    """Each training image's score [n_train] under the model fitted without its fold (Fitted.without_fold,
    with the smoothing model selection chose), computed as the held-out images' are (stitched maps, the
    chosen image score). `spec` may differ per fold (a function of the fold: a position prior estimated
    without that fold); `on_maps(indices, maps)` sees each fold's stitched maps (the position prior's
    estimate) before they are dropped."""
    if fitted.without_fold is None:
        raise ValueError("this method offers no fit without a fold")
    scores = np.full(len(train), np.nan)
    k = int(labels.max()) + 1
    for fold in range(k):
        idx = np.flatnonzero(labels == fold)
        maps = predict_maps(tile_fn(fitted.without_fold(fold), device), train.subset(idx.tolist()), batch_size)
        scores[idx] = image_scores(maps, spec(fold) if callable(spec) else spec)
        if on_maps is not None:
            on_maps(idx, maps)
        if on_fold is not None:
            on_fold(fold + 1, k)
    log.info("out-of-fold scores of %d training images in %d folds: median %.4g, max %.4g", len(scores), k,
             float(np.median(scores)), float(scores.max()))
    return scores


__all__ = ["fold_labels", "out_of_fold_scores"]
