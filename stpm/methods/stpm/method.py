"""STPM behind the method interface: fit = train the student (stpm.methods.stpm.trainer); the bundle holds
the teacher's and the student's weights; teacher.onnx and student.onnx are exported beside the scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        return Fitted(amap, source, record, summary, result.seconds, result.interrupted)

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
