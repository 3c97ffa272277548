"""PatchCore behind the method interface: fit = patch features of every good training tile, then a greedy
coreset of them (the memory bank); the bundle holds the teacher's weights and the bank."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from stpm.bundle.names import MEMORY_BANK_WEIGHTS, TEACHER_WEIGHTS
from stpm.methods.base import FitData, FitRun, Fitted, Method
from stpm.methods.patchcore.anomaly_map import PatchCoreMap
from stpm.methods.patchcore.coreset import bank_rows, fit_bank
from stpm.methods.patchcore.features import PatchFeatures, build_features, collect_features
from stpm.methods.patchcore.spec import SPEC


def _features(features: PatchFeatures, data: FitData, run: FitRun, batch_size: int) -> tuple[torch.Tensor, int]:
    """Every training tile's patch features [M, D] (all T * h * w positions; where tiles hold padding, only those
    whose receptive centre is the image's own) and the number of positions, with a bar, progress and
    cancellation."""
    tiles = data.train.tiles
    boxes = data.train.boxes() if data.train.padded else None
    bar = tqdm(total=len(tiles), desc="patch features", unit="tile", disable=not run.show_bar)

    def on_batch(done: int, total: int) -> None:
        run.check_stop()
        bar.update(done - bar.n)
        run.report({"phase": "patch features", "epoch": 1, "epochs": 1, "step": done, "steps": total})

    try:
        return collect_features(features, tiles, run.device, batch_size, on_batch, boxes)
    finally:
        bar.close()


class PatchCore(Method):
    def fit(self, cfg: Any, train: Any, data: FitData, run: FitRun) -> Fitted:
        t0 = time.monotonic()
        features, source = build_features(cfg, run.weights_dir)
        patches, positions = _features(features.to(run.device), data, run, train.batch_size)
        t1 = time.monotonic()
        n = len(data.train.tiles)
        run.report({"phase": "memory bank (coreset)", "epoch": 1, "epochs": 1, "step": n, "steps": n})
        bank = fit_bank(patches, bank_rows(len(patches), cfg.coreset_ratio, cfg.bank_size), seed=data.seed)
        t2 = time.monotonic()
        sigma = SPEC.default_sigma if cfg.sigma is None else float(cfg.sigma)  # model selection may change it
        amap = PatchCoreMap(features.cpu(), bank, sigma).eval()
        info = {"n_patches": int(len(patches)), "n_padding_positions": positions - len(patches),
                "feature_dim": int(patches.shape[1]), "bank_size": int(len(bank)),
                "features_seconds": round(t1 - t0, 2), "coreset_seconds": round(t2 - t1, 2),
                "seconds": round(t2 - t0, 2)}
        record = {"epochs_run": 0, "best_epoch": 0, "best_val_loss": None, "stopped_early": False, "history": [],
                  "patchcore": info}
        return Fitted(amap, source, record, dict(info), t2 - t0)

    def save(self, amap: PatchCoreMap, folder: Path) -> list[str]:
        teacher = {k: v.detach().cpu().contiguous() for k, v in amap.features.teacher.state_dict().items()}
        save_file(teacher, str(folder / TEACHER_WEIGHTS))
        save_file({"bank": amap.bank.detach().cpu().contiguous()}, str(folder / MEMORY_BANK_WEIGHTS))
        return [TEACHER_WEIGHTS, MEMORY_BANK_WEIGHTS]

    def load(self, cfg: Any, folder: Path) -> PatchCoreMap:
        features, _ = build_features(cfg.model_copy(update={"pretrained": False}))  # the bundle has the weights
        features.teacher.load_state_dict(load_file(str(folder / TEACHER_WEIGHTS)), strict=True)
        bank = load_file(str(folder / MEMORY_BANK_WEIGHTS))["bank"]
        return PatchCoreMap(features, bank, float(cfg.sigma)).eval()


__all__ = ["PatchCore"]
