"""PatchCore behind the method interface: fit = patch features of every good training tile, then a greedy
coreset of them (the memory bank); the bundle holds the teacher's weights and the bank."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from stpm.bundle.names import MEMORY_BANK_WEIGHTS, TEACHER_WEIGHTS
from stpm.methods.base import FitData, FitRun, Fitted, Method
from stpm.methods.patchcore.anomaly_map import PatchCoreMap
from stpm.methods.patchcore.coreset import bank_rows, fit_bank
from stpm.methods.patchcore.features import Patches, PatchFeatures, build_features, collect_features
from stpm.methods.patchcore.mirrors import mirror_boxes, mirror_dims, mirror_tiles
from stpm.methods.patchcore.spec import SPEC


def _features(features: PatchFeatures, data: FitData, run: FitRun, batch_size: int, mirrors: str = "none") -> Patches:
    """Every training tile's patch features (all T * h * w positions; where tiles hold padding, only those
    whose receptive centre is the image's own), then those of each of its mirrors (`mirrors`, the same tile
    index), with a bar, progress and cancellation."""
    tiles = data.train.tiles
    boxes = data.train.boxes() if data.train.padded else None
    flips = ((),) + mirror_dims(mirrors)
    total = len(tiles) * len(flips)
    bar = tqdm(total=total, desc="patch features", unit="tile", disable=not run.show_bar)
    parts = []
    try:
        for i, d in enumerate(flips):
            def on_batch(done: int, _: int, before: int = i * len(tiles)) -> None:
                run.check_stop()
                bar.update(before + done - bar.n)
                run.report({"phase": "patch features", "epoch": 1, "epochs": 1, "step": before + done, "steps": total})

            parts.append(collect_features(features, mirror_tiles(tiles, d), run.device, batch_size, on_batch,
                                          None if boxes is None else mirror_boxes(boxes, tiles.shape[1], d)))
    finally:
        bar.close()
    if len(parts) == 1:
        return parts[0]
    return Patches(torch.cat([p.features for p in parts]), sum(p.positions for p in parts),
                   np.concatenate([p.tile for p in parts]))


def _patch_folds(data: FitData, patches: Patches) -> torch.Tensor | None:
    """The fold of each training patch (its image's, FitData.folds)."""
    if data.folds is None:
        return None
    tile_image = np.repeat(np.arange(len(data.train)), np.diff(data.train.offsets))
    return torch.from_numpy(np.asarray(data.folds, dtype=np.int64)[tile_image[patches.tile]])


def _without_fold(amap: PatchCoreMap, bank_folds: torch.Tensor) -> Callable[[int], PatchCoreMap]:
    """Fold k -> the map module on the bank rows chosen from the other folds (their own coreset: the chunks
    never mix folds), sharing the teacher; on the device and with the smoothing `amap` has then."""

    def build(k: int) -> PatchCoreMap:
        rows = bank_folds != k
        if not bool(rows.any()):
            raise ValueError(f"every memory-bank row comes from fold {k}")
        return PatchCoreMap(amap.features, amap.bank[rows.to(amap.bank.device)], amap.sigma, amap.mirrors).eval().to(
            amap.bank.device)

    return build


class PatchCore(Method):
    def fit(self, cfg: Any, train: Any, data: FitData, run: FitRun) -> Fitted:
        t0 = time.monotonic()
        features, source = build_features(cfg, run.weights_dir)
        patches = _features(features.to(run.device), data, run, train.batch_size, cfg.mirrors)
        t1 = time.monotonic()
        n = len(data.train.tiles)
        run.report({"phase": "memory bank (coreset)", "epoch": 1, "epochs": 1, "step": n, "steps": n})
        n_patches = len(patches.features)
        bank, bank_folds = fit_bank(patches.features, bank_rows(n_patches, cfg.coreset_ratio, cfg.bank_size),
                                    seed=data.seed, groups=_patch_folds(data, patches))
        t2 = time.monotonic()
        sigma = SPEC.default_sigma if cfg.sigma is None else float(cfg.sigma)  # model selection may change it
        amap = PatchCoreMap(features.cpu(), bank, sigma, cfg.mirrors).eval()
        info = {"n_patches": n_patches, "mirrors": cfg.mirrors, "n_padding_positions": patches.positions - n_patches,
                "feature_dim": int(patches.features.shape[1]), "bank_size": int(len(bank)),
                "features_seconds": round(t1 - t0, 2), "coreset_seconds": round(t2 - t1, 2),
                "seconds": round(t2 - t0, 2)}
        record = {"epochs_run": 0, "best_epoch": 0, "best_val_loss": None, "stopped_early": False, "history": [],
                  "patchcore": info}
        without = _without_fold(amap, bank_folds) if bank_folds is not None else None
        return Fitted(amap, source, record, dict(info), t2 - t0, without_fold=without)

    def save(self, amap: PatchCoreMap, folder: Path) -> list[str]:
        teacher = {k: v.detach().cpu().contiguous() for k, v in amap.features.teacher.state_dict().items()}
        save_file(teacher, str(folder / TEACHER_WEIGHTS))
        save_file({"bank": amap.bank.detach().cpu().contiguous()}, str(folder / MEMORY_BANK_WEIGHTS))
        return [TEACHER_WEIGHTS, MEMORY_BANK_WEIGHTS]

    def load(self, cfg: Any, folder: Path) -> PatchCoreMap:
        features, _ = build_features(cfg.model_copy(update={"pretrained": False}))  # the bundle has the weights
        features.teacher.load_state_dict(load_file(str(folder / TEACHER_WEIGHTS)), strict=True)
        bank = load_file(str(folder / MEMORY_BANK_WEIGHTS))["bank"]
        return PatchCoreMap(features, bank, float(cfg.sigma), cfg.mirrors).eval()


__all__ = ["PatchCore"]
