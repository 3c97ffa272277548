"""Multi-stage recipes: train/distill helpers, TAKD chains, early-stopped teachers (ESKD), Noisy Student."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from stpm.distill.data import TensorBatches, loader
from stpm.distill.methods.offline import CrossEntropyObjective, KDObjective, SoftLabelObjective
from stpm.distill.trainer import History, Objective, TrainConfig, fit, predict_logits


@dataclass(frozen=True)
class RunConfig:
    """Training config plus loader settings."""

    train: TrainConfig
    batch_size: int = 128
    seed: int = 0
    tensor_batches: bool = False  # index the tensors directly (data.TensorBatches; keeps GPU data on the GPU)


def run(objective: Objective, x: Tensor, y: Tensor, cfg: RunConfig, device: torch.device,
        eval_data: tuple[Tensor, Tensor] | None = None, snapshot_epochs: tuple[int, ...] = (),
        desc: str = "fit", resume_path: Path | None = None) -> History:
    """fit() on in-memory tensors with a seeded shuffling loader (a DataLoader, or TensorBatches); resume_path:
    see fit()."""
    batches = (TensorBatches(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed) if cfg.tensor_batches
               else loader(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed))
    return fit(objective, batches, cfg.train, device,
               eval_data=eval_data, snapshot_epochs=snapshot_epochs, desc=desc, resume_path=resume_path)


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, cfg: RunConfig, device: torch.device,
                     eval_data: tuple[Tensor, Tensor] | None = None, snapshot_epochs: tuple[int, ...] = ()) -> History:
    """Hard-label training (teachers, NOKD students)."""
    return run(CrossEntropyObjective(model), x, y, cfg, device, eval_data, snapshot_epochs, desc="train")


def takd_chain(models: list[nn.Module], x: Tensor, y: Tensor, cfg: RunConfig, device: torch.device,
               temperature: float, hard_weight: float, train_first: bool,
               eval_data: tuple[Tensor, Tensor] | None = None) -> list[History]:
    """Teacher -> assistant(s) -> student: each model is distilled from the previous one (frozen).

    models[0] is trained on hard labels first when train_first; any path length >= 2 works.
    """
    if len(models) < 2:
        raise ValueError("a TAKD chain needs at least a teacher and a student")
    hists = [train_classifier(models[0], x, y, cfg, device, eval_data)] if train_first else []
    for prev, nxt in zip(models[:-1], models[1:]):
        hists.append(run(KDObjective(nxt, prev, temperature, hard_weight), x, y, cfg, device, eval_data,
                         desc="takd"))
    return hists


def eskd_teacher(make_model: Callable[[], nn.Module], snapshots: dict[int, dict[str, Tensor]],
                 epoch: int) -> nn.Module:
    """Early-stopped KD: a fresh teacher loaded with the snapshot taken after `epoch`."""
    if epoch not in snapshots:
        raise KeyError(f"no snapshot for epoch {epoch}; have {sorted(snapshots)}")
    model = make_model()
    model.load_state_dict(snapshots[epoch])
    return model


def pseudo_labels(teacher: nn.Module, x: Tensor, device: torch.device, temperature: float, soft: bool) -> Tensor:
    """Teacher targets on unlabelled x (teacher in eval mode, no noise): soft probs or one-hot. -> [N, K]."""
    logits = predict_logits(teacher, x, device)
    if soft:
        return torch.softmax(logits / temperature, dim=-1)
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()


@dataclass(frozen=True)
class NoisyStudentConfig:
    """Noisy Student: iterations, pseudo-label form and the student's input noise."""

    iterations: int = 2
    soft: bool = True
    temperature: float = 1.0
    max_shift: int = 2
    noise_std: float = 0.3


def noisy_student(teacher: nn.Module, make_student: Callable[[], nn.Module], x_labeled: Tensor, y_labeled: Tensor,
                  x_unlabeled: Tensor, ns: NoisyStudentConfig, cfg: RunConfig, device: torch.device,
                  eval_data: tuple[Tensor, Tensor] | None = None) -> list[tuple[nn.Module, History]]:
    """Iterate: teacher pseudo-labels x_unlabeled; a noised student (dropout model + input noise) learns the
    labelled data (one-hot) and pseudo-labelled data together; the student becomes the next teacher.

    The class count is the teacher's output width, not the labels' maximum (a labelled subset may lack classes).
    """
    results = []
    current = teacher
    for _ in range(ns.iterations):
        targets = pseudo_labels(current, x_unlabeled, device, ns.temperature, ns.soft).to(x_unlabeled.device)
        num_classes = targets.shape[-1]
        if int(y_labeled.max()) >= num_classes or int(y_labeled.min()) < 0:
            raise ValueError(f"labels must lie in [0, {num_classes}) (the teacher's outputs); "
                             f"got {int(y_labeled.min())}..{int(y_labeled.max())}")
        y_lab = torch.nn.functional.one_hot(y_labeled, num_classes).float().to(targets.device)
        student = make_student()
        objective = SoftLabelObjective(student, ns.max_shift, ns.noise_std)
        hist = run(objective, torch.cat([x_labeled, x_unlabeled]), torch.cat([y_lab, targets]), cfg, device,
                   eval_data, desc="noisy-student")
        results.append((student, hist))
        current = student
    return results
