"""Training: plain loops, the lowest-validation-loss checkpoint, early stopping, resume, Ctrl-C safety."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from stpm.methods.base import ProgressFn, TrainingStopped
from stpm.methods.maps import tile_score
from stpm.methods.stpm.loss import anomaly_map, stpm_loss
from stpm.methods.stpm.model import STPM

if TYPE_CHECKING:  # method code gets its options as arguments: it never imports stpm.options
    from stpm.options import TrainOptions

def make_optimizer(model: STPM, cfg: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _unpack(batch: torch.Tensor | list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader's batch -> (tiles, their pixel validity or None: see ImageArrayDataset), on `device`."""
    if isinstance(batch, (list, tuple)):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    return batch.to(device, non_blocking=True), None


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
    for step, batch in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        x, valid = _unpack(batch, device)
        with torch.autocast(device.type, enabled=scaler is not None):
            t, s = model(x)
            loss = stpm_loss(t, s, valid)
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
    for batch in loader:
        x, valid = _unpack(batch, device)
        t, s = model(x)
        total += stpm_loss(t, s, valid).item() * len(x)
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
        scores.append(tile_score(m).cpu())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


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


@dataclass
class _Progress:
    """The state a run carries from epoch to epoch (and in its checkpoint)."""

    start_epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, epoch: int, train_loss: float, val_loss: float, seconds: float, model: STPM) -> None:
        if val_loss < self.best_val:
            self.best_val, self.best_epoch, self.bad_epochs = val_loss, epoch + 1, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.student_state_dict().items()}
        else:
            self.bad_epochs += 1
        self.history.append({"epoch": epoch + 1, "loss": train_loss, "val_loss": val_loss, "seconds": seconds})

    def checkpoint(self, epoch: int, model: STPM, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"epoch": epoch, "model": model.student_state_dict(), "optimizer": optimizer.state_dict(),
                "best_student": self.best_state, "best_val_loss": self.best_val, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "history": self.history}


def _start(model: STPM, optimizer: torch.optim.Optimizer, checkpoint: Path | None, resume: bool) -> _Progress:
    """A fresh run's state, or the checkpoint's when resuming."""
    if not (resume and checkpoint is not None and checkpoint.is_file()):
        return _Progress(best_state={k: v.detach().clone() for k, v in model.student_state_dict().items()})
    ck = load_checkpoint(checkpoint)
    load_student(model, ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    return _Progress(ck["epoch"] + 1, ck["best_val_loss"], ck["best_epoch"], ck["bad_epochs"], ck["history"],
                     ck["best_student"])


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
    step_model = torch.compile(model) if (cfg.compile and device.type == "cuda") else model
    state = _start(model, optimizer, checkpoint, resume)
    t0 = time.monotonic()
    steps = len(train_loader) if not cfg.max_steps else min(cfg.max_steps, len(train_loader))
    bar = tqdm(total=cfg.epochs, initial=state.start_epoch, desc="train", unit="epoch", disable=not show_bar)
    result = FitResult(state.best_epoch, state.best_val, state.start_epoch)
    try:
        for epoch in range(state.start_epoch, cfg.epochs):
            e0 = time.monotonic()

            def on_step(step: int, loss: float) -> None:
                if should_stop is not None and should_stop():
                    raise TrainingStopped("stop requested")
                if progress is not None:
                    progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1, "steps": steps,
                              "loss": loss})

            train_loss = train_one_epoch(step_model, train_loader, optimizer, device, scaler, cfg.max_steps, on_step)
            val_loss = validation_loss(model, val_loader, device)
            state.record(epoch, train_loss, val_loss, time.monotonic() - e0, model)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, state.checkpoint(epoch, model, optimizer))
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{state.best_val:.4f}")
            bar.update(1)
            if progress is not None:
                eta = (time.monotonic() - t0) / (epoch + 1 - state.start_epoch) * (cfg.epochs - epoch - 1)
                progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": steps, "steps": steps, "loss": train_loss,
                          "val_loss": val_loss, "best_val_loss": state.best_val, "eta_s": eta})
            if cfg.patience and state.bad_epochs >= cfg.patience:
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        # The checkpoint on disk (replaced atomically after each epoch) holds the last completed
        # epoch and the best student; the epoch in flight is dropped.
        result.interrupted = True
    finally:
        bar.close()
    load_student(model, state.best_state)
    return replace(result, best_epoch=state.best_epoch, best_val_loss=state.best_val, epochs_run=len(state.history),
                   history=state.history, seconds=time.monotonic() - t0)
