"""STPM's training data: uint8 tiles in memory as float tensors (the model normalises)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageArrayDataset(Dataset):
    """uint8 [N, S, S, 3] -> float tensors [3, S, S] in [0, 1] (the model normalises). With `boxes`
    (int [N, 4]: each tile's own pixels, stpm.imaging.geometry.tile_boxes) each item is (tensor, bool
    [S, S] validity), so the loss can leave padding out."""

    def __init__(self, images: np.ndarray, augment: bool = False, boxes: np.ndarray | None = None):
        self.images = images
        self.augment = augment
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            # Photometric jitter only: geometric changes can be anomalies on a production line.
            g = torch.empty(1).uniform_(0.9, 1.1)
            x = (x * g).clamp_(0.0, 1.0)
        if self.boxes is None:
            return x
        y0, y1, x0, x1 = (int(v) for v in self.boxes[i])
        valid = torch.zeros(x.shape[-2:], dtype=torch.bool)
        valid[y0:y1, x0:x1] = True
        return x, valid


def tile_batch_to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float [N, 3, S, S] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).float().div_(255.0)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, S, S] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
