"""What every method's scoring module is: float tiles [N, 3, S, S] in [0, 1] -> raw anomaly maps [N, S, S],
the method's own (unblurred) map smoothed last by a Gaussian of `sigma` tile pixels. Model selection
computes the unblurred maps once and tries each sigma on them (stpm.training.selection), exactly as the
exported graph blurs. Pure functions with tensor shapes in their docstrings, plus the base module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius 4*sigma (as scipy's default truncate=4)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding. maps: [B, H, W] -> [B, H, W] (sigma <= 0: unchanged)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps)
    r = k.numel() // 2
    r_max = min(maps.shape[-2], maps.shape[-1]) - 1  # reflect padding needs r < each side
    if r > r_max:  # a map smaller than the kernel (tiny tiles): the kernel is truncated and renormalised
        k = k[r - r_max:r + r_max + 1]
        k = k / k.sum()
        r = r_max
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def tile_score(amap: torch.Tensor) -> torch.Tensor:
    """A tile's score = the max of its map. amap: [B, H, W] -> [B]."""
    return amap.flatten(1).amax(dim=1)


class MapModule(nn.Module):
    """A method's scoring module: float [N, 3, S, S] in [0, 1] -> raw anomaly maps [N, S, S]."""

    def __init__(self, sigma: float = 0.0):
        super().__init__()
        self.sigma = float(sigma)

    def unblurred(self, x: torch.Tensor) -> torch.Tensor:
        """The method's map before smoothing: float [N, 3, S, S] -> [N, S, S]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(self.unblurred(x), self.sigma)

    def with_sigma(self, sigma: float) -> MapModule:
        """Set the map smoothing (what model selection chose); -> self."""
        self.sigma = float(sigma)
        return self


def tile_fn(amap: MapModule, device: torch.device, blurred: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """A map module as a per-tile function for stpm.imaging.geometry.predict_maps: uint8 [N, 3, S, S] ->
    float32 [N, S, S]; blurred False: the maps before smoothing."""

    @torch.no_grad()
    def fn(batch: np.ndarray) -> np.ndarray:
        amap.eval()
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).float().div_(255.0)
        out = amap(x) if blurred else amap.unblurred(x)
        return out.float().cpu().numpy()

    return fn


__all__ = ["MapModule", "gaussian_blur", "gaussian_kernel1d", "tile_fn", "tile_score"]
