"""The scoring methods behind one interface: a map module, float tiles in [0, 1] [N, 3, S, S] ->
raw anomaly maps [N, S, S]. Training, calibration, evaluation, export and the parity checks only see
that module; `manifest["model"]["method"]` says which method a bundle holds (absent: stpm).

  stpm       STPMMap: frozen teacher vs trained student, per-layer distances fused (stpm.loss).
  patchcore  PatchCoreMap: nearest memory-bank distance of the teacher's patch features (stpm.patchcore).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from stpm.options import ModelOptions
from stpm.methods.stpm.loss import anomaly_map
from stpm.methods.stpm.model import STPM

METHODS = ("stpm", "patchcore")


class STPMMap(nn.Module):
    """STPM as a map module: float [N, 3, S, S] in [0, 1] -> [N, S, S] (the paper's map)."""

    def __init__(self, model: STPM, combine: str = "product", sigma: float = 0.0):
        super().__init__()
        self.model = model
        self.combine = combine
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.model(x)
        return anomaly_map(t, s, (x.shape[-2], x.shape[-1]), self.combine, self.sigma)


def method_of(model: dict[str, Any] | ModelOptions) -> str:
    m = model.method if isinstance(model, ModelOptions) else model.get("method", "stpm")
    if m not in METHODS:
        raise ValueError(f"unknown method {m!r}; choose one of {', '.join(METHODS)}")
    return m


def patchcore_layers(backbone: str) -> tuple[str, ...]:
    """PatchCore's mid-level layers: the backbone's default pyramid without its finest stage
    (ResNets: layer2 + layer3, as in the paper; EfficientNet-Lite: blocks.2 + blocks.4)."""
    from stpm.methods import backbones

    return backbones.spec(backbone).default_layers[1:]


def resolved(cfg: ModelOptions) -> ModelOptions:
    """cfg with the method-dependent defaults made explicit and validated. `sigma` None and
    `image_score` "auto" stay open: stpm.selection chooses them after fitting."""
    from stpm.methods import backbones

    m = method_of(cfg)
    sigma = None if cfg.sigma is None else float(cfg.sigma)  # None: stpm.selection chooses
    if sigma is not None and sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    layers = cfg.layers
    if m == "patchcore":
        layers = backbones.resolve_layers(cfg.backbone, cfg.layers or patchcore_layers(cfg.backbone))
        if cfg.student_backbone:
            raise ValueError("student_backbone applies to method stpm only (patchcore trains no student)")
        if cfg.bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {cfg.bank_size}")
        if not 0.0 < cfg.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must lie in (0, 1], got {cfg.coreset_ratio}")
    return replace(cfg, sigma=sigma, layers=tuple(layers))


def tile_fn(amap: nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """A map module as a per-tile function for stpm.tiling.predict_maps: uint8 [N, 3, S, S] -> float32 [N, S, S]."""

    @torch.no_grad()
    def fn(batch: np.ndarray) -> np.ndarray:
        amap.eval()
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).float().div_(255.0)
        return amap(x).float().cpu().numpy()

    return fn


__all__ = ["METHODS", "STPMMap", "method_of", "resolved", "tile_fn"]
