"""Devices, seeds and the good-image split: what makes a training run repeatable."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return dev


@contextmanager
def reproducible(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seeded RNGs (Python, numpy, torch) and, on CPU, torch's deterministic algorithms, for the duration
    of the block; -> a seeded generator for DataLoader shuffling. The caller's RNG states and
    deterministic-algorithms setting are restored afterwards: a library call flips no global switch for
    good (while it runs they are process-wide, as torch keeps them)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        gen = seed_everything(seed)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield gen
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            random.setstate(py_state)
            np.random.set_state(np_state)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic shuffle-split of n good images -> (train indices, validation indices)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"{n} good image(s) are too few to hold out {n_val} for validation")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


__all__ = ["reproducible", "resolve_device", "seed_everything", "split_indices"]
