"""Relational / embedding objectives through forward hooks: SP, CC, RKD, PKT, CRD.

Each is ce_weight * CE(y) + weight * (its distillation loss). SP compares B x B similarities of any layers;
CC, RKD, PKT and CRD use one embedding per model (the output of an embedding layer, global-average-pooled
when it is a map; see models.default_embedding_layer). Default weights follow RepDistiller's CIFAR recipes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stpm.distill import feature_losses as FL
from stpm.distill import losses
from stpm.distill.methods.feature_kd import _FeatureObjective, probe_shapes


def _embedding_width(model: nn.Module, layer: str, example: Tensor) -> int:
    (shape,) = probe_shapes(model, (layer,), example)
    return int(shape[1]) if len(shape) == 4 else int(torch.Size(shape[1:]).numel())


class Embed(nn.Module):
    """Linear projection to a common width, then L2 normalisation (CC and CRD's embedding heads)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, e: Tensor) -> Tensor:
        return F.normalize(self.linear(e), dim=1)


class SPObjective(_FeatureObjective):
    """SP (Tung & Mori, ICCV 2019): CE + weight * sum over layer pairs of the similarity-preserving loss
    (RepDistiller's weight: 3000)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], weight: float, ce_weight: float = 1.0) -> None:
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError("SP needs the same non-zero number of student and teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.weight, self.ce_weight = weight, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s_feats, t_feats = self._run(x)
        sp = sum(FL.similarity_preserving_loss(s, t) for s, t in zip(s_feats, t_feats))
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * sp


class _EmbeddingObjective(_FeatureObjective):
    """One embedding layer per model; `embeddings(x)` -> (logits, student [B, Ds], teacher [B, Dt])."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str) -> None:
        super().__init__(student, teacher, (student_layer,), (teacher_layer,))

    def embeddings(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, (s,), (t,) = self._run(x)
        return z, FL.as_embedding(s), FL.as_embedding(t)


class CCObjective(_EmbeddingObjective):
    """CC (Peng et al., ICCV 2019): both embeddings are projected to embed_dim and L2-normalised; CE + weight *
    MSE between their Gaussian-kernel correlation matrices (Taylor order 2, gamma 0.4)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 example: Tensor, weight: float, ce_weight: float = 1.0, embed_dim: int = 128,
                 gamma: float = 0.4, order: int = 2) -> None:
        super().__init__(student, teacher, student_layer, teacher_layer)
        self.embed_s = Embed(_embedding_width(student, student_layer, example), embed_dim)
        self.embed_t = Embed(_embedding_width(self.teacher.model, teacher_layer, example), embed_dim)
        self.weight, self.ce_weight, self.gamma, self.order = weight, ce_weight, gamma, order

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s, t = self.embeddings(x)
        cc = FL.correlation_congruence_loss(self.embed_s(s), self.embed_t(t), self.gamma, self.order)
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * cc


class RKDObjective(_EmbeddingObjective):
    """RKD (Park et al., CVPR 2019): CE + weight * (25 * distance + 50 * angle loss) on the raw embeddings."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 weight: float, ce_weight: float = 1.0, distance_weight: float = 25.0,
                 angle_weight: float = 50.0) -> None:
        super().__init__(student, teacher, student_layer, teacher_layer)
        self.weight, self.ce_weight = weight, ce_weight
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s, t = self.embeddings(x)
        rkd = FL.rkd_loss(s, t, self.distance_weight, self.angle_weight)
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * rkd


class PKTObjective(_EmbeddingObjective):
    """PKT (Passalis & Tefas, ECCV 2018): CE + weight * KL between cosine-similarity distributions
    (RepDistiller's weight: 30000)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 weight: float, ce_weight: float = 1.0) -> None:
        super().__init__(student, teacher, student_layer, teacher_layer)
        self.weight, self.ce_weight = weight, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s, t = self.embeddings(x)
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * FL.pkt_loss(s, t)


class CRDObjective(_EmbeddingObjective):
    """CRD (Tian et al., ICLR 2020) in InfoNCE form: embeddings projected to embed_dim; each direction
    (student anchor vs teacher embeddings, teacher anchor vs student embeddings) contrasts the same image
    against the rest of the batch and a FIFO bank of `bank_size` earlier embeddings (detached).

    The paper's memory bank is indexed by dataset position and scored with NCE; a FIFO bank needs no indices,
    so it works with any loader. CE + weight * crd_loss (RepDistiller's weight: 0.8, temperature 0.07).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 example: Tensor, weight: float, ce_weight: float = 1.0, embed_dim: int = 128,
                 bank_size: int = 4096, temperature: float = 0.07) -> None:
        super().__init__(student, teacher, student_layer, teacher_layer)
        self.embed_s = Embed(_embedding_width(student, student_layer, example), embed_dim)
        self.embed_t = Embed(_embedding_width(self.teacher.model, teacher_layer, example), embed_dim)
        self.register_buffer("student_bank", torch.zeros(bank_size, embed_dim))
        self.register_buffer("teacher_bank", torch.zeros(bank_size, embed_dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))
        self.weight, self.ce_weight, self.temperature = weight, ce_weight, temperature

    @torch.no_grad()
    def _enqueue(self, s: Tensor, t: Tensor) -> None:
        k = self.student_bank.shape[0]
        n = min(len(s), k)
        idx = (self.cursor + torch.arange(n, device=s.device)) % k
        self.student_bank[idx] = s[:n].detach().to(self.student_bank.dtype)
        self.teacher_bank[idx] = t[:n].detach().to(self.teacher_bank.dtype)
        self.cursor.copy_((self.cursor + n) % k)
        self.filled.copy_(torch.clamp(self.filled + n, max=k))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s, t = self.embeddings(x)
        e_s, e_t = self.embed_s(s), self.embed_t(t)
        n = int(self.filled)
        crd = FL.crd_loss(e_s, e_t, self.student_bank[:n], self.teacher_bank[:n], self.temperature)
        if self.training:
            self._enqueue(e_s, e_t)
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * crd
