"""PatchCore (Roth et al., CVPR 2022) on the frozen teacher's features: no training loop.

Fitting: every S x S tile of the good training images goes through the ImageNet teacher; each
requested layer is averaged over a 3 x 3 neighbourhood ("locally aware" patch features), brought to
the grid of the finest requested layer and concatenated: one D-dim feature per grid position. A
greedy k-center coreset (on a random projection, in independent random chunks so the cost is
linear in the number of patches) keeps `bank_size` of them: the memory bank.

Scoring: the anomaly map of a tile is each position's Euclidean distance to its nearest bank
feature, upsampled (bilinear) to S x S and smoothed (Gaussian, `sigma`). In the exported graph the
bank is a constant and the search is matmuls + min over bank chunks, so the largest intermediate is
(positions x chunk), not (positions x bank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stpm.methods import backbones
from stpm.methods.stpm.loss import gaussian_blur

BANK_CHUNK = 4096  # bank rows per matmul in the nearest-neighbour search
MIN_BANK = 2048  # memory-bank rows kept however small the coreset ratio
DEFAULT_SIGMA = 4.0  # PatchCore's smoothing at 224-256 px inputs


def default_layers(backbone: str) -> tuple[str, ...]:
    """PatchCore's mid-level layers: the backbone's default pyramid without its finest stage
    (ResNets: layer2 + layer3, as in the paper; EfficientNet-Lite: blocks.2 + blocks.4)."""
    from stpm.methods.maps import patchcore_layers

    return patchcore_layers(backbone)


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


def _greedy_batched(z: torch.Tensor, valid: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-center in C independent chunks at once. z: [C, L, d] (rows beyond a chunk's length are
    padding, valid False); -> [C, k] row indices, each the row farthest from those already chosen in its
    chunk. One batched matrix-vector product per step, so small chunks still use the cores well."""
    c, length, _ = z.shape
    zz = (z * z).sum(2)  # [C, L]
    rows = torch.arange(c)
    first = torch.stack([torch.randint(int(n), (1,), generator=g)[0] for n in valid.sum(1)])
    chosen = [first]
    zi = z[rows, first]  # [C, d]
    dist = zz - 2 * torch.bmm(z, zi.unsqueeze(2)).squeeze(2) + zz[rows, first].unsqueeze(1)
    dist[~valid] = -1.0  # padding is never the farthest row
    for _ in range(k - 1):
        i = dist.argmax(dim=1)
        chosen.append(i)
        zi = z[rows, i]
        d = zz - 2 * torch.bmm(z, zi.unsqueeze(2)).squeeze(2) + zz[rows, i].unsqueeze(1)
        torch.minimum(dist, d, out=dist)
        dist[~valid] = -1.0
    return torch.stack(chosen, dim=1)


