"""Plain training loops. The teacher is frozen and kept in eval mode in one place: `FrozenTeacher`."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stpm.distill.data import augmentation


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a training run."""

    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    amp: bool = True  # used only on CUDA
    amp_dtype: str = "float16"  # float16 (with a gradient scaler) | bfloat16 (no scaler needed), CUDA autocast
    progress: bool = False
    grad_clip: float = 0.0  # 0 disables clipping
    augment: str = "none"  # training-batch augmentation: none | shift<N> | crop-flip (see data.augmentation)
    lr_schedule: str = "constant"  # constant | cosine (per step, from lr down to 0 at the last step)
    warmup_epochs: float = 0.0  # > 0: the learning rate rises linearly from lr / steps over these epochs' steps
    nesterov: bool = False  # SGD only
    max_norm: float = 0.0  # > 0: after each step, every unit's incoming weight vector has L2 norm <= max_norm
    cpu_bf16: bool = False  # bfloat16 autocast on CPU (fast with AMX / AVX-512 bf16); weights stay float32
    channels_last: bool = False  # model and 4-D batches in channels-last order (faster convs on CPU and GPU)


class FrozenTeacher(nn.Module):
    """Wraps a trained model: no gradients, always eval mode (train() cannot switch it back), no_grad forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(False)
        self.model.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


class Objective(nn.Module):
    """A distillation method: owns the student (and helpers), returns one scalar loss per batch.

    `student` is what gets evaluated and exported. Trainable parameters are those with requires_grad.
    """

    student: nn.Module

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """None for a constant learning rate without warmup; else the factor on lr per step: the cosine decay over
    all cfg.epochs * steps_per_epoch steps (or 1), times a linear warmup over the first cfg.warmup_epochs (a
    high lr on a fresh net can kill every ReLU of a layer in the first steps, leaving a constant classifier)."""
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}: constant | cosine")
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.lr_schedule == "constant" and warm <= 0:
        return None
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * step / total)) if cfg.lr_schedule == "cosine" else 1.0
        return decay * min(1.0, (step + 1) / warm) if warm > 0 else decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, cfg: TrainConfig):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.amp_dtype))
    if cfg.cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Max-norm constraint (Srivastava et al. 2014): rescale every unit's incoming weight vector (a row of a
    Linear weight, one filter of a Conv weight) whose L2 norm exceeds max_norm down to max_norm."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = m.weight
            w.copy_(torch.renorm(w.reshape(w.shape[0], -1), 2, 0, max_norm).reshape(w.shape))


def train_one_epoch(objective: Objective, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, cfg: TrainConfig, scaler: torch.amp.GradScaler | None = None,
                    desc: str = "train",
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One pass over `loader`; returns the mean loss. The scheduler (if any) steps after every batch."""
    objective.train()
    augment = augmentation(cfg.augment)
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, disable=not cfg.progress, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        if cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, cfg):
            loss = objective(x, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(objective), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if cfg.max_norm > 0:
            apply_max_norm(objective.student, cfg.max_norm)
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, device: torch.device, batch_size: int = 1000) -> Tensor:
    """Logits of `model` in eval mode for all of x (restores the previous mode). [N, ...] -> [N, K] on CPU."""
    was_training = model.training
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def count_errors(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> int:
    """Number of misclassified examples."""
    return int((predict_logits(model, x, device).argmax(-1) != y).sum())


@dataclass
class History:
    """Per-epoch training losses and (optional) test errors; snapshots of the student if requested."""

    losses: list[float] = field(default_factory=list)
    test_errors: list[int] = field(default_factory=list)
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)


