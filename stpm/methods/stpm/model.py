"""The STPM module: a frozen ImageNet teacher and a trainable student, both returning feature pyramids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path

import torch
from torch import nn

from stpm.methods import backbone_specs, backbones
from stpm.methods.stpm.spec import student_layers

if TYPE_CHECKING:  # method code gets its options as arguments: it never imports stpm.options
    from stpm.options import ModelOptions


class STPM(nn.Module):
    """Frozen teacher + student. Input: float images in [0, 1], [B, 3, H, W] (normalised inside).

    forward -> (teacher features, student features): two lists of [B, C_l, H_l, W_l], one per layer,
    student features already projected to the teacher's channels when the architectures differ.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        projections: nn.ModuleList | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.projections = projections
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> STPM:
        """The one place the teacher is frozen: it stays in eval mode whatever the caller asks."""
        super().train(mode)
        self.teacher.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.teacher(self.normalize(x))

    def student_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.student(self.normalize(x))
        if self.projections is not None:
            feats = [p(f) for p, f in zip(self.projections, feats)]
        return feats

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.teacher_features(x), self.student_features(x)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that training changes: the student and, if any, the projections."""
        sd = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        if self.projections is not None:
            sd.update({f"projections.{k}": v for k, v in self.projections.state_dict().items()})
        return sd


def build_stpm(
    cfg: ModelOptions, weights_dir: str | Path | None = None, seed: int | None = None
) -> tuple[STPM, str]:
    """Teacher with ImageNet weights (unless cfg.pretrained is False), random student; -> (model, source)."""
    t_layers = backbone_specs.resolve_layers(cfg.backbone, cfg.layers)
    s_layers = student_layers(cfg.backbone, cfg.student_backbone, t_layers)
    if seed is not None and not cfg.pretrained:  # a random teacher (tests, speed benchmarks): seeded, and not
        torch.manual_seed(seed + 1)  # from the student's seed, or a same-backbone student would start as its copy
    teacher, source = backbones.build_teacher(cfg.backbone, t_layers, cfg.pretrained, cfg.weights, weights_dir)
    if seed is not None:
        torch.manual_seed(seed)
    s_name = cfg.student_backbone or cfg.backbone
    student = backbones.build_features(s_name, s_layers)
    projections = None
    if s_name != cfg.backbone:
        t_ch = backbone_specs.spec(cfg.backbone).layer_channels
        s_ch = backbone_specs.spec(s_name).layer_channels
        projections = nn.ModuleList(
            nn.Conv2d(s_ch[s], t_ch[t], kernel_size=1) for s, t in zip(s_layers, t_layers)
        )
    return STPM(teacher, student, projections, cfg.mean, cfg.std), source
