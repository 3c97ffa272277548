"""Training: plain loops, the lowest-validation-loss checkpoint, early stopping, resume, Ctrl-C safety."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from stpm.options import TrainOptions
from stpm.methods.stpm.loss import anomaly_map, image_score, stpm_loss
from stpm.methods.stpm.model import STPM
from stpm.imaging.geometry import TileFn

ProgressFn = Callable[[dict[str, Any]], None]


class TrainingStopped(Exception):
    """Raised by fit() when `should_stop()` asked it to stop (e.g. a cancelled job)."""


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


def make_optimizer(model: STPM, cfg: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_one_epoch(
    model: STPM,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    max_steps: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """One pass over `loader`; -> mean training loss."""
    model.train()
    total, count = 0.0, 0
    for step, x in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=scaler is not None):
            t, s = model(x)
            loss = stpm_loss(t, s)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
        if on_step is not None:
            on_step(step, loss.item())
    return total / max(count, 1)


@torch.no_grad()
def validation_loss(model: STPM, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for x in loader:
        x = x.to(device)
        t, s = model(x)
        total += stpm_loss(t, s).item() * len(x)
        count += len(x)
    return total / max(count, 1)


@torch.no_grad()
def predict(
    model: STPM,
    images: torch.Tensor,
    device: torch.device,
    combine: str = "product",
    sigma: float = 0.0,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """float [N, 3, S, S] in [0, 1] -> (maps float32 [N, S, S], scores float32 [N])."""
    model.eval()
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        t, s = model(x)
        m = anomaly_map(t, s, tuple(x.shape[-2:]), combine, sigma)
        maps.append(m.cpu())
        scores.append(image_score(m).cpu())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


def stpm_tile_fn(model: STPM, device: torch.device, combine: str = "product", sigma: float = 0.0) -> TileFn:
    """STPM as a per-tile map function for stpm.tiling.predict_maps: uint8 [N, 3, S, S] -> float32 [N, S, S]."""
    from stpm.methods.maps import STPMMap, tile_fn

    return tile_fn(STPMMap(model, combine, sigma), device)


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False
    seconds: float = 0.0


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_student(model: STPM, state: dict[str, torch.Tensor]) -> None:
    """Load a `student_state_dict()` back; any key that is not the student's raises."""
    own = model.student_state_dict()
    if set(state) != set(own):
        raise ValueError(f"student state does not fit the model: {sorted(set(state) ^ set(own))[:4]}")
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def fit(
    model: STPM,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainOptions,
    device: torch.device,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_bar: bool = True,
) -> FitResult:
    """Train the student; keep the lowest-validation-loss student (loaded into `model` on return).

    The checkpoint (if given) is rewritten after every epoch and on Ctrl-C, and holds the current and
    the best student plus the optimizer, so `resume=True` continues where it stopped.
    """
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None
    step_model = model
    if cfg.compile and device.type == "cuda":
        step_model = torch.compile(model)
    start_epoch, best_val, best_epoch, bad_epochs, history = 0, math.inf, -1, 0, []
    best_state = {k: v.detach().clone() for k, v in model.student_state_dict().items()}
    if resume and checkpoint is not None and checkpoint.is_file():
        ck = load_checkpoint(checkpoint)
        load_student(model, ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, best_val, best_epoch = ck["epoch"] + 1, ck["best_val_loss"], ck["best_epoch"]
        bad_epochs, history, best_state = ck["bad_epochs"], ck["history"], ck["best_student"]

    def state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch, "model": model.student_state_dict(), "optimizer": optimizer.state_dict(),
            "best_student": best_state, "best_val_loss": best_val, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs, "history": history,
        }

    t0 = time.monotonic()
    epoch = start_epoch - 1
    steps = len(train_loader) if not cfg.max_steps else min(cfg.max_steps, len(train_loader))
    bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="train", unit="epoch", disable=not show_bar)
    result = FitResult(best_epoch, best_val, start_epoch)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            e0 = time.monotonic()

            def on_step(step: int, loss: float) -> None:
                if should_stop is not None and should_stop():
                    raise TrainingStopped("stop requested")
                if progress is not None:
                    progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1, "steps": steps,
                              "loss": loss})

            train_loss = train_one_epoch(step_model, train_loader, optimizer, device, scaler, cfg.max_steps, on_step)
            val_loss = validation_loss(model, val_loader, device)
            improved = val_loss < best_val
            if improved:
                best_val, best_epoch, bad_epochs = val_loss, epoch + 1, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.student_state_dict().items()}
            else:
                bad_epochs += 1
            history.append({"epoch": epoch + 1, "loss": train_loss, "val_loss": val_loss,
                            "seconds": time.monotonic() - e0})
            if checkpoint is not None:
                _save_checkpoint(checkpoint, state(epoch))
            done = epoch + 1 - start_epoch
            eta = (time.monotonic() - t0) / done * (cfg.epochs - epoch - 1)
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{best_val:.4f}")
            bar.update(1)
            if progress is not None:
                progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": steps, "steps": steps,
                          "loss": train_loss, "val_loss": val_loss, "best_val_loss": best_val, "eta_s": eta})
            if cfg.patience and bad_epochs >= cfg.patience:
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        # The checkpoint on disk (replaced atomically after each epoch) holds the last completed
        # epoch and the best student; the epoch in flight is dropped.
        result.interrupted = True
    finally:
        bar.close()
    load_student(model, best_state)
    result.best_epoch, result.best_val_loss = best_epoch, best_val
    result.epochs_run, result.history = len(history), history
    result.seconds = time.monotonic() - t0
    return result
