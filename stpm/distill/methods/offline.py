"""Logit-based objectives: plain CE, Hinton KD (offline and semi-supervised), logit matching, DKD,
multi-teacher averaging, disjoint-label merge, soft/pseudo-label training (Noisy Student)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from stpm.distill import losses
from stpm.distill.trainer import FrozenTeacher, Objective


def frozen(model: nn.Module) -> FrozenTeacher:
    """The single place a teacher is frozen (idempotent)."""
    return model if isinstance(model, FrozenTeacher) else FrozenTeacher(model)


class CrossEntropyObjective(Objective):
    """No distillation: CE on hard labels (NOKD baseline; also trains teachers)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return losses.hard_cross_entropy(self.student(x), y)


class KDObjective(Objective):
    """Hinton KD: lambda * CE(y) + (1 - lambda) * T^2 KL(teacher^T || student^T).

    Rows labelled -1 (unlabelled) get only the soft term: semi-supervised KD on unlabelled data.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, hard_weight: float) -> None:
        super().__init__()
        self.student, self.teacher = student, frozen(teacher)
        self.temperature, self.hard_weight = temperature, hard_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return losses.hinton_loss(self.student(x), self.teacher(x), y, self.temperature, self.hard_weight)


class LogitMatchingObjective(Objective):
    """lambda * CE(y) + (1 - lambda) * logit MSE (the large-T limit of KD)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, hard_weight: float) -> None:
        super().__init__()
        self.student, self.teacher, self.hard_weight = student, frozen(teacher), hard_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.student(x)
        return self.hard_weight * losses.hard_cross_entropy(z, y) + \
            (1 - self.hard_weight) * losses.logit_mse(z, self.teacher(x))


class DKDObjective(Objective):
    """CE(y) + DKD(alpha * TCKD + beta * NCKD); needs labels."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, alpha: float,
                 beta: float, ce_weight: float) -> None:
        super().__init__()
        self.student, self.teacher = student, frozen(teacher)
        self.temperature, self.alpha, self.beta, self.ce_weight = temperature, alpha, beta, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.student(x)
        return self.ce_weight * losses.hard_cross_entropy(z, y) + \
            losses.dkd_loss(z, self.teacher(x), y, self.temperature, self.alpha, self.beta)


class MultiTeacherKD(Objective):
    """Averaged soft targets of several teachers over the same classes (+ optional hard CE)."""

    def __init__(self, student: nn.Module, teachers: list[nn.Module], temperature: float,
                 hard_weight: float) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList([frozen(t) for t in teachers])
        self.temperature, self.hard_weight = temperature, hard_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.student(x)
        target = losses.average_teacher_probs([t(x) for t in self.teachers], self.temperature)
        soft = losses.soft_cross_entropy(z, target, self.temperature)
        return self.hard_weight * losses.hard_cross_entropy(z, y) + (1 - self.hard_weight) * soft


class DisjointMergeKD(Objective):
    """Teachers with disjoint label sets -> one student over the union, from unlabelled images only.

    Labels passed to forward are ignored. Target: losses.merge_disjoint_probs.
    """

    def __init__(self, student: nn.Module, teachers: list[nn.Module], class_indices: list[list[int]],
                 num_classes: int, temperature: float, weighting: str = "confidence") -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList([frozen(t) for t in teachers])
        self.class_indices = [list(c) for c in class_indices]
        self.num_classes, self.temperature, self.weighting = num_classes, temperature, weighting

    def merged_target(self, x: Tensor) -> Tensor:
        return losses.merge_disjoint_probs([t(x) for t in self.teachers], self.class_indices,
                                           self.num_classes, self.temperature, self.weighting)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return losses.soft_cross_entropy(self.student(x), self.merged_target(x), self.temperature)


def noise_inputs(x: Tensor, max_shift: int, noise_std: float) -> Tensor:
    """Input noise for Noisy Student: a random translation of up to max_shift pixels plus Gaussian noise.

    [B, C, H, W] -> same shape. One shift per batch (cheap), fresh Gaussian noise per element.
    """
    if max_shift > 0:
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    return x


class SoftLabelObjective(Objective):
    """T^2 * CE against per-example target distributions y [B, K] (pseudo-labels, or precomputed merged teacher
    targets) at the student temperature T, with optional input noise."""

    def __init__(self, student: nn.Module, max_shift: int, noise_std: float, temperature: float = 1.0) -> None:
        super().__init__()
        self.student, self.max_shift, self.noise_std = student, max_shift, noise_std
        self.temperature = temperature

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.training:
            x = noise_inputs(x, self.max_shift, self.noise_std)
        return losses.soft_cross_entropy(self.student(x), y, self.temperature)


class CachedKDObjective(Objective):
    """Hinton KD with the teacher's logits precomputed once (frozen teacher, eval mode, no augmentation).

    y is [B, 1 + K]: column 0 the label (-1 = unlabelled), columns 1: the teacher logits. Same loss as
    KDObjective; cheaper when many students learn from one teacher (temperature sweeps).
    """

    def __init__(self, student: nn.Module, temperature: float, hard_weight: float) -> None:
        super().__init__()
        self.student, self.temperature, self.hard_weight = student, temperature, hard_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        labels, teacher_logits = y[:, 0].long(), y[:, 1:]
        return losses.hinton_loss(self.student(x), teacher_logits, labels, self.temperature, self.hard_weight)


def pack_labels_and_logits(labels: Tensor, teacher_logits: Tensor) -> Tensor:
    """[N], [N, K] -> [N, 1 + K] targets for CachedKDObjective."""
    return torch.cat([labels.float()[:, None], teacher_logits.float()], dim=1)
