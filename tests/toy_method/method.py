"""The toy method behind the method interface (torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stpm.methods.base import FitData, FitRun, Fitted, Method
from stpm.methods.maps import MapModule

WEIGHTS = "toy_colour.safetensors"


class ColourMap(MapModule):
    """float [N, 3, S, S] in [0, 1] -> [N, S, S]: each pixel's colour distance to the mean good colour."""

    def __init__(self, mean: torch.Tensor, sigma: float = 0.0):
        super().__init__(sigma)
        self.register_buffer("mean", mean.reshape(1, 3, 1, 1).float())

    def unblurred(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) ** 2).sum(1).add(1e-12).sqrt()


class ToyColour(Method):
    def fit(self, cfg: Any, train: Any, data: FitData, run: FitRun) -> Fitted:
        tiles = torch.from_numpy(data.train.tiles).float() / 255.0  # [T, S, S, 3]
        mean = tiles.mean(dim=(0, 1, 2))
        record = {"epochs_run": 0, "best_epoch": 0, "best_val_loss": None, "stopped_early": False, "history": []}
        return Fitted(ColourMap(mean, cfg.sigma or 0.0), "none", record, {"mean": mean.tolist()})

    def save(self, amap: ColourMap, folder: Path) -> list[str]:
        save_file({"mean": amap.mean.reshape(3).contiguous()}, str(folder / WEIGHTS))
        return [WEIGHTS]

    def load(self, cfg: Any, folder: Path) -> ColourMap:
        return ColourMap(load_file(str(folder / WEIGHTS))["mean"], float(cfg.sigma)).eval()
