"""Invariants of the feature and relation losses (SP, CC, VID, RKD, PKT, NST, CRD, ReviewKD's HCL)."""
import math

import pytest
import torch
import torch.nn.functional as F

from stpm.distill import feature_losses as FL

EMBEDDING_LOSSES = {
    "sp": FL.similarity_preserving_loss,
    "cc": FL.correlation_congruence_loss,
    "rkd": FL.rkd_loss,
    "pkt": FL.pkt_loss,
}


def _emb(b=8, d=16, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _maps(b=4, c=6, h=8, seed=0):
    return torch.randn(b, c, h, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
def test_embedding_losses_are_zero_for_identical_and_positive_for_different(name):
    loss = EMBEDDING_LOSSES[name]
    e = _emb()
    assert abs(loss(e, e.clone()).item()) < 1e-10
    assert loss(_emb(seed=1), e).item() > 1e-4


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt"])
def test_relational_losses_compare_relations_not_widths_or_scale(name):
    """SP, RKD and PKT see only relations between images: a wider student holding the teacher's embedding
    (zero-padded) and scaled by 3 has zero loss."""
    loss = EMBEDDING_LOSSES[name]
    t = _emb()
    s = 3.0 * torch.cat([t, torch.zeros(8, 5, dtype=t.dtype)], dim=1)
    assert abs(loss(s, t).item()) < 1e-10


def test_rkd_is_invariant_to_rotation_and_translation():
    t = _emb()
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    s = t @ q + 2.5
    assert FL.rkd_distance_loss(s, t).item() < 1e-10
    assert FL.rkd_angle_loss(s, t).item() < 1e-10
    assert FL.rkd_distance_loss(_emb(seed=4), t).item() > 1e-3


def test_sp_works_on_feature_maps_of_different_channel_counts():
    assert FL.similarity_preserving_loss(_maps(c=3), _maps(c=7, seed=1)).item() > 0
    m = _maps()
    assert FL.similarity_preserving_loss(m, m).item() < 1e-12


def test_cc_taylor_expansion_approaches_the_gaussian_kernel():
    e = _emb()
    u = F.normalize(e, dim=1)
    gamma = 0.4
    exact = torch.exp(-gamma * torch.cdist(u, u).pow(2))
    assert (FL.correlation_matrix(e, gamma, order=12) - exact).abs().max().item() < 1e-8
    assert (FL.correlation_matrix(e, gamma, order=2) - exact).abs().max().item() < 0.05  # the paper's order


def test_vid_is_the_gaussian_negative_log_likelihood():
    t, mu = _maps(), _maps(seed=1)
    log_scale = torch.linspace(-1, 2, 6, dtype=torch.float64)
    var = F.softplus(log_scale) + 1e-5
    want = F.gaussian_nll_loss(mu, t, var.view(1, -1, 1, 1).expand_as(t), full=False, eps=1e-12)
    torch.testing.assert_close(FL.vid_loss(mu, t, log_scale), want)
    # a perfect mean has zero gradient; only the variance term remains
    m = t.clone().requires_grad_(True)
    FL.vid_loss(m, t, log_scale).backward()
    assert m.grad.abs().max().item() == 0.0


def test_nst_is_zero_for_identical_maps_and_invariant_to_channel_order():
    s = _maps(c=6)
    assert abs(FL.nst_loss(s, s).item()) < 1e-12
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert abs(FL.nst_loss(s[:, perm], s).item()) < 1e-12
    big = _maps(c=9, h=16, seed=2)  # different channel count and spatial size: pooled to 8x8
    assert FL.nst_loss(big, s).item() > 0


def test_info_nce_matches_cross_entropy_and_ignores_batch_order():
    a, p, n = _emb(seed=1), _emb(seed=2), _emb(b=20, seed=3)
    loss = FL.info_nce_loss(a, p, n, 0.1)
    an, pn, nn_ = F.normalize(a, dim=1), F.normalize(p, dim=1), F.normalize(n, dim=1)
    logits = torch.cat([(an * pn).sum(1, keepdim=True), an @ nn_.T], 1) / 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)))
    perm = torch.randperm(8)
    torch.testing.assert_close(FL.info_nce_loss(a[perm], p[perm], n, 0.1), loss)


def test_crd_is_small_when_student_and_teacher_agree_and_large_when_pairs_are_swapped():
    basis = torch.eye(16, dtype=torch.float64)
    e, bank = basis[:8], basis[8:11]  # the batch and the bank of earlier embeddings: all orthogonal
    agree = FL.crd_loss(e, e, bank, bank, temperature=0.07).item()
    swapped = FL.crd_loss(e, e.roll(1, 0), bank, bank, temperature=0.07).item()
    assert agree < 1e-4 < 10.0 < swapped
    # gradients reach both sides (the teacher's projection head learns through CRD)
    s, t = _emb(seed=5).requires_grad_(True), _emb(seed=6).requires_grad_(True)
    FL.crd_loss(s, t, bank.new_zeros(0, 16), bank.new_zeros(0, 16)).backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_hierarchical_context_loss_weights_pooled_levels():
    s, t = _maps(h=8), _maps(h=8, seed=1)
    assert FL.hierarchical_context_loss(t, t).item() == 0.0
    want = F.mse_loss(s, t)
    weights, total = [0.5, 0.25, 0.125], 1.0
    for level, w in zip((4, 2, 1), weights):
        want = want + w * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += w
    torch.testing.assert_close(FL.hierarchical_context_loss(s, t), want / total)
    # a 4x4 map skips the level-4 pooling (it would be the identity)
    s4, t4 = _maps(h=4), _maps(h=4, seed=1)
    want4 = (F.mse_loss(s4, t4) + 0.5 * F.mse_loss(F.adaptive_avg_pool2d(s4, 2), F.adaptive_avg_pool2d(t4, 2))
             + 0.25 * F.mse_loss(s4.mean((2, 3)), t4.mean((2, 3)))) / 1.75
    torch.testing.assert_close(FL.hierarchical_context_loss(s4, t4), want4)
    with pytest.raises(ValueError):
        FL.hierarchical_context_loss(s, _maps(c=3))


def test_as_embedding_pools_maps_and_flattens_vectors():
    m = _maps()
    torch.testing.assert_close(FL.as_embedding(m), m.mean((2, 3)))
    assert FL.as_embedding(torch.zeros(2, 3, 4)).shape == (2, 12)
    assert math.isclose(FL.as_embedding(torch.ones(1, 2, 3, 3)).sum().item(), 2.0)
