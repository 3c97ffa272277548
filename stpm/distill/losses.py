"""Pure distillation losses (seed 002 notation).

z^s, z^t: student / teacher logits [B, N]; T: temperature; q^{.,T} = softmax(z / T).
Every function is pure: tensors in, a scalar (or documented tensor) out, batch-mean reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -1


def at_least_float32(x: Tensor) -> Tensor:
    """float16/bfloat16 (an autocast forward's logits) -> float32; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def softmax_t(logits: Tensor, temperature: float) -> Tensor:
    """Softened softmax q_i = exp(z_i/T) / sum_j exp(z_j/T). [B, N] -> [B, N]."""
    return F.softmax(logits / temperature, dim=-1)


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's soft term as KL: T^2 * KL(q^{t,T} || q^{s,T}), mean over the batch.

    [B, N], [B, N] -> []. Zero when student == teacher at any T. Differs from the cross-entropy
    form only by the teacher entropy, a constant in z^s, so the gradients are identical:
    dL/dz^s_i = T^2 * (1/T) * (q^{s,T}_i - q^{t,T}_i) / B.
    """
    log_q_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_q_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=-1)
    return temperature**2 * kl.mean()


def soft_target_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Seed 002's L_S = -T^2 * sum_i q^{t,T}_i log q^{s,T}_i, mean over the batch. [B, N], [B, N] -> []."""
    log_q_s = F.log_softmax(student_logits / temperature, dim=-1)
    q_t = softmax_t(teacher_logits, temperature)
    return -temperature**2 * (q_t * log_q_s).sum(dim=-1).mean()


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * H(p, q^{s,T}) for an arbitrary target distribution p. [B, N], [B, N] -> []."""
    log_q_s = F.log_softmax(student_logits / temperature, dim=-1)
    return -temperature**2 * (target_probs * log_q_s).sum(dim=-1).mean()


def hard_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """CE(softmax(z^s), y) over labelled rows; rows with y == -1 are ignored; 0 if none. [B, N], [B] -> []."""
    if not bool((labels != IGNORE_INDEX).any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(at_least_float32(student_logits), labels, ignore_index=IGNORE_INDEX)


def hinton_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, hard_weight: float
) -> Tensor:
    """L = lambda * CE(q^{s,1}, y) + (1 - lambda) * T^2 * KL(q^{t,T} || q^{s,T}). [B, N], [B, N], [B] -> [].

    lambda = hard_weight; unlabelled rows (y == -1) contribute only the soft term. Computed in at least float32
    (the logits of an autocast forward may be float16/bfloat16).
    """
    student_logits, teacher_logits = at_least_float32(student_logits), at_least_float32(teacher_logits)
    hard = hard_cross_entropy(student_logits, labels)
    soft = soft_target_kl(student_logits, teacher_logits, temperature)
    return hard_weight * hard + (1.0 - hard_weight) * soft


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Logit matching 1/2 * sum_i (z^s_i - z^t_i)^2 / N, mean over the batch. [B, N], [B, N] -> [].

    Its gradient (z^s_i - z^t_i) / (N B) is the large-T limit of soft_target_kl for zero-mean logits.
    """
    return 0.5 * (student_logits - teacher_logits).pow(2).mean()


def fitnet_hint_loss(regressed_student: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets hint: 1/2 * ||r(s) - t||^2 averaged over all elements. [B, ...], same shape -> []."""
    return 0.5 * (regressed_student - teacher_feature).pow(2).mean()


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis spatial attention: normalise(mean_c |f|^p) flattened. [B, C, H, W] -> [B, H*W]."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """AT: mean over batch and positions of (a_s - a_t)^2. [B, Cs, H, W], [B, Ct, H', W'] -> [].

    The student map is resized to the teacher's spatial size when they differ.
    """
    if student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        student_feature = F.interpolate(student_feature, size=teacher_feature.shape[-2:], mode="bilinear",
                                        align_corners=False)
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Flow of solution procedure G_ij = sum_hw F1_i F2_j / (h w). [B, C1, H, W], [B, C2, h, w] -> [B, C1, C2].

    `first` is average-pooled to the spatial size of `second` when they differ.
    """
    if first.shape[-2:] != second.shape[-2:]:
        first = F.adaptive_avg_pool2d(first, second.shape[-2:])
    b, c1 = first.shape[:2]
    c2 = second.shape[1]
    hw = second.shape[-1] * second.shape[-2]
    return torch.bmm(first.reshape(b, c1, hw), second.reshape(b, c2, hw).transpose(1, 2)) / hw


def fsp_loss(student_pairs: list[tuple[Tensor, Tensor]], teacher_pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Mean over pairs of the mean squared difference of FSP matrices. Pair shapes as fsp_matrix -> []."""
    if len(student_pairs) != len(teacher_pairs) or not student_pairs:
        raise ValueError("fsp_loss needs the same non-zero number of student and teacher pairs")
    terms = []
    for (s1, s2), (t1, t2) in zip(student_pairs, teacher_pairs):
        gs, gt = fsp_matrix(s1, s2), fsp_matrix(t1, t2)
        if gs.shape != gt.shape:
            raise ValueError(f"FSP matrices differ in shape: student {tuple(gs.shape)} teacher {tuple(gt.shape)}")
        terms.append((gs - gt).pow(2).mean())
    return torch.stack(terms).mean()


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float, beta: float
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, both times T^2. [B, N], [B, N], [B] -> [].

    TCKD: KL between binary (target, non-target) distributions; NCKD: KL among the non-target classes.
    Computed in float32 whatever the input dtype (fp16 autocast on CUDA); the target class is removed from
    the non-target softmax by masking, never by subtracting a large constant that overflows in half precision.
    """
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    target = F.one_hot(labels, z_s.shape[-1]).bool()
    q_s, q_t = F.softmax(z_s, dim=-1), F.softmax(z_t, dim=-1)
    zero = q_s.new_zeros(())
    b_s = torch.stack([torch.where(target, q_s, zero).sum(-1), torch.where(target, zero, q_s).sum(-1)], -1)
    b_t = torch.stack([torch.where(target, q_t, zero).sum(-1), torch.where(target, zero, q_t).sum(-1)], -1)
    b_s, b_t = b_s.clamp_min(1e-12), b_t.clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean()
    log_nt_s = F.log_softmax(z_s.masked_fill(target, float("-inf")), dim=-1)
    log_nt_t = F.log_softmax(z_t.masked_fill(target, float("-inf")), dim=-1)
    nckd = torch.where(target, zero, log_nt_t.exp() * (log_nt_t - log_nt_s)).sum(-1).mean()
    return temperature**2 * (alpha * tckd + beta * nckd)


def mutual_loss(logits: list[Tensor], labels: Tensor, temperature: float) -> Tensor:
    """Deep mutual learning: sum_k [CE(z_k, y) + T^2 KL(mean_{j!=k} q_j || q_k)], peers' targets detached.

    K tensors [B, N], [B] -> []. Needs K >= 2.
    """
    if len(logits) < 2:
        raise ValueError("mutual learning needs at least two peers")
    total = logits[0].sum() * 0.0
    for k, z_k in enumerate(logits):
        others = torch.stack([softmax_t(z.detach(), temperature) for j, z in enumerate(logits) if j != k]).mean(0)
        total = total + hard_cross_entropy(z_k, labels) + soft_cross_entropy(z_k, others, temperature) \
            - temperature**2 * _entropy(others).mean()
    return total


def _entropy(p: Tensor) -> Tensor:
    """Entropy along the last axis. [B, N] -> [B]."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def average_teacher_probs(teacher_logits: list[Tensor], temperature: float) -> Tensor:
    """Multi-teacher soft target: mean_k softmax(z^{t_k} / T). K x [B, N] -> [B, N]."""
    return torch.stack([softmax_t(z, temperature) for z in teacher_logits]).mean(0)


def merge_disjoint_probs(
    teacher_logits: list[Tensor], class_indices: list[list[int]], num_classes: int, temperature: float,
    weighting: str = "confidence",
) -> Tensor:
    """Merge teachers with disjoint label sets into one distribution over the union of classes.

    Teacher k knows the global classes class_indices[k] (its output j is global class class_indices[k][j]).
    Each teacher's softened distribution is placed at its global indices and weighted by the teacher's
    confidence (its max probability at T=1), normalised over teachers:
    p[:, class_indices[k][j]] = w_k * softmax(z^{t_k}/T)[:, j], w_k = c_k / sum_l c_l.
    weighting="energy": w_k = softmax_k(logsumexp(z^{t_k}/T)), which equals a softmax over the teachers'
    concatenated logits. K x [B, N_k] -> [B, num_classes]; rows sum to one.
    """
    flat = [c for idx in class_indices for c in idx]
    if len(set(flat)) != len(flat):
        raise ValueError("class index sets must be disjoint")
    if any(c < 0 or c >= num_classes for c in flat):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    for z, idx in zip(teacher_logits, class_indices, strict=True):
        if z.shape[-1] != len(idx):
            raise ValueError(f"teacher has {z.shape[-1]} outputs but {len(idx)} class indices")
    if weighting == "confidence":
        conf = torch.stack([F.softmax(z, dim=-1).max(dim=-1).values for z in teacher_logits], dim=-1)  # [B, K]
        weights = conf / conf.sum(-1, keepdim=True)
    elif weighting == "energy":
        weights = F.softmax(torch.stack([torch.logsumexp(z / temperature, -1) for z in teacher_logits], -1), -1)
    else:
        raise ValueError(f"unknown weighting {weighting!r}: confidence | energy")
    out = teacher_logits[0].new_zeros(teacher_logits[0].shape[0], num_classes)
    for k, (z, idx) in enumerate(zip(teacher_logits, class_indices)):
        index = torch.as_tensor(idx, device=z.device, dtype=torch.long)
        out[:, index] = weights[:, k : k + 1] * softmax_t(z, temperature)
    return out


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Seed 004: mean of max(0, m + ||a - p||^2 - ||a - n||^2). [B, D] x 3 -> []."""
    d_pos = (anchor - positive).pow(2).sum(-1)
    d_neg = (anchor - negative).pow(2).sum(-1)
    return F.relu(margin + d_pos - d_neg).mean()
