"""Parity checks of exported graphs: ONNX against torch (the export's own check), and a lower precision
against fp32 (the gate that decides whether bf16 or int8 ships).

Check images are tiled as the runtime tiles them (stpm.imaging.geometry) and go through a graph in
batches of tiles; maps are stitched per image and scored with the manifest's image score.
Differences are reported in raw score units and in normalised units (threshold = 0.5, `low` = 0, the
bundle's Calibration); a tolerance in normalised units means the same for every model whatever its
raw score scale. Decisions (raw score >= threshold) must be identical, except for images whose
normalised score lies within `atol` of 0.5 on both sides (a flip there is numerical noise, reported
as `borderline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stpm.bundle.calibration import Calibration
from stpm.imaging.geometry import Geometry, TiledImages, TilingError, batch_tiles, plan, stitch_all, tile_images
from stpm.imaging.scores import ImageScore, image_scores

DEFAULT_ATOL = 1e-3  # normalised units: 0.5 is the threshold
DEFAULT_FP16_ATOL = 2e-2
CHUNK = 8  # tiles per graph run in the checks


class ExportParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the tolerance; `report` holds the numbers."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------ check images

def _synthetic_images(n: int, size: int | tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Deterministic stand-ins when no real images are given: smooth gradients plus noise."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(max(h, w) - 1, 1)
    out = []
    for i in range(n):
        base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 200 * ((i % 3) + 1) / 3
        img = base + rng.normal(0, 20, base.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def synthetic_check_images(geometry: Geometry) -> list[np.ndarray]:
    """Stand-ins the geometry can plan: three square images and one 1:2.5 image at the native size."""
    if geometry.mode == "squash":
        return _synthetic_images(4, geometry.tile)
    native = int(np.ceil(geometry.tile / geometry.scale))
    return _synthetic_images(3, native) + _synthetic_images(1, (int(round(native * 2.5)), native), seed=1)


def tile_check_images(images: Sequence[np.ndarray], geometry: Geometry,
                      names: Sequence[str] | None = None) -> TiledImages:
    """Check images -> their tiles; an image the geometry cannot cover is an error naming it (its name,
    else its index)."""
    imgs = [np.asarray(im, dtype=np.uint8) for im in images]
    for i, im in enumerate(imgs):
        try:
            plan(im.shape[0], im.shape[1], geometry)
        except TilingError as e:
            raise ValueError(f"{names[i] if names else f'check image {i}'}: {e}") from None
    return tile_images(imgs, geometry)


def nchw(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles [T, S, S, 3] -> [T, 3, S, S] for the graph."""
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


# ------------------------------------------------------------------------------------ graph outputs

def _concat(outs: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.concatenate([o[k] for o in outs]).astype(np.float32) for k in range(3))  # type: ignore[return-value]


def ort_outputs(session, tiled: TiledImages, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(maps, raw scores, scores) of every tile: a scorer session (any stpm.runtime session), `chunk` tiles per run."""
    return _concat([session.run(x) for x, _ in batch_tiles([tiled.tiles], chunk)])


def torch_reference(scorer, tiled: TiledImages, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same outputs from the torch module the graph was exported from (stpm.export.onnx.FusedScorer)."""
    import torch

    with torch.no_grad():
        return _concat([tuple(o.float().numpy() for o in scorer(torch.from_numpy(x)))
                        for x, _ in batch_tiles([tiled.tiles], chunk)])


def session_image_scores(session, tiled: TiledImages, spec: ImageScore, chunk: int = CHUNK) -> np.ndarray:
    """Per-image raw scores of a scorer session on tiled images (stitched, the manifest's score function)."""
    return image_scores(stitch_all(ort_outputs(session, tiled, chunk)[0], tiled), spec)


# ---------------------------------------------------------------------------- ONNX against torch

def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)))


def _flips(r0: np.ndarray, r1: np.ndarray, s0: np.ndarray, s1: np.ndarray, calibration: Calibration,
           atol: float) -> tuple[int, int]:
    """(decision flips, those of them within atol of 0.5 on both sides: numerical noise)."""
    flips = calibration.is_anomaly(r0) != calibration.is_anomaly(r1)
    borderline = flips & (np.abs(s0 - 0.5) <= atol) & (np.abs(s1 - 0.5) <= atol)
    return int(flips.sum()), int(borderline.sum())


def parity_report(ref: tuple[np.ndarray, np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray, np.ndarray],
                  calibration: Calibration, atol: float, map_offset: float = 0.0) -> dict[str, Any]:
    """Compare per-tile (map, raw, score) triples; differences in raw and normalised units, decisions.
    Maps are compared as the user gets them: normalised and clipped to [0, 1] (a PatchCore distance far
    below the good scores' floor is numerically unstable near 0 and is shown as 0 by both engines);
    `max_abs_map_raw_x_scale` keeps the unclipped difference for the record. map_offset: what maps are
    lowered by before they are shown (ImageScore.map_offset: a bundle with a position prior)."""
    (m0, r0, s0), (m1, r1, s1) = ref, got
    d_map, d_raw, d_score = _max_abs(m0, m1), _max_abs(r0, r1), _max_abs(s0, s1)
    d_seen = _max_abs(calibration.normalise(m0 - map_offset), calibration.normalise(m1 - map_offset))
    flips, borderline = _flips(r0, r1, s0, s1, calibration, atol)
    report = {
        "n_images": len(r0),
        "max_abs_map": d_map,
        "max_abs_raw_score": d_raw,
        "max_abs_map_normalised": d_seen,
        "max_abs_map_raw_x_scale": d_map * calibration.scale,
        "max_abs_raw_score_normalised": d_raw * calibration.scale,
        "max_abs_score": d_score,
        "decision_flips": flips,
        "borderline_flips": borderline,
        "atol_normalised": atol,
        "raw_score_range": [float(r0.min()), float(r0.max())],
    }
    report["ok"] = bool(max(report["max_abs_map_normalised"], report["max_abs_raw_score_normalised"], d_score) <= atol
                        and flips == borderline)
    return report