def greedy_coreset(
    features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 64, chunk: int = 16384
) -> torch.Tensor:
    """Indices of an approximate greedy k-center coreset of `features` [M, D]: about n rows (at least
    n, rounded up so every chunk gives the same number).

    As PatchCore, distances are measured on a random projection to `proj_dim` dims. The patches are
    shuffled into chunks of at most `chunk` rows, each chunk runs its own greedy selection, all chunks
    in lockstep: the cost is O(n * chunk * proj_dim), not O(n * M * proj_dim), and it does not grow with
    the training set. Deterministic given `seed`."""
    m = len(features)
    if n < 1:
        raise ValueError(f"coreset size must be >= 1, got {n}")
    if n >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(int(seed))
    d = features.shape[1]
    proj = torch.randn(d, proj_dim, generator=g) / math.sqrt(proj_dim) if d > proj_dim else None
    order = torch.randperm(m, generator=g)
    parts = math.ceil(m / chunk)
    length = math.ceil(m / parts)
    k = min(length, math.ceil(n / parts))
    z = torch.zeros(parts, length, proj_dim if proj is not None else d)
    index = torch.zeros(parts, length, dtype=torch.long)
    valid = torch.zeros(parts, length, dtype=torch.bool)
    for c in range(parts):
        idx = order[c * m // parts:(c + 1) * m // parts]
        f = features[idx].float()
        z[c, :len(idx)] = f @ proj if proj is not None else f
        index[c, :len(idx)] = idx
        valid[c, :len(idx)] = True
    picked = _greedy_batched(z, valid, k, g)  # [C, k]
    out = torch.gather(index, 1, picked).reshape(-1)
    keep = torch.gather(valid, 1, picked).reshape(-1)  # a chunk shorter than k repeats nothing invalid
    return torch.unique(out[keep])


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


class PatchCoreMap(nn.Module):
    """Patch features + memory bank -> anomaly map. float [N, 3, S, S] in [0, 1] -> [N, S, S].

    The search runs on features centred on the bank's mean (distances do not change): the norms
    that cancel in |q|^2 - 2 q.b + |b|^2 are then smaller, which keeps a bf16 search (OpenVINO on
    CPUs with bf16) closer to fp32 (benchmarks/bf16_split.py; docs/BENCHMARKS.md, "Peer")."""

    def __init__(self, features: PatchFeatures, bank: torch.Tensor, sigma: float = 4.0):
        super().__init__()
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"memory bank must be [K, D] with K >= 1, got {tuple(bank.shape)}")
        self.features = features
        self.sigma = float(sigma)
        self.register_buffer("bank", bank.float().contiguous())
        center = self.bank.mean(0)
        centered = self.bank - center
        # derived from the bank (not saved): the exported graph holds these, not the bank itself
        self.register_buffer("center", center, persistent=False)
        self.register_buffer("bank_centered", centered, persistent=False)
        self.register_buffer("bank_sq", (centered * centered).sum(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        n, d, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(n * h * w, d) - self.center
        dist = nearest_distance(q, self.bank_centered, self.bank_sq).reshape(n, 1, h, w)
        amap = F.interpolate(dist, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False).squeeze(1)
        return gaussian_blur(amap, self.sigma)


@torch.no_grad()
def collect_features(
    features: PatchFeatures,
    tiles: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """uint8 tiles [T, S, S, 3] -> patch features [T * h * w, D] (float32, on the CPU)."""
    features.eval()
    out = []
    for i in range(0, len(tiles), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        f = features(x)
        out.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).float().cpu())
        if on_batch is not None:
            on_batch(min(i + batch_size, len(tiles)), len(tiles))
    if not out:
        raise ValueError("no tiles to collect features from")
    return torch.cat(out)


def build_features(cfg, weights_dir=None) -> tuple[PatchFeatures, str]:
    """The frozen ImageNet teacher of `cfg` (a resolved stpm.options.ModelOptions) as PatchFeatures;
    -> (module, where the weights came from)."""
    teacher, source = backbones.build_teacher(cfg.backbone, cfg.layers, cfg.pretrained, cfg.weights, weights_dir)
    return PatchFeatures(teacher, cfg.mean, cfg.std, cfg.neighbourhood), source


def bank_rows(n_patches: int, ratio: float, cap: int) -> int:
    """Memory-bank rows: `ratio` of the patches, at most `cap`; small training sets keep up to
    MIN_BANK rows (a bank that small costs nothing to search, and a few images need every patch)."""
    return min(cap, max(math.ceil(ratio * n_patches), min(n_patches, MIN_BANK)))


def fit_bank(patches: torch.Tensor, bank_size: int, seed: int = 0) -> torch.Tensor:
    """Patch features [M, D] -> memory bank [min(bank_size, M), D] (greedy coreset)."""
    idx = greedy_coreset(patches, bank_size, seed=seed)
    return patches[idx].contiguous()


def fit(
    cfg,
    tiles: np.ndarray,
    device: torch.device,
    weights_dir=None,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_bar: bool = True,
) -> tuple[PatchCoreMap, str, dict]:
    """Good training tiles uint8 [T, S, S, 3] -> (PatchCoreMap on the CPU, teacher weight source, facts).

    `cfg` is a resolved ModelOptions. `progress` gets the same keys as STPM's
    training progress (epoch 1 of 1, step = tiles done) plus "phase"; `should_stop` is polled per batch
    and raises stpm.train.TrainingStopped."""
    import time

    from tqdm import tqdm

    from stpm.methods.stpm.trainer import TrainingStopped

    t0 = time.monotonic()
    features, source = build_features(cfg, weights_dir)
    features.to(device)
    bar = tqdm(total=len(tiles), desc="patch features", unit="tile", disable=not show_bar)

    def on_batch(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise TrainingStopped("stop requested")
        bar.update(done - bar.n)
        if progress is not None:
            progress({"phase": "patch features", "epoch": 1, "epochs": 1, "step": done, "steps": total})

    try:
        patches = collect_features(features, tiles, device, batch_size, on_batch)
    finally:
        bar.close()
    t1 = time.monotonic()
    if progress is not None:
        progress({"phase": "memory bank (coreset)", "epoch": 1, "epochs": 1, "step": len(tiles),
                  "steps": len(tiles)})
    bank = fit_bank(patches, bank_rows(len(patches), cfg.coreset_ratio, cfg.bank_size), seed=seed)
    t2 = time.monotonic()
    sigma = DEFAULT_SIGMA if cfg.sigma is None else float(cfg.sigma)  # stpm.selection may change it
    amap = PatchCoreMap(features.cpu(), bank, sigma).eval()
    info = {"n_patches": int(len(patches)), "feature_dim": int(patches.shape[1]), "bank_size": int(len(bank)),
            "features_seconds": round(t1 - t0, 2), "coreset_seconds": round(t2 - t1, 2),
            "seconds": round(t2 - t0, 2)}
    return amap, source, info


__all__ = [
    "BANK_CHUNK",
    "PatchCoreMap",
    "PatchFeatures",
    "build_features",
    "collect_features",
    "default_layers",
    "fit",
    "fit_bank",
    "greedy_coreset",
    "nearest_distance",
]
