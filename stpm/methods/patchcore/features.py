"""PatchCore's locally aware patch features of the frozen ImageNet teacher: each requested layer averaged
over a neighbourhood, brought to the finest layer's grid and concatenated (one D-dim feature per position)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stpm.imaging.geometry import valid_grid
from stpm.methods import backbones


class PatchFeatures(nn.Module):
    """Frozen teacher -> locally aware patch features. float [N, 3, S, S] in [0, 1] -> [N, D, h, w]
    (h, w: the grid of the finest requested layer; D: the layers' channels summed)."""

    def __init__(
        self,
        teacher: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        neighbourhood: int = 3,
    ):
        super().__init__()
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd number >= 1, got {neighbourhood}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.neighbourhood = int(neighbourhood)
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> PatchFeatures:
        """The teacher never trains: it stays in eval mode whatever the caller asks."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.teacher((x - self.mean) / self.std)
        grid = feats[0].shape[-2:]
        k = self.neighbourhood
        out = []
        for f in feats:
            if k > 1:
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            out.append(f)
        return torch.cat(out, dim=1)


class Patches(NamedTuple):
    """What collect_features gathers from a set of tiles."""

    features: torch.Tensor  # float32 [M, D] on the CPU, in tile order, row-major within a tile
    positions: int  # T * h * w: every grid position, padding included
    tile: np.ndarray  # int64 [M]: the tile each feature comes from


@torch.no_grad()
def collect_features(
    features: PatchFeatures,
    tiles: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
    boxes: np.ndarray | None = None,
) -> Patches:
    """uint8 tiles [T, S, S, 3] -> Patches: M = T * h * w features, or with `boxes` (int [T, 4], each
    tile's own pixels, stpm.imaging.geometry.tile_boxes) only the positions whose receptive centre lies in
    them (padding gives no feature), and the tile of each."""
    features.eval()
    out, tile_of, positions = [], [], 0
    for i in range(0, len(tiles), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        f = features(x).permute(0, 2, 3, 1)  # [B, h, w, D]
        positions += f.shape[0] * f.shape[1] * f.shape[2]
        if boxes is None:
            kept, per_tile = f.reshape(-1, f.shape[-1]), np.full(f.shape[0], f.shape[1] * f.shape[2])
        else:
            keep = valid_grid(boxes[i:i + batch_size], tiles.shape[1], (f.shape[1], f.shape[2]))
            kept, per_tile = f[torch.from_numpy(keep).to(f.device)], keep.reshape(f.shape[0], -1).sum(1)
        out.append(kept.float().cpu())
        tile_of.append(np.repeat(np.arange(i, i + f.shape[0]), per_tile))
        if on_batch is not None:
            on_batch(min(i + batch_size, len(tiles)), len(tiles))
    if not out or sum(len(o) for o in out) == 0:
        raise ValueError("no tiles (or no position inside an image) to collect features from")
    return Patches(torch.cat(out), positions, np.concatenate(tile_of).astype(np.int64))


def build_features(cfg, weights_dir=None) -> tuple[PatchFeatures, str]:
    """The frozen ImageNet teacher of `cfg` (a resolved ModelOptions) as PatchFeatures;
    -> (module, where the weights came from)."""
    teacher, source = backbones.build_teacher(cfg.backbone, cfg.layers, cfg.pretrained, cfg.weights, weights_dir)
    return PatchFeatures(teacher, cfg.mean, cfg.std, cfg.neighbourhood), source


__all__ = ["PatchFeatures", "Patches", "build_features", "collect_features"]
