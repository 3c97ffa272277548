"""Choosing a model's map smoothing and image score without a single defect image.

The held-out good images of a training run (the calibration split) get synthetic anomalies
(stpm.training.synthetic: cut-paste, thin scars, Perlin blobs, fine scratches and pits). Every candidate (sigma, image score) is
scored on the good images against their anomalous copies; the candidate with the best synthetic
image AUROC wins, ties going to the better synthetic pixel AUROC and then to the earlier candidate
(the method's default comes first). Only what the user left open is chosen: an explicit `sigma` or
`image_score` is a single candidate. The report goes into the manifest (`training.selection`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stpm.options import AUTO, ModelOptions
from stpm.methods import registry
from stpm.methods.maps import MapModule, gaussian_blur, tile_fn
from stpm.training.synthetic import KINDS, make_anomalies
from stpm.imaging.geometry import Geometry, TiledImages, predict_maps, run_tiles, stitch_all, tile_images
from stpm.imaging.scores import ImageScore, image_scores

log = logging.getLogger("stpm.selection")

SCORE_CANDIDATES = ("max", "topk_mean")
PER_IMAGE = 2  # synthetic anomalies per held-out good image (the kinds take turns)
MAX_IMAGES = 64  # held-out good images that get synthetic anomalies (all of them are scored)
PIXEL_STRIDE = 4  # pixel AUROC on every 4th row and column: the same ranking at 1/16 of the cost


@dataclass(frozen=True)
class Candidate:
    sigma: float
    image_score: str


def candidates(cfg: ModelOptions) -> list[Candidate]:
    """The (sigma, image score) pairs to try: what cfg fixes is fixed, what it leaves open is searched."""
    sigmas = registry.spec(cfg.method).sigma_candidates if cfg.sigma is None else (float(cfg.sigma),)
    scores = SCORE_CANDIDATES if cfg.image_score == AUTO else (cfg.image_score,)
    return [Candidate(s, m) for s in sigmas for m in scores]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _pixel_auroc(good: Sequence[np.ndarray], bad: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    s = PIXEL_STRIDE
    vals = [m[::s, ::s].ravel() for m in list(good) + list(bad)]
    labels = [np.zeros(m[::s, ::s].size, bool) for m in good] + [k[::s, ::s].ravel() for k in masks]
    labels_all = np.concatenate(labels)
    if labels_all.all() or not labels_all.any():
        return float("nan")
    return _auroc(labels_all, np.concatenate(vals))


def _blur(tile_maps: np.ndarray, sigma: float) -> np.ndarray:
    with torch.no_grad():
        return gaussian_blur(torch.from_numpy(tile_maps), sigma).numpy()


def _scaled_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = shape
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


@dataclass
class Selection:
    chosen: Candidate
    good_maps: list[np.ndarray]  # the held-out good images' maps under the chosen sigma (for calibration)
    report: dict[str, Any]
    # Their synthetic anomalies' maps under the chosen sigma and each one's kind: the recall side of
    # calibration (stpm.training.calibration). Empty when there were no held-out images to alter.
    synthetic_maps: list[np.ndarray] = field(default_factory=list)
    synthetic_kinds: list[str] = field(default_factory=list)


def _synthetic_set(good_images: Sequence[np.ndarray], geometry: Geometry, seed: int):
    """PER_IMAGE synthetic anomalies per held-out good image (at most MAX_IMAGES) -> (anomalies, their tiles, their
    masks at the model's scale)."""
    synth = make_anomalies(list(good_images)[:MAX_IMAGES], PER_IMAGE, seed=seed)
    tiled = tile_images([a for a, _, _ in synth], geometry)
    masks = [_scaled_mask(m, (p.h, p.w)) for (_, m, _), p in zip(synth, tiled.plans)]
    return synth, tiled, masks


def _score_candidates(cands: list[Candidate], raw_good: np.ndarray, raw_bad: np.ndarray, good: TiledImages,
                      bad: TiledImages, masks: list[np.ndarray], topk: float, kinds: list[str]):
    """Each candidate's synthetic image and pixel AUROC -> (rows, good maps per sigma). The unblurred tile
    maps are blurred per candidate sigma, exactly as the graph blurs them, then stitched."""
    rows: list[dict[str, Any]] = []
    maps_by_sigma: dict[float, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for sigma in dict.fromkeys(c.sigma for c in cands):
        gm, bm = stitch_all(_blur(raw_good, sigma), good), stitch_all(_blur(raw_bad, sigma), bad)
        maps_by_sigma[sigma] = gm, bm
        px = _pixel_auroc(gm, bm, masks)
        for c in (c for c in cands if c.sigma == sigma):
            rows.append({"sigma": sigma, "image_score": c.image_score,
                         **_synthetic_aurocs(gm, bm, ImageScore(c.image_score, topk), px, kinds)})
    return rows, maps_by_sigma


def _synthetic_aurocs(good_maps: list[np.ndarray], bad_maps: list[np.ndarray], spec: ImageScore, pixel_auroc: float,
                      kinds: list[str]) -> dict[str, Any]:
    """One candidate's synthetic image AUROC (good maps vs their synthetic anomalies' under `spec`), its pixel
    AUROC, and the image AUROC per kind of anomaly."""
    good_s, bad_s = image_scores(good_maps, spec), image_scores(bad_maps, spec)
    img = _auroc(np.r_[np.zeros(len(good_s)), np.ones(len(bad_s))], np.r_[good_s, bad_s])
    return {"synthetic_image_auroc": round(img, 4), "synthetic_pixel_auroc": round(pixel_auroc, 4),
            "per_kind_image_auroc": _per_kind(good_s, bad_s, kinds)}


def _per_kind(good: np.ndarray, bad: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """Each kind of synthetic anomaly against all the good images: which detail the candidate sees."""
    out = {}
    for k in dict.fromkeys(kinds):
        sel = np.array([x == k for x in kinds])
        out[k] = round(_auroc(np.r_[np.zeros(len(good)), np.ones(int(sel.sum()))], np.r_[good, bad[sel]]), 4)
    return out


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest synthetic image AUROC, then pixel AUROC, then the earlier candidate (the default first)."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["synthetic_image_auroc"],
                                                     -np.nan_to_num(rows[i]["synthetic_pixel_auroc"], nan=-1.0), i))
    return rows[order[0]]


def select(
    amap: MapModule,
    device: torch.device,
    good: TiledImages,
    good_images: Sequence[np.ndarray],
    geometry: Geometry,
    cfg: ModelOptions,
    seed: int = 0,
    batch_size: int = 16,
) -> Selection:
    """Score every candidate on `good_images` (held-out good, uint8 RGB, tiled as `good`) and their
    synthetic anomalies; the map module's smoothing is set to the winner."""
    cands = candidates(cfg)
    if len(cands) == 1:
        return _given(amap, device, good, good_images, geometry, cands[0], cfg.topk, seed, batch_size)
    if not good_images:
        raise ValueError("model selection needs at least one held-out good image")
    synth, bad, masks = _synthetic_set(good_images, geometry, seed)
    fn = tile_fn(amap, device, blurred=False)  # blurred per candidate below
    raw_good, raw_bad = run_tiles(fn, good.tiles, batch_size), run_tiles(fn, bad.tiles, batch_size)
    rows, maps_by_sigma = _score_candidates(cands, raw_good, raw_bad, good, bad, masks, cfg.topk,
                                            [k for _, _, k in synth])
    best = _best(rows)
    chosen = Candidate(best["sigma"], best["image_score"])
    amap.with_sigma(chosen.sigma)
    log.info("selection on %d good + %d synthetic images: sigma %g, image score %s (synthetic image AUROC %.4f)",
             len(good), len(synth), chosen.sigma, chosen.image_score, best["synthetic_image_auroc"])
    report = {
        "candidates": rows,
        "n_good": len(good), "n_synthetic": len(synth), "kinds": list(KINDS), "seed": seed,
        "reason": "highest synthetic image AUROC (held-out good images vs their synthetic anomalies), "
                  "then synthetic pixel AUROC, then the method's default",
    }
    good_maps, synthetic_maps = maps_by_sigma[chosen.sigma]
    return Selection(chosen, good_maps, report, synthetic_maps, [k for _, _, k in synth])


def _given(amap: MapModule, device: torch.device, good: TiledImages, good_images: Sequence[np.ndarray],
           geometry: Geometry, only: Candidate, topk: float, seed: int, batch_size: int) -> Selection:
    """Nothing to choose (sigma and image score given): the maps of the held-out good images and of their
    synthetic anomalies (for calibration's recall side) under that candidate, and its synthetic AUROCs (what
    the settings search compares, stpm.training.settings)."""
    fn = tile_fn(amap.with_sigma(only.sigma), device)
    maps = predict_maps(fn, good, batch_size)
    row: dict[str, Any] = {"sigma": only.sigma, "image_score": only.image_score}
    report = {"candidates": [row], "reason": "sigma and image score given explicitly"}
    if not good_images:
        return Selection(only, maps, report)
    synth, bad, masks = _synthetic_set(good_images, geometry, seed)
    bad_maps, kinds = predict_maps(fn, bad, batch_size), [k for _, _, k in synth]
    row.update(_synthetic_aurocs(maps, bad_maps, ImageScore(only.image_score, topk),
                                 _pixel_auroc(maps, bad_maps, masks), kinds))
    return Selection(only, maps, report, bad_maps, kinds)


__all__ = ["Candidate", "Selection", "candidates", "select"]