def image_parity(ref_maps: Sequence[np.ndarray], got_maps: Sequence[np.ndarray], spec: ImageScore,
                 calibration: Calibration, atol: float) -> dict[str, Any]:
    """Compare stitched per-image maps and the image scores the manifest's score function gives."""
    r0, r1 = image_scores(ref_maps, spec), image_scores(got_maps, spec)
    d_map = max(_max_abs(a, b) for a, b in zip(ref_maps, got_maps))
    shown = spec.map_offset  # maps as the runtime shows them
    d_seen = max(_max_abs(calibration.normalise(a - shown), calibration.normalise(b - shown))
                 for a, b in zip(ref_maps, got_maps))
    flips, borderline = _flips(r0, r1, calibration.normalise(r0), calibration.normalise(r1), calibration, atol)
    out = {
        "n_images": len(r0),
        "map_shapes": sorted({f"{m.shape[0]}x{m.shape[1]}" for m in ref_maps}),
        "image_score": spec.method,
        "max_abs_map_normalised": d_seen,
        "max_abs_map_raw_x_scale": d_map * calibration.scale,
        "max_abs_image_score_normalised": float(np.max(np.abs(r0 - r1))) * calibration.scale,
        "decision_flips": flips,
        "borderline_flips": borderline,
    }
    out["ok"] = bool(max(out["max_abs_map_normalised"], out["max_abs_image_score_normalised"]) <= atol
                     and flips == borderline)
    return out


# ------------------------------------------------------------------ lower precision against fp32

@dataclass(frozen=True)
class Gate:
    """When a lower precision (bf16, int8) ships: its image scores against fp32's on the same images.

    Decisions must agree on at least `min_agreement` of the images. With labels (1 = anomalous), image
    AUROC may fall by at most `max_auroc_drop` and rise by at most `max_auroc_rise` (None: any rise).
    Without labels, normalised scores may move by at most `max_score_move` (None: not checked): on the
    few good images a training run keeps, few flips are possible, so the scores must stay close too."""

    min_agreement: float
    max_auroc_drop: float
    max_auroc_rise: float | None = None
    max_score_move: float | None = None

    def criteria(self) -> dict[str, float | None]:
        return {"min_decision_agreement": self.min_agreement, "max_auroc_drop": self.max_auroc_drop,
                "max_auroc_rise": self.max_auroc_rise, "max_abs_score_move": self.max_score_move}

    def judge(self, ref_raw: np.ndarray, got_raw: np.ndarray, calibration: Calibration,
              labels: Sequence[int] | None) -> dict[str, Any]:
        """The comparison and its verdict (`ok`)."""
        ref_raw, got_raw = np.asarray(ref_raw, np.float64), np.asarray(got_raw, np.float64)
        flips = calibration.is_anomaly(ref_raw) != calibration.is_anomaly(got_raw)
        out: dict[str, Any] = {
            "n_check_images": int(len(ref_raw)),
            "decision_agreement": float(np.mean(~flips)),
            "decision_flips": int(flips.sum()),
            "max_abs_score_vs_fp32": float(np.max(np.abs(calibration.normalise(ref_raw) - calibration.normalise(got_raw)))),
            "median_rel_raw_score_vs_fp32": float(np.median(np.abs(got_raw - ref_raw) / np.maximum(np.abs(ref_raw), 1e-12))),
        }
        ok = out["decision_agreement"] >= self.min_agreement
        if labels is None:
            ok = ok and (self.max_score_move is None or out["max_abs_score_vs_fp32"] <= self.max_score_move)
        else:
            out.update(_auroc_change(ref_raw, got_raw, labels))
            ok = ok and out["auroc_change"] >= -self.max_auroc_drop
            ok = ok and (self.max_auroc_rise is None or out["auroc_change"] <= self.max_auroc_rise)
        out["criteria"] = self.criteria()
        out["ok"] = bool(ok)
        return out


def _auroc_change(ref_raw: np.ndarray, got_raw: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=int)
    a0, a1 = float(roc_auc_score(y, ref_raw)), float(roc_auc_score(y, got_raw))
    return {"auroc_fp32": a0, "auroc": a1, "auroc_change": a1 - a0}


__all__ = [
    "CHUNK",
    "DEFAULT_ATOL",
    "DEFAULT_FP16_ATOL",
    "ExportParityError",
    "Gate",
    "image_parity",
    "nchw",
    "ort_outputs",
    "parity_report",
    "session_image_scores",
    "synthetic_check_images",
    "tile_check_images",
    "torch_reference",
]
