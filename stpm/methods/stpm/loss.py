"""STPM maths as pure functions: the training loss, the anomaly map and the image score."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from stpm.options import Combine


def layer_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """0.5 * ||normalize(t) - normalize(s)||^2 per position.

    t, s: [B, C, H, W] teacher / student features of one layer -> [B, H, W].
    """
    t = F.normalize(t, dim=1)
    s = F.normalize(s, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1)


def stpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's loss: per layer the mean over positions (and batch) of `layer_distance`, summed.

    teacher, student: lists of [B, C_l, H_l, W_l] -> scalar.
    """
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher layers but {len(student)} student layers")
    return sum(layer_distance(t, s).mean() for t, s in zip(teacher, student))


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius 4*sigma (as scipy's default truncate=4)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding. maps: [B, H, W] -> [B, H, W]."""
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


def anomaly_map(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    combine: Combine = "product",
    sigma: float = 0.0,
) -> torch.Tensor:
    """Per-layer distances upsampled (bilinear) to out_size, fused across layers.

    combine="product" is the paper (a position must disagree at every scale); "sum" is more
    forgiving of one blind layer. teacher, student: lists of [B, C_l, H_l, W_l] -> [B, H, W].
    """
    fused: torch.Tensor | None = None
    for t, s in zip(teacher, student, strict=True):
        d = layer_distance(t.float(), s.float()).unsqueeze(1)
        d = F.interpolate(d, size=out_size, mode="bilinear", align_corners=False).squeeze(1)
        if fused is None:
            fused = d
        elif combine == "product":
            fused = fused * d
        elif combine == "sum":
            fused = fused + d
        else:
            raise ValueError(f"combine must be 'product' or 'sum', got {combine!r}")
    if fused is None:
        raise ValueError("no feature layers given")
    return gaussian_blur(fused, sigma)


def image_score(amap: torch.Tensor) -> torch.Tensor:
    """Image anomaly score = max of the map. amap: [B, H, W] -> [B]."""
    return amap.flatten(1).amax(dim=1)