def fit(objective: Objective, train_loader: DataLoader, cfg: TrainConfig, device: torch.device,
        eval_data: tuple[Tensor, Tensor] | None = None, snapshot_epochs: tuple[int, ...] = (),
        checkpoint_path: Path | None = None, desc: str = "fit", resume_path: Path | None = None) -> History:
    """Train `objective` for cfg.epochs; evaluate objective.student on eval_data after each epoch.

    snapshot_epochs: 1-based epochs after which a copy of the student's state_dict is kept (ESKD).
    checkpoint_path: the student's final state_dict is saved there (weights only).
    resume_path: the training state is saved there after every epoch (weights, optimizer, scheduler, random
    generators, history); a fit given the same file and settings continues after its last epoch, so a killed
    run loses at most one epoch, and ends as the uninterrupted run would. The file is deleted at the end.
    """
    objective.to(device)
    if cfg.channels_last:
        objective.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(trainable_parameters(objective), cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"amp_dtype must be float16 or bfloat16, not {cfg.amp_dtype!r}")
    fp16 = cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    hist = History()
    progress = TrainingState(resume_path, cfg, objective, optimizer, scheduler, scaler, train_loader, hist)
    for epoch in range(progress.load() + 1, cfg.epochs + 1):
        hist.losses.append(train_one_epoch(objective, train_loader, optimizer, device, cfg, scaler,
                                           desc=f"{desc} {epoch}/{cfg.epochs}", scheduler=scheduler))
        if eval_data is not None:
            hist.test_errors.append(count_errors(objective.student, eval_data[0], eval_data[1], device))
        if epoch in snapshot_epochs:
            hist.snapshots[epoch] = copy.deepcopy({k: v.detach().cpu() for k, v in
                                                   objective.student.state_dict().items()})
        progress.save(epoch)
    progress.done()
    if checkpoint_path is not None:
        save_checkpoint(objective.student, checkpoint_path)
    return hist


@dataclass
class TrainingState:
    """fit()'s state after an epoch, saved to and restored from `path` (nothing happens when path is None)."""

    path: Path | None
    cfg: TrainConfig
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    loader: object  # a DataLoader or TensorBatches: its shuffling generator is part of the state
    hist: History

    def _parts(self) -> dict:
        return {"objective": self.objective, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}

    def save(self, epoch: int) -> None:
        if self.path is None:
            return
        generator = getattr(self.loader, "generator", None)
        state = {"epoch": epoch, "config": asdict(self.cfg), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "loader_rng": generator.get_state() if generator is not None else None,
                 "history": {"losses": self.hist.losses, "test_errors": self.hist.test_errors,
                             "snapshots": self.hist.snapshots},
                 **{k: v.state_dict() for k, v in self._parts().items() if v is not None}}
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # a kill while saving leaves the previous epoch's state

    def load(self) -> int:
        """Restore the saved state; the number of epochs it had completed (0 without a file)."""
        if self.path is None or not Path(self.path).is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["config"] != asdict(self.cfg):
            diff = {k: (v, asdict(self.cfg).get(k)) for k, v in state["config"].items() if asdict(self.cfg).get(k) != v}
            raise ValueError(f"{self.path} was saved by a run with other settings (saved, now): {diff}; delete it "
                             "to start afresh")
        for key, part in self._parts().items():
            if part is not None:
                part.load_state_dict(state[key])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state["loader_rng"] is not None:
            self.loader.generator.set_state(state["loader_rng"])
        self.hist.losses[:], self.hist.test_errors[:] = state["history"]["losses"], state["history"]["test_errors"]
        self.hist.snapshots.update(state["history"]["snapshots"])
        return int(state["epoch"])

    def done(self) -> None:
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)


def save_checkpoint(model: nn.Module, path: Path, meta: dict | None = None) -> None:
    """Weights only: {"model": state_dict} plus, when given, {"meta": JSON-able facts (model name, split...)}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if meta is not None:
        payload["meta"] = meta
    torch.save(payload, path)


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, meta) of a checkpoint written by save_checkpoint (meta {} if absent; a bare state_dict too)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in state and isinstance(state["model"], dict):
        return state["model"], dict(state.get("meta", {}))
    return state, {}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
