"""Image decoding: every mode converted, orientation honoured, bad input named."""

import io

import numpy as np
import pytest
from PIL import Image

from stpm.imaging.decode import ImageDecodeError, decode_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_modes_become_uint8_rgb(mode):
    rgb = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    if mode == "I;16":
        assert img.mode.startswith("I;16")
    out = decode_image(encode(img, fmt), "x")
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)


def test_16bit_keeps_the_full_range():
    ramp = (np.linspace(0, 65535, 64).reshape(8, 8)).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(ramp)), "x")
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), "x")
    assert out.shape[:2] == (30, 10)


def test_alpha_is_composited_on_black():
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert decode_image(encode(img), "x").max() == 0


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
])
def test_garbage_is_named(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as e:
        decode_image(data, "upload.png")
    assert e.value.name == "upload.png"


def test_truncated_png_is_refused():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError, match="cannot decode") as e:
        decode_image(data[: len(data) // 2], "half.png")
    assert "half.png" in str(e.value)


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("L", (4000, 4000)))  # compresses to a few KB: a bomb in miniature
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(data, "bomb.png", max_pixels=1_000_000)
    assert decode_image(data, "ok.png", max_pixels=20_000_000).shape == (4000, 4000, 3)
