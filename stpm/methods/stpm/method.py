"""STPM behind the method interface: fit = train the student (stpm.methods.stpm.trainer); the bundle holds
the teacher's and the student's weights; teacher.onnx and student.onnx are exported beside the scorer.
With FitData.refit_folds, Fitted.without_fold trains one more student per calibration fold, on the
training images outside it (the same recipe and seed), for cross-fitted calibration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from stpm.bundle.names import STUDENT_ONNX, STUDENT_WEIGHTS, TEACHER_ONNX, TEACHER_WEIGHTS
from stpm.methods.base import FitData, FitRun, Fitted, Method
from stpm.methods.stpm.anomaly_map import STPMMap
from stpm.methods.stpm.dataset import ImageArrayDataset
from stpm.methods.stpm.model import STPM, build_stpm
from stpm.methods.stpm.trainer import fit


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


class _Features(nn.Module):
    """One side of the model as a graph: float [N, 3, H, W] in [0, 1] -> its feature pyramid."""

    def __init__(self, model: STPM, which: str):
        super().__init__()
        self.model = model
        self.which = which

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.model.teacher_features(x) if self.which == "teacher" else self.model.student_features(x)
        return tuple(f)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def fold_data(data: FitData, k: int) -> FitData:
    """The fit data without fold k: the training images outside it (FitData.folds), the same held-out
    images (validation loss), a generator of its own (seed + 1 + k) so each fold's shuffling is fixed."""
    if data.folds is None:
        raise ValueError("no calibration folds")
    keep = np.flatnonzero(np.asarray(data.folds) != k)
    if len(keep) == 0:
        raise ValueError(f"every training image is in fold {k}")
    return FitData(data.train.subset(keep.tolist()), data.val, data.seed,
                   torch.Generator().manual_seed(data.seed + 1 + k))


def _without_fold(method: STPMMethod, cfg: Any, train: Any, data: FitData, run: FitRun,
                  amap: STPMMap) -> Callable[[int], STPMMap]:
    """Fold k -> a student trained without fold k (once; kept for a second scoring pass), on the device
    and with the smoothing `amap` has then. Its progress is reported as a calibration phase; no checkpoints."""
    n_folds = int(np.max(data.folds)) + 1
    built: dict[int, STPMMap] = {}

    def build(k: int) -> STPMMap:
        if k not in built:
            phase = f"calibration (student without fold {k + 1} of {n_folds})"
            progress = None if run.progress is None else (lambda r: run.progress({**r, "phase": phase}))
            fitted = method.fit(cfg, train, fold_data(data, k), replace(run, run_dir=None, resume=False,
                                                                        progress=progress, show_bar=False))
            if fitted.interrupted:
                raise KeyboardInterrupt
            if _same_weights(fitted.amap.model.teacher, amap.model.teacher):  # the same frozen teacher: one copy
                fitted.amap.model.teacher = amap.model.teacher
            built[k] = fitted.amap.eval()
        device = next(amap.parameters()).device
        return built[k].with_sigma(amap.sigma).to(device)

    return build


class STPMMethod(Method):
    def fit(self, cfg: Any, train: Any, data: FitData, run: FitRun) -> Fitted:
        model, source = build_stpm(cfg, run.weights_dir, seed=data.seed)
        n_tiles = len(data.train.tiles)
        boxes = [d.boxes() if d.padded else None for d in (data.train, data.val)]  # padding: masked in the loss
        train_loader = DataLoader(ImageArrayDataset(data.train.tiles, augment=train.augment, boxes=boxes[0]),
                                  batch_size=train.batch_size, shuffle=True, drop_last=n_tiles > train.batch_size,
                                  generator=data.generator, num_workers=train.num_workers)
        val_loader = DataLoader(ImageArrayDataset(data.val.tiles, boxes=boxes[1]), batch_size=train.batch_size)
        checkpoint = None
        if run.run_dir is not None:
            Path(run.run_dir).mkdir(parents=True, exist_ok=True)
            checkpoint = Path(run.run_dir) / "checkpoint.pt"
        result = fit(model, train_loader, val_loader, train, run.device, checkpoint, run.resume, run.progress,
                     run.should_stop, run.show_bar)
        record = {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                  "best_val_loss": result.best_val_loss, "stopped_early": result.stopped_early,
                  "history": result.history}
        summary = {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                   "epochs_run": result.epochs_run}
        amap = STPMMap(model, cfg.combine, float(cfg.sigma or 0.0))
        without = _without_fold(self, cfg, train, data, run, amap) if data.folds is not None and data.refit_folds \
            else None
        return Fitted(amap, source, record, summary, result.seconds, result.interrupted, without_fold=without)

    def save(self, amap: STPMMap, folder: Path) -> list[str]:
        save_file(_contiguous(amap.model.teacher.state_dict()), str(folder / TEACHER_WEIGHTS))
        save_file(_contiguous(amap.model.student_state_dict()), str(folder / STUDENT_WEIGHTS))
        return [TEACHER_WEIGHTS, STUDENT_WEIGHTS]

    def load(self, cfg: Any, folder: Path) -> STPMMap:
        model, _ = build_stpm(cfg.model_copy(update={"pretrained": False}))  # the bundle has the weights
        model.teacher.load_state_dict(load_file(str(folder / TEACHER_WEIGHTS)), strict=True)
        sd = load_file(str(folder / STUDENT_WEIGHTS))
        model.student.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("student.")}, strict=True)
        if model.projections is not None:
            model.projections.load_state_dict(
                {k[12:]: v for k, v in sd.items() if k.startswith("projections.")}, strict=True)
        return STPMMap(model.eval(), cfg.combine, float(cfg.sigma or 0.0)).eval()

    def feature_graphs(self, amap: STPMMap) -> dict[str, nn.Module]:
        return {TEACHER_ONNX: _Features(amap.model, "teacher").eval(),
                STUDENT_ONNX: _Features(amap.model, "student").eval()}


__all__ = ["STPMMethod"]
