"""Seed 004: heterogeneous teachers' hidden representations aligned in one latent space by an
autoencoder trained with reconstruction + triplet loss; the student then matches the shared code."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stpm.distill import losses
from stpm.distill.features import FeatureHooks
from stpm.distill.methods.offline import frozen
from stpm.distill.trainer import Objective


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class LatentAligner(nn.Module):
    """One encoder/decoder per teacher; codes are L2-normalised points of a shared latent space."""

    def __init__(self, feature_dims: tuple[int, ...], latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList([_mlp(d, hidden, latent_dim) for d in feature_dims])
        self.decoders = nn.ModuleList([_mlp(latent_dim, hidden, d) for d in feature_dims])

    def encode(self, k: int, feature: Tensor) -> Tensor:
        """[B, ...] -> [B, latent_dim], unit norm."""
        return F.normalize(self.encoders[k](feature), dim=-1)

    def decode(self, k: int, code: Tensor) -> Tensor:
        """[B, latent_dim] -> [B, D_k] (flattened feature)."""
        return self.decoders[k](code)


def different_label_negatives(labels: Tensor) -> Tensor:
    """For each i an index j with labels[j] != labels[i] (a random one; i+1 mod B if none differs). [B] -> [B]."""
    b = labels.shape[0]
    scores = torch.rand(b, b, device=labels.device)
    scores = scores.masked_fill(labels[:, None] == labels[None, :], -1.0)
    neg = scores.argmax(dim=1)
    none = scores.max(dim=1).values < 0
    return torch.where(none, (torch.arange(b, device=labels.device) + 1) % b, neg)


def aligner_loss(aligner: LatentAligner, features: list[Tensor], labels: Tensor, margin: float,
                 recon_weight: float) -> Tensor:
    """sum_k MSE(decode_k(encode_k(f_k)), f_k) * recon_weight + triplet over teacher pairs.

    Triplet (anchor z_k[i], positive z_l[i]: same image seen by another teacher, negative z_l[j]: an image of a
    different class). K features [B, ...], labels [B] -> [].
    """
    codes = [aligner.encode(k, f) for k, f in enumerate(features)]
    recon = sum(F.mse_loss(aligner.decode(k, c), f.flatten(1)) for k, (c, f) in enumerate(zip(codes, features)))
    neg = different_label_negatives(labels)
    trip = sum(losses.triplet_loss(codes[k], codes[l], codes[l][neg], margin)
               for k in range(len(codes)) for l in range(len(codes)) if k != l)
    return recon_weight * recon + trip


class _TeacherFeatures(nn.Module):
    """Frozen teachers with hooks; returns (logits list, features list)."""

    def __init__(self, teachers: list[nn.Module], layers: tuple[str, ...]) -> None:
        super().__init__()
        self.teachers = nn.ModuleList([frozen(t) for t in teachers])
        self.hooks = [FeatureHooks(t.model, (name,)) for t, name in zip(self.teachers, layers, strict=True)]

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        logits = [t(x) for t in self.teachers]
        return logits, [h.features()[0] for h in self.hooks]


class AlignerObjective(Objective):
    """Trains the aligner on frozen teachers' features (needs labels for the triplet negatives)."""

    def __init__(self, aligner: LatentAligner, teachers: list[nn.Module], teacher_layers: tuple[str, ...],
                 margin: float, recon_weight: float) -> None:
        super().__init__()
        self.student = aligner
        self.source = _TeacherFeatures(teachers, teacher_layers)
        self.margin, self.recon_weight = margin, recon_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _, feats = self.source(x)
        return aligner_loss(self.student, feats, y, self.margin, self.recon_weight)


class LatentKDObjective(Objective):
    """Averaged-soft-target KD + latent_weight * ||normalise(P s) - normalise(mean_k encode_k(t_k))||^2.

    P is a learned linear projection of the student's hidden layer; the aligner is frozen.
    """

    def __init__(self, student: nn.Module, student_layer: str, student_dim: int, teachers: list[nn.Module],
                 teacher_layers: tuple[str, ...], aligner: LatentAligner, latent_dim: int, temperature: float,
                 hard_weight: float, latent_weight: float) -> None:
        super().__init__()
        self.student = student
        self.s_hooks = FeatureHooks(student, (student_layer,))
        self.source = _TeacherFeatures(teachers, teacher_layers)
        self.aligner = frozen(aligner)
        self.projection = nn.Linear(student_dim, latent_dim)
        self.temperature, self.hard_weight, self.latent_weight = temperature, hard_weight, latent_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        t_logits, t_feats = self.source(x)
        with torch.no_grad():
            codes = [self.aligner.model.encode(k, f) for k, f in enumerate(t_feats)]
            target_code = F.normalize(torch.stack(codes).mean(0), dim=-1)
        z = self.student(x)
        s_code = F.normalize(self.projection(self.s_hooks.features()[0].flatten(1)), dim=-1)
        soft = losses.soft_cross_entropy(z, losses.average_teacher_probs(t_logits, self.temperature),
                                         self.temperature)
        kd = self.hard_weight * losses.hard_cross_entropy(z, y) + (1 - self.hard_weight) * soft
        return kd + self.latent_weight * (s_code - target_code).pow(2).sum(-1).mean()


class CachedAlignerObjective(Objective):
    """AlignerObjective on precomputed teacher features: x = the K features concatenated [B, sum D_k] (flattened),
    y = labels or pseudo-labels for the triplet negatives. Same loss, no teacher forward per batch."""

    def __init__(self, aligner: LatentAligner, feature_dims: tuple[int, ...], margin: float,
                 recon_weight: float) -> None:
        super().__init__()
        self.student = aligner
        self.dims, self.margin, self.recon_weight = tuple(feature_dims), margin, recon_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return aligner_loss(self.student, list(torch.split(x, self.dims, dim=1)), y, self.margin, self.recon_weight)


@torch.no_grad()
def shared_codes(aligner: LatentAligner, features: list[Tensor]) -> Tensor:
    """normalise(mean_k encode_k(f_k)): the teachers' common latent code of each image. K x [N, ...] -> [N, latent]."""
    was = aligner.training
    aligner.eval()
    codes = torch.stack([aligner.encode(k, f) for k, f in enumerate(features)]).mean(0)
    aligner.train(was)
    return F.normalize(codes, dim=-1)


class CachedLatentKDObjective(Objective):
    """Soft targets + latent alignment from precomputed targets: y = [target probs (K) | latent code (L)].

    T^2 * CE(p, q^{s,T}) + latent_weight * ||normalise(P h_student) - code||^2, P a learned projection of the
    student's layer. For teachers with disjoint label sets p is the merged target (losses.merge_disjoint_probs).
    """

    def __init__(self, student: nn.Module, student_layer: str, student_dim: int, num_classes: int, latent_dim: int,
                 temperature: float, latent_weight: float) -> None:
        super().__init__()
        self.student = student
        self.s_hooks = FeatureHooks(student, (student_layer,))
        self.projection = nn.Linear(student_dim, latent_dim)
        self.num_classes, self.temperature, self.latent_weight = num_classes, temperature, latent_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        probs, code = y[:, :self.num_classes], y[:, self.num_classes:]
        z = self.student(x)
        s_code = F.normalize(self.projection(self.s_hooks.features()[0].flatten(1)), dim=-1)
        soft = losses.soft_cross_entropy(z, probs, self.temperature)
        return soft + self.latent_weight * (s_code - code).pow(2).sum(-1).mean()
