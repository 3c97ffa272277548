"""STPM as a map module: frozen teacher vs trained student, per-layer distances fused into one map."""

from __future__ import annotations

import torch

from stpm.methods.maps import MapModule
from stpm.methods.stpm.loss import anomaly_map
from stpm.methods.stpm.model import STPM


class STPMMap(MapModule):
    """float [N, 3, S, S] in [0, 1] -> [N, S, S] (the paper's map: distances multiplied across layers, or
    summed with combine="sum"), smoothed by `sigma`."""

    def __init__(self, model: STPM, combine: str = "product", sigma: float = 0.0):
        super().__init__(sigma)
        self.model = model
        self.combine = combine

    def unblurred(self, x: torch.Tensor) -> torch.Tensor:
        t, s = self.model(x)
        return anomaly_map(t, s, (x.shape[-2], x.shape[-1]), self.combine, 0.0)


__all__ = ["STPMMap"]
