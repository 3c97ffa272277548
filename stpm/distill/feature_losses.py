"""Pure feature- and relation-based distillation losses (the methods RepDistiller / mdistiller / torchdistill ship).

Shapes: B the batch, C channels, H x W positions, D an embedding width. Student and teacher may differ in
C (and D) wherever a docstring says so; every loss is a scalar, zero when the student reproduces the teacher.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def as_embedding(feature: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C] (global average pool); [B, ...] -> [B, prod(...)] otherwise."""
    if feature.ndim == 4:
        return feature.mean(dim=(2, 3))
    return feature.flatten(1)


def similarity_preserving_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """SP (Tung & Mori, ICCV 2019): ||norm_rows(S S^T) - norm_rows(T T^T)||_F^2 / B^2.

    [B, ...] and [B, ...] (any widths: only the B x B similarity matrices are compared) -> [].
    Invariant to scaling either feature by a positive constant.
    """
    b = student.shape[0]
    g_s = F.normalize(student.flatten(1) @ student.flatten(1).T, dim=1)
    g_t = F.normalize(teacher.flatten(1) @ teacher.flatten(1).T, dim=1)
    return (g_s - g_t).pow(2).sum() / (b * b)


def correlation_matrix(embedding: Tensor, gamma: float, order: int) -> Tensor:
    """CC's instance correlation: a Gaussian RBF kernel between L2-normalised embeddings, expanded to `order`.

    k(x, y) = exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma x.y) ~ sum_{p<=order} exp(-2 gamma)(2 gamma)^p/p! (x.y)^p
    for unit vectors. [B, D] -> [B, B].
    """
    e = F.normalize(embedding, dim=1)
    sim = e @ e.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p) for p in range(order + 1))


def correlation_congruence_loss(student: Tensor, teacher: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """CC (Peng et al., ICCV 2019): mean squared difference of the B x B correlation matrices.

    [B, Ds], [B, Dt] -> []. Usually the embeddings are first projected to a common width (CCObjective does).
    """
    return F.mse_loss(correlation_matrix(student, gamma, order), correlation_matrix(teacher, gamma, order))


def vid_loss(predicted_mean: Tensor, teacher: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """VID (Ahn et al., CVPR 2019): Gaussian negative log-likelihood of the teacher feature under the student's
    prediction, per-channel variance softplus(log_scale) + eps, without the constant 0.5 log(2 pi).

    [B, C, H, W] (or [B, C]), same shape, [C] -> []: mean of 0.5 * ((t - mu)^2 / var + log var).
    """
    var = F.softplus(log_scale) + eps
    shape = (1, -1) + (1,) * (teacher.ndim - 2)
    var = var.view(shape)
    return 0.5 * ((predicted_mean - teacher).pow(2) / var + var.log()).mean()


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between rows, [B, D] -> [B, B], zero diagonal, differentiable at zero distance."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-D (Park et al., CVPR 2019): Huber loss between pairwise distances, each divided by its mean
    off-diagonal distance. [B, Ds], [B, Dt] -> []. Invariant to rotations, translations and scale."""
    def normalised(e: Tensor) -> Tensor:
        d = _pairwise_distances(e)
        return d / d[d > 0].mean()

    with torch.no_grad():
        t_d = normalised(teacher)
    return F.smooth_l1_loss(normalised(student), t_d)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-A: Huber loss between the cosines of the angles formed by every triplet of embeddings.

    [B, Ds], [B, Dt] -> []. Invariant to rotations, translations and scale.
    """
    def angles(e: Tensor) -> Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [B, B, D] unit vectors e_j - e_i
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    with torch.no_grad():
        t_a = angles(teacher)
    return F.smooth_l1_loss(angles(student), t_a)


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """RKD with RepDistiller's weights: 25 * RKD-D + 50 * RKD-A. [B, Ds], [B, Dt] -> []."""
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT (Passalis & Tefas, ECCV 2018): KL between the conditional probability distributions built from cosine
    similarities, p_ij = (1 + cos_ij) / 2 / sum_j (1 + cos_ij) / 2, averaged over all B^2 entries as in RepDistiller.

    [B, Ds], [B, Dt] -> []. Invariant to scaling either embedding.
    """
    def conditional(e: Tensor) -> Tensor:
        e = F.normalize(e.flatten(1), dim=1)
        sim = (e @ e.T + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(student), conditional(teacher)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two [B, C, H, W] maps to the smaller's spatial size."""
    hs, ht = student.shape[-2:], teacher.shape[-2:]
    if hs == ht:
        return student, teacher
    if hs[0] * hs[1] > ht[0] * ht[1]:
        return F.adaptive_avg_pool2d(student, ht), teacher
    return student, F.adaptive_avg_pool2d(teacher, hs)


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """NST (Huang & Wang, 2017): squared MMD with the polynomial kernel k(a, b) = (a.b)^2 between the sets of
    channels, each channel's spatial map L2-normalised ("neuron selectivity" distributions).

    [B, Cs, H, W], [B, Ct, H', W'] (the larger map is average-pooled to the smaller) -> [].
    Invariant to permuting channels (it compares sets of channels).
    """
    student, teacher = _match_spatial(student, teacher)
    s = F.normalize(student.flatten(2), dim=2)  # [B, Cs, HW]
    t = F.normalize(teacher.flatten(2), dim=2)

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    return k(t, t).detach() + k(s, s) - 2 * k(s, t)


def info_nce_loss(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Contrastive loss of CRD's objective in its InfoNCE form: -log softmax over [positive, negatives] of
    cos(anchor, .) / temperature. [B, D], [B, D], [K, D] -> []. Rows are L2-normalised here."""
    a = F.normalize(anchor, dim=1)
    pos = (a * F.normalize(positive, dim=1)).sum(1, keepdim=True)  # [B, 1]
    neg = a @ F.normalize(negatives, dim=1).T  # [B, K]
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))


def crd_loss(student: Tensor, teacher: Tensor, student_bank: Tensor, teacher_bank: Tensor,
             temperature: float = 0.07) -> Tensor:
    """CRD (Tian et al., ICLR 2020), both directions: the student embedding must pick its own image's teacher
    embedding among teacher negatives, and the teacher embedding its own image's student embedding.

    Negatives: the other rows of the batch plus a bank of earlier embeddings ([K, D], detached).
    [B, D], [B, D] (already projected to a common D), [K, D], [K, D] -> []. Gradients reach both inputs (the
    teacher network is frozen elsewhere; its projection head learns here).
    """
    b = student.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=student.device)

    def direction(anchor: Tensor, other: Tensor, bank: Tensor) -> Tensor:
        a = F.normalize(anchor, dim=1)
        o = F.normalize(other, dim=1)
        in_batch = (a @ o.T)[off].view(b, b - 1)  # other images of the batch
        pos = (a * o).sum(1, keepdim=True)
        parts = [pos, in_batch] + ([a @ F.normalize(bank, dim=1).T] if len(bank) else [])
        logits = torch.cat(parts, dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=a.device))

    return direction(student, teacher, teacher_bank.detach()) + direction(teacher, student, student_bank.detach())


def hierarchical_context_loss(student: Tensor, teacher: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """ReviewKD's HCL: MSE at full resolution plus MSE after adaptive average pooling to each level x level
    (levels not smaller than the map are skipped), weights 1, 1/2, 1/4, ..., normalised by their sum.

    [B, C, H, W], same shape -> [].
    """
    if student.shape != teacher.shape:
        raise ValueError(f"HCL needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= student.shape[-1]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total
