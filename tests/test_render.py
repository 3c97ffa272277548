"""The heatmap overlay: OpenCV's fast path against Pillow's, on maps in and out of [0, 1]."""

import numpy as np
import pytest

from stpm.imaging import render


def _case(seed: int, h: int = 37, w: int = 53):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    amap = rng.uniform(-0.5, 1.5, (h, w)).astype(np.float32)  # normalised maps overshoot both ends
    return image, amap


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_overlay_matches_pillows_blend_to_one_level(alpha):
    image, amap = _case(0)
    fast, ref = render.overlay(image, amap, alpha), render.pillow_overlay(image, amap, alpha)
    assert fast.shape == ref.shape == (37, 53, 3) and fast.dtype == np.uint8
    assert int(np.abs(fast.astype(int) - ref).max()) <= 1


def test_overlay_colours_are_the_turbo_map_blended_half_and_half():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    amap = np.array([[0.0, 0.5, 1.0], [-1.0, 2.0, 0.25]], dtype=np.float32)
    out = render.overlay(image, amap).astype(int)
    levels = np.array([[0, 128, 255], [0, 255, 64]])
    assert np.abs(out - render.TURBO[levels].astype(int) / 2).max() <= 1


def test_overlay_refuses_a_map_of_another_size():
    image, amap = _case(1)
    with pytest.raises(ValueError, match="differ in size"):
        render.overlay(image, amap[:-1])
