"""PatchCore's map: each position's Euclidean distance to its nearest memory-bank feature, upsampled
(bilinear) to the tile and smoothed. In the exported graph the bank is a constant and the search is a
matmul + min per bank chunk, so the largest intermediate is (positions x chunk), not (positions x bank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stpm.methods.maps import MapModule
from stpm.methods.patchcore.features import PatchFeatures
from stpm.methods.patchcore.mirrors import mean_of_views, mirror_dims, views

BANK_CHUNK = 4096  # bank rows per matmul in the nearest-neighbour search


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor,
                     chunk: int = BANK_CHUNK) -> torch.Tensor:
    """Euclidean distance of each query [Q, D] to its nearest bank row [K, D] (bank_sq: [K] squared
    norms) -> [Q]. The bank is walked in chunks so the largest intermediate is [Q, chunk]; per chunk
    one matmul (the -2 folds into the bank constant) and one add, the queries' own norms are added
    after the min (they do not change which row is nearest)."""
    best: torch.Tensor | None = None
    for start in range(0, bank.shape[0], chunk):
        b = bank[start:start + chunk]
        m = (queries @ (b * -2.0).t() + bank_sq[start:start + chunk].unsqueeze(0)).amin(dim=1)
        best = m if best is None else torch.minimum(best, m)
    assert best is not None
    return (best + (queries * queries).sum(1)).clamp_min(0.0).sqrt()


class PatchCoreMap(MapModule):
    """Patch features + memory bank -> anomaly map. float [N, 3, S, S] in [0, 1] -> [N, S, S].

    The search runs on features centred on the bank's mean (distances do not change): the norms
    that cancel in |q|^2 - 2 q.b + |b|^2 are then smaller, which keeps a bf16 search (OpenVINO on
    CPUs with bf16) closer to fp32 (benchmarks/bf16_split.py; docs/BENCHMARKS.md, "Peer").

    mirrors (stpm.methods.patchcore.mirrors): the map of each tile is averaged with its mirrors' maps; the
    teacher sees the tiles and their mirrors as one batch."""

    def __init__(self, features: PatchFeatures, bank: torch.Tensor, sigma: float = 4.0, mirrors: str = "none"):
        super().__init__(sigma)
        self.mirrors, self._flips = mirrors, mirror_dims(mirrors)
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"memory bank must be [K, D] with K >= 1, got {tuple(bank.shape)}")
        self.features = features
        self.register_buffer("bank", bank.float().contiguous())
        center = self.bank.mean(0)
        centered = self.bank - center
        # derived from the bank (not saved): the exported graph holds these, not the bank itself
        self.register_buffer("center", center, persistent=False)
        self.register_buffer("bank_centered", centered, persistent=False)
        self.register_buffer("bank_sq", (centered * centered).sum(1), persistent=False)

    def unblurred(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(views(x, self._flips))
        n, d, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(n * h * w, d) - self.center
        dist = nearest_distance(q, self.bank_centered, self.bank_sq).reshape(n, 1, h, w)
        up = F.interpolate(dist, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False).squeeze(1)
        return mean_of_views(up, self._flips)


__all__ = ["BANK_CHUNK", "PatchCoreMap", "nearest_distance"]
