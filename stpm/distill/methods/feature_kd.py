"""Feature-based objectives through forward hooks: FitNets hints, attention transfer, FSP matrices."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stpm.distill import losses
from stpm.distill.features import FeatureHooks
from stpm.distill.methods.offline import frozen
from stpm.distill.trainer import Objective


@torch.no_grad()
def probe_shapes(model: nn.Module, names: tuple[str, ...], example: Tensor) -> list[torch.Size]:
    """Output shapes of the named layers for one example batch (model left in its previous mode)."""
    hooks = FeatureHooks(model, names)
    was = model.training
    model.eval()
    model(example)
    model.train(was)
    shapes = [f.shape for f in hooks.features()]
    hooks.close()
    return shapes


class HintRegressor(nn.Module):
    """Maps a student feature to the teacher feature's shape: 1x1 conv (+ resize) or a linear layer."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        self.size = tuple(teacher_shape[2:]) if len(teacher_shape) == 4 else None
        if len(student_shape) == 4 and len(teacher_shape) == 4:
            self.map: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        elif len(student_shape) == 2 and len(teacher_shape) == 2:
            self.map = nn.Linear(student_shape[1], teacher_shape[1])
        else:
            raise ValueError(f"cannot regress {tuple(student_shape)} onto {tuple(teacher_shape)}")

    def forward(self, s: Tensor) -> Tensor:
        out = self.map(s)
        if self.size is not None and out.shape[-2:] != self.size:
            out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return out


class _FeatureObjective(Objective):
    """Shared plumbing: student + frozen teacher with hooks on the given layers."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...]) -> None:
        super().__init__()
        self.student, self.teacher = student, frozen(teacher)
        self.s_hooks = FeatureHooks(student, student_layers)
        self.t_hooks = FeatureHooks(self.teacher.model, teacher_layers)

    def _run(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        self.teacher(x)
        t_feats = self.t_hooks.features()
        z = self.student(x)
        return z, self.s_hooks.features(), t_feats


class FitNetObjective(_FeatureObjective):
    """CE(y) + hint_weight * 1/2||r(student layer) - teacher layer||^2 with a learned regressor r.

    Single stage (hint and CE together) rather than FitNets' two stages.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 example: Tensor, hint_weight: float) -> None:
        super().__init__(student, teacher, (student_layer,), (teacher_layer,))
        (s_shape,) = probe_shapes(student, (student_layer,), example)
        (t_shape,) = probe_shapes(self.teacher.model, (teacher_layer,), example)
        self.regressor = HintRegressor(s_shape, t_shape)
        self.hint_weight = hint_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, (s,), (t,) = self._run(x)
        return losses.hard_cross_entropy(z, y) + self.hint_weight * losses.fitnet_hint_loss(self.regressor(s), t)


class AttentionTransferObjective(_FeatureObjective):
    """CE(y) + beta * sum over layer pairs of attention_transfer_loss (Zagoruyko & Komodakis, beta=1e3)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], beta: float) -> None:
        if len(student_layers) != len(teacher_layers):
            raise ValueError("AT needs as many student as teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.beta = beta

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s_feats, t_feats = self._run(x)
        at = sum(losses.attention_transfer_loss(s, t) for s, t in zip(s_feats, t_feats))
        return losses.hard_cross_entropy(z, y) + self.beta * at


class FSPObjective(_FeatureObjective):
    """CE(y) + weight * FSP loss between consecutive layer pairs (layers[i], layers[i+1])."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], weight: float) -> None:
        if len(student_layers) != len(teacher_layers) or len(student_layers) < 2:
            raise ValueError("FSP needs the same number (>= 2) of student and teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.weight = weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s, t = self._run(x)
        s_pairs = list(zip(s[:-1], s[1:]))
        t_pairs = list(zip(t[:-1], t[1:]))
        return losses.hard_cross_entropy(z, y) + self.weight * losses.fsp_loss(s_pairs, t_pairs)
