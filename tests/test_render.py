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


@pytest.mark.parametrize("library", ["isal", "zlib"])
@pytest.mark.parametrize("shape", [(37, 53, 3), (37, 53), (1, 1, 3)])
def test_png_bytes_decode_to_the_same_pixels(library, shape):
    """The minimal PNG encoder, with either deflate, writes files Pillow and OpenCV read back exactly."""
    import io

    import cv2
    from PIL import Image

    if library == "isal":
        pytest.importorskip("isal", reason="the isal package (a base dependency) is not installed")
    a = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    a[: shape[0] // 2] = 7  # runs, which RLE and ISA-L both shorten
    data = render.png_bytes(a, deflate_library=library)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), a)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back[..., ::-1] if a.ndim == 3 else back, a)


def test_png_deflate_defaults_to_isal_where_installed_and_refuses_unknown_libraries():
    raw = bytes(range(256)) * 64
    import zlib

    assert zlib.decompress(render.deflate(raw)) == raw
    expected = "isal" if render._ISAL is not None else "zlib"
    assert render.default_deflate() == expected and render.deflate(raw) == render.deflate(raw, expected)
    with pytest.raises(ValueError, match="isal or zlib"):
        render.deflate(raw, "brotli")
