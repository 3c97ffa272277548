"""STPM maths as pure functions: the training loss and the anomaly map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from stpm.methods.maps import gaussian_blur

Combine = Literal["product", "sum"]


def layer_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """0.5 * ||normalize(t) - normalize(s)||^2 per position.

    t, s: [B, C, H, W] teacher / student features of one layer -> [B, H, W].
    """
    t = F.normalize(t, dim=1)
    s = F.normalize(s, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1)


def grid_mask(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel validity [B, S, S] -> which positions of a gh x gw feature grid have their receptive centre
    (pixel floor((i + 0.5) * S / g)) on a valid pixel: bool [B, gh, gw]."""
    (gh, gw), (sh, sw) = grid, valid.shape[-2:]
    iy = ((torch.arange(gh, device=valid.device) + 0.5) * sh / gh).floor().long()
    ix = ((torch.arange(gw, device=valid.device) + 0.5) * sw / gw).floor().long()
    return valid[:, iy][:, :, ix]


def stpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's loss: per layer the mean over positions (and batch) of `layer_distance`, summed.

    teacher, student: lists of [B, C_l, H_l, W_l] -> scalar. valid: bool [B, S, S], the tiles' own pixels
    (None: all); then each layer's mean runs over the positions whose receptive centre is valid only, so
    the padding of small images trains nothing.
    """
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher layers but {len(student)} student layers")
    if valid is None:
        return sum(layer_distance(t, s).mean() for t, s in zip(teacher, student))
    total = torch.zeros((), device=teacher[0].device)
    for t, s in zip(teacher, student):
        d = layer_distance(t, s)
        m = grid_mask(valid, (d.shape[-2], d.shape[-1])).to(d.dtype)
        total = total + (d * m).sum() / m.sum().clamp_min(1.0)
    return total


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
