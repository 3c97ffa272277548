import pytest
import torch

from stpm.methods.maps import gaussian_blur, tile_score
from stpm.methods.stpm.loss import anomaly_map, layer_distance, stpm_loss


def feats(seed: int, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 8, 16, 16, generator=g), torch.randn(b, 16, 8, 8, generator=g)]


def test_identical_teacher_and_student_give_zero_loss_and_zero_map():
    t = feats(0)
    assert stpm_loss(t, [x.clone() for x in t]).item() == pytest.approx(0.0, abs=1e-7)
    for combine in ("product", "sum"):
        m = anomaly_map(t, [x.clone() for x in t], (32, 32), combine)
        assert m.shape == (2, 32, 32)
        assert m.abs().max().item() < 1e-6


def test_distance_is_scale_invariant_and_bounded():
    t, s = feats(0)[0], feats(1)[0]
    d = layer_distance(t, s)
    assert torch.allclose(d, layer_distance(3.0 * t, 0.5 * s), atol=1e-6)
    assert d.min() >= 0 and d.max() <= 2.0 + 1e-6  # 0.5 * ||u - v||^2 for unit vectors


def test_loss_is_sum_over_layers_of_mean_distance():
    t, s = feats(0), feats(1)
    expected = sum(layer_distance(a, b).mean() for a, b in zip(t, s))
    assert stpm_loss(t, s).item() == pytest.approx(expected.item(), rel=1e-6)


def test_product_and_sum_fuse_layers():
    t, s = feats(0), feats(1)
    d = [torch.nn.functional.interpolate(layer_distance(a, b)[:, None], size=(32, 32), mode="bilinear",
                                         align_corners=False)[:, 0] for a, b in zip(t, s)]
    assert torch.allclose(anomaly_map(t, s, (32, 32), "product"), d[0] * d[1], atol=1e-6)
    assert torch.allclose(anomaly_map(t, s, (32, 32), "sum"), d[0] + d[1], atol=1e-6)
    with pytest.raises(ValueError):
        anomaly_map(t, s, (32, 32), "max")


def test_gaussian_blur_keeps_constants_and_mass_and_spreads_a_peak():
    const = torch.full((1, 20, 20), 3.0)
    assert torch.allclose(gaussian_blur(const, 2.0), const, atol=1e-5)
    peak = torch.zeros(1, 31, 31)
    peak[0, 15, 15] = 1.0
    b = gaussian_blur(peak, 2.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert b[0, 15, 15] < 1.0 and b.argmax().item() == 15 * 31 + 15


def test_tile_score_is_map_max():
    m = torch.rand(3, 10, 10)
    assert torch.equal(tile_score(m), m.flatten(1).max(1).values)


def test_mismatched_layers_raise():
    with pytest.raises(ValueError):
        stpm_loss(feats(0), feats(1)[:1])
