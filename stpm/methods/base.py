"""The method interface: fit on good tiles -> a map module; save / load its weights in a bundle; the
extra ONNX graphs it exports. Each method implements it in its own folder (stpm.methods.<name>) and is
registered by name (stpm.methods.registry); nothing outside a method's folder branches on its name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stpm.imaging.geometry import TiledImages
from stpm.methods.maps import MapModule

ProgressFn = Callable[[dict[str, Any]], None]


class TrainingStopped(Exception):
    """Raised while fitting when `should_stop()` asked to stop (e.g. a cancelled job)."""


@dataclass
class FitData:
    """The tiles a method learns from (held-out validation tiles too) and the run's seeded generator."""

    train: TiledImages
    val: TiledImages
    seed: int
    generator: torch.Generator
    # the fold (0 .. K-1) of each training image, for cross-fitted calibration; a method that can fit
    # without one fold at no extra cost offers Fitted.without_fold (PatchCore); a method with a training
    # loop (STPM) offers it only with refit_folds (one more training per fold), the others ignore it
    folds: np.ndarray | None = None
    refit_folds: bool = False


@dataclass
class FitRun:
    """Where and how a fit runs: device, teacher weights, checkpoints, progress and cancellation."""

    device: torch.device
    weights_dir: str | Path | None = None
    run_dir: Path | None = None  # checkpoints (methods with a training loop)
    resume: bool = False
    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None
    show_bar: bool = True

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise TrainingStopped("stop requested")

    def report(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(record)


@dataclass
class Fitted:
    """A fitted method: its map module (on the CPU), where the teacher weights came from, the facts that
    go into the manifest's `training` record, and what `stpm train` prints."""

    amap: MapModule
    teacher_source: str
    record: dict[str, Any]  # epochs_run, best_epoch, best_val_loss, stopped_early, history, method facts
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C before anything could be published
    # fold k -> the map module a fit on every training image outside fold k gives (FitData.folds), on the
    # device of `amap` and with its smoothing then; None where the method offers none (a training loop
    # without FitData.refit_folds)
    without_fold: Callable[[int], MapModule] | None = None


class Method(ABC):
    """A method's torch side; its data side (name, candidates, files) is its MethodSpec."""

    @abstractmethod
    def fit(self, cfg: Any, train: Any, data: FitData, run: FitRun) -> Fitted:
        """cfg: the resolved ModelOptions; train: TrainOptions."""

    @abstractmethod
    def save(self, amap: MapModule, folder: Path) -> list[str]:
        """Write the map module's weights into `folder`; -> the file names written (spec.weight_files)."""

    @abstractmethod
    def load(self, cfg: Any, folder: Path) -> MapModule:
        """The map module of a bundle folder (weights from the bundle only), in eval mode on the CPU."""

    def feature_graphs(self, amap: MapModule) -> dict[str, nn.Module]:
        """Graphs exported beside scorer.onnx: file name -> module (float [N, 3, H, W] -> feature tuple)."""
        return {}


__all__ = ["FitData", "FitRun", "Fitted", "Method", "ProgressFn", "TrainingStopped"]
