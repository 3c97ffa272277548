"""Invariants of the KD losses (seed 002's formulas)."""
import pytest
import torch

from stpm.distill import losses

TEMPS = [0.5, 1.0, 2.0, 4.0, 8.0, 20.0]


def _logits(b=6, n=10, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("t", TEMPS)
def test_soft_term_zero_when_student_equals_teacher(t):
    z = _logits()
    assert losses.soft_target_kl(z, z.clone(), t).abs().item() < 1e-12
    z_s = z.clone().requires_grad_(True)
    losses.soft_target_kl(z_s, z, t).backward()
    assert z_s.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("t", TEMPS)
def test_kl_and_cross_entropy_forms_have_equal_gradients_and_match_seed_formula(t):
    z_s, z_t = _logits(seed=1), _logits(seed=2)
    a = z_s.clone().requires_grad_(True)
    b = z_s.clone().requires_grad_(True)
    kl = losses.soft_target_kl(a, z_t, t)
    ce = losses.soft_target_cross_entropy(b, z_t, t)
    kl.backward()
    ce.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    # They differ by the teacher entropy (constant in z_s), so KL <= CE.
    assert kl.item() <= ce.item() + 1e-12
    # Seed 002: dL_S/dz_i = (1/T)(q_i - p_i) for H, times T^2 for L_S; mean over the batch divides by B.
    q_s, q_t = losses.softmax_t(z_s, t), losses.softmax_t(z_t, t)
    expected = t**2 * (1.0 / t) * (q_s - q_t) / z_s.shape[0]
    torch.testing.assert_close(a.grad, expected, rtol=1e-10, atol=1e-12)


def _grad_norm(t, scaled):
    z_s = _logits(scale=2.0, seed=3).requires_grad_(True)
    z_t = _logits(scale=2.0, seed=4)
    loss = losses.soft_target_kl(z_s, z_t, t)
    if not scaled:
        loss = loss / t**2
    loss.backward()
    return z_s.grad.norm().item()


def test_t_squared_keeps_gradient_magnitudes_comparable_across_temperatures():
    temps = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    scaled = [_grad_norm(t, True) for t in temps]
    unscaled = [_grad_norm(t, False) for t in temps]
    assert max(scaled) / min(scaled) < 5.0
    # Without the T^2 factor the soft gradients shrink roughly as 1/T^2.
    assert max(unscaled) / min(unscaled) > 100.0
    assert unscaled[-1] < unscaled[0] / 100.0


def test_large_temperature_approaches_logit_matching():
    n, t = 10, 1000.0
    z_s, z_t = _logits(n=n, seed=5), _logits(n=n, seed=6)
    z_s, z_t = z_s - z_s.mean(-1, keepdim=True), z_t - z_t.mean(-1, keepdim=True)  # zero-mean logits
    a = z_s.clone().requires_grad_(True)
    (losses.soft_target_kl(a, z_t, t) / t**2).backward()  # H without the T^2 factor
    b = z_s.shape[0]
    seed_formula = (z_s - z_t) / (n * t**2) / b  # dL/dz_i ~ (z_i - v_i) / (N T^2)
    scale = seed_formula.abs().max().item()
    # the Taylor remainder is O(1/T) relative to the gradient's scale
    torch.testing.assert_close(a.grad, seed_formula, rtol=0.0, atol=1e-2 * scale)
    m = z_s.clone().requires_grad_(True)
    losses.logit_mse(m, z_t).backward()
    torch.testing.assert_close(a.grad * t**2, m.grad, rtol=0.0, atol=1e-2 * m.grad.abs().max().item())
    # and at a small temperature the approximation is far off
    c = z_s.clone().requires_grad_(True)
    losses.soft_target_kl(c, z_t, 1.0).backward()
    assert (c.grad - m.grad).abs().max() > 0.1 * m.grad.abs().max()


def test_hinton_loss_combines_hard_and_soft_and_ignores_unlabelled_rows():
    z_s, z_t = _logits(seed=7), _logits(seed=8)
    y = torch.tensor([1, 2, -1, 3, -1, 0])
    lam, t = 0.3, 4.0
    got = losses.hinton_loss(z_s, z_t, y, t, lam)
    keep = y >= 0
    hard = torch.nn.functional.cross_entropy(z_s[keep], y[keep])
    want = lam * hard + (1 - lam) * losses.soft_target_kl(z_s, z_t, t)
    torch.testing.assert_close(got, want)
    all_unlabelled = torch.full((6,), -1)
    torch.testing.assert_close(losses.hinton_loss(z_s, z_t, all_unlabelled, t, lam),
                               (1 - lam) * losses.soft_target_kl(z_s, z_t, t))


def test_merge_disjoint_maps_class_indices():
    # teacher A knows global classes [3, 7]; teacher B knows [0, 9, 5]
    za = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    zb = torch.tensor([[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    idx = [[3, 7], [0, 9, 5]]
    p = losses.merge_disjoint_probs([za, zb], idx, num_classes=10, temperature=1.0)
    pa, pb = torch.softmax(za, -1), torch.softmax(zb, -1)
    ca, cb = pa.max(-1).values, pb.max(-1).values
    wa, wb = ca / (ca + cb), cb / (ca + cb)
    torch.testing.assert_close(p[:, 3], wa * pa[:, 0])
    torch.testing.assert_close(p[:, 7], wa * pa[:, 1])
    torch.testing.assert_close(p[:, 0], wb * pb[:, 0])
    torch.testing.assert_close(p[:, 9], wb * pb[:, 1])
    torch.testing.assert_close(p[:, 5], wb * pb[:, 2])
    for unknown in (1, 2, 4, 6, 8):
        assert (p[:, unknown] == 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    # the more confident teacher wins the argmax: row 1, B is sure of class 0
    assert p[1].argmax().item() == 0
    # energy weighting == a softmax over the concatenated logits, placed at the global indices
    pe = losses.merge_disjoint_probs([za, zb], idx, 10, 1.0, weighting="energy")
    cat = torch.softmax(torch.cat([za, zb], -1), -1)
    torch.testing.assert_close(pe[:, [3, 7, 0, 9, 5]], cat)
    with pytest.raises(ValueError):
        losses.merge_disjoint_probs([za, zb], [[3, 7], [7, 9, 5]], 10, 1.0)
    with pytest.raises(ValueError):
        losses.merge_disjoint_probs([za, zb], [[3], [0, 9, 5]], 10, 1.0)


def test_dkd_zero_for_identical_logits_and_positive_otherwise():
    z_s, z_t = _logits(seed=9), _logits(seed=10)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    assert losses.dkd_loss(z_t, z_t, y, 4.0, 1.0, 8.0).abs().item() < 1e-9
    assert losses.dkd_loss(z_s, z_t, y, 4.0, 1.0, 8.0).item() > 0


def test_feature_losses_zero_for_identical_features_and_shapes():
    f = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    g = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    assert losses.attention_transfer_loss(f, f).item() < 1e-12
    assert losses.attention_transfer_loss(f, g).item() > 0  # different spatial sizes are resized
    assert losses.fsp_matrix(f, g).shape == (2, 4, 3)
    assert losses.fsp_loss([(f, g)], [(f, g)]).item() == 0.0
    assert losses.fitnet_hint_loss(g, g).item() == 0.0


def test_triplet_loss_hinge():
    a = torch.zeros(1, 2)
    p = torch.tensor([[0.1, 0.0]])
    n_far = torch.tensor([[3.0, 0.0]])
    n_near = torch.tensor([[0.1, 0.0]])
    assert losses.triplet_loss(a, p, n_far, margin=1.0).item() == 0.0
    assert losses.triplet_loss(a, p, n_near, margin=1.0).item() == pytest.approx(1.0)
