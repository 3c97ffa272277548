"""Heatmap rendering for the scorer: colormap, overlay, PNG / JPEG / WebP encoding. numpy + Pillow only (no torch).

Maps here are normalised anomaly maps in [0, 1] (0.5 = the decision threshold), float32 [H, W].
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from stpm.imaging.decode import fast_decoder

PNG_COMPRESS_LEVEL = 1  # fast deflate level: these PNGs are served once, speed beats a few percent of size
FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JPEG_QUALITY = 90
WEBP_QUALITY = 80  # lossy, method 0 (the fastest): smallest files, but slower to encode than PNG here


def _turbo_lut() -> np.ndarray:
    """Google's Turbo colormap (polynomial approximation, A. Mikhailov 2019) as uint8 [256, 3]."""
    x = np.linspace(0.0, 1.0, 256)
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
    return (np.clip(np.stack([r, g, b], axis=1), 0, 1) * 255 + 0.5).astype(np.uint8)


TURBO = _turbo_lut()


_CV2 = fast_decoder("cv2")  # OpenCV where installed (one thread: the server runs requests in parallel)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [h, w] -> float32 [H, W] (size = (H, W)), bilinear.

    Enlarging: OpenCV where installed (the same values as Pillow's to ~1e-7, ~25x faster at 256 -> 512);
    shrinking: Pillow (mode F), whose bilinear filter widens with the scale (antialiased), as before."""
    h, w = size
    if amap.shape == (h, w):
        return amap.astype(np.float32, copy=False)
    src = np.ascontiguousarray(amap, dtype=np.float32)
    if _CV2 is not None and h >= src.shape[0] and w >= src.shape[1]:
        return _CV2.resize(src, (w, h), interpolation=_CV2.INTER_LINEAR)
    return np.asarray(Image.fromarray(src, mode="F").resize((w, h), Image.BILINEAR))


def to_uint8(amap: np.ndarray) -> np.ndarray:
    """[0, 1] float map -> uint8 [H, W] (0.5 -> 128)."""
    return (np.clip(amap, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize(amap: np.ndarray) -> np.ndarray:
    """[0, 1] float map [H, W] -> uint8 RGB [H, W, 3] through the Turbo colormap."""
    return TURBO[to_uint8(amap)]


_TURBO_PALETTE = TURBO.ravel().tolist()
_TURBO_COLUMN = np.ascontiguousarray(TURBO.reshape(256, 1, 3))  # OpenCV's user colormap: [256, 1] of 3 channels


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured map over a uint8 RGB image of the same [H, W]; -> uint8 [H, W, 3].

    With OpenCV installed the colormap is a table lookup and the blend OpenCV's saturating weighted sum,
    about five times faster than Pillow at 512 px (benchmarks/render_stages.py); the pixels match
    Pillow's to one level (rounding). Without it the colormap runs as a Pillow palette and the blend in
    Pillow's C code (a numpy gather + blend costs about twice as much)."""
    if image.shape[:2] != amap.shape:
        raise ValueError(f"image {image.shape[:2]} and map {amap.shape} differ in size")
    if _CV2 is not None:
        levels = _CV2.convertScaleAbs(np.clip(amap, 0.0, 1.0), alpha=255.0)  # rounded, saturated uint8
        coloured = _CV2.applyColorMap(levels, _TURBO_COLUMN)
        return _CV2.addWeighted(np.ascontiguousarray(image, dtype=np.uint8), 1.0 - alpha, coloured, alpha, 0.0)
    return pillow_overlay(image, amap, alpha)


def pillow_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`overlay` in Pillow alone (no OpenCV)."""
    pal = Image.fromarray(to_uint8(amap), mode="P")
    pal.putpalette(_TURBO_PALETTE)
    return np.asarray(Image.blend(Image.fromarray(image), pal.convert("RGB"), alpha))


def _isal_zlib():
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib


_ISAL = _isal_zlib()  # ISA-L's deflate where installed (PyPI `isal`); Python's zlib otherwise


def default_deflate() -> str:
    """The library `deflate` uses unless told: "isal" where installed, else "zlib"."""
    return "isal" if _ISAL is not None else "zlib"


def deflate(raw: np.ndarray | bytes, library: str | None = None) -> bytes:
    """A zlib stream of `raw` at PNG_COMPRESS_LEVEL: by ISA-L ("isal", the default where installed:
    about 3x faster than zlib level 1 on 512 px overlays for ~5 % more bytes, benchmarks/png_encode.py)
    or by Python's zlib ("zlib", level 1, RLE strategy). Both release the GIL while compressing."""
    library = library or default_deflate()
    if library == "isal":
        if _ISAL is None:
            raise RuntimeError("the isal package is not installed")
        co = _ISAL.compressobj(PNG_COMPRESS_LEVEL, _ISAL.DEFLATED, 15, 9)
    elif library == "zlib":
        co = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    else:
        raise ValueError(f"deflate library must be isal or zlib, got {library!r}")
    return co.compress(raw) + co.flush()  # from the array's buffer: no second copy of the rows


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(arr: np.ndarray, deflate_library: str | None = None) -> bytes:
    """uint8 [H, W] (grayscale) or [H, W, 3] (RGB) -> PNG bytes.

    A minimal encoder: the "Up" filter for every row (numpy), then `deflate` (ISA-L where installed,
    else zlib level 1 with the RLE strategy). Several times faster than Pillow at a similar size
    (benchmarks/png_encode.py, docs/BENCHMARKS.md); encoding was the largest cost of a 512 px overlay."""
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    if a.ndim == 2:
        color_type, c = 0, 1
    elif a.ndim == 3 and a.shape[2] == 3:
        color_type, c = 2, 3
    else:
        raise ValueError(f"expected [H, W] or [H, W, 3] uint8, got shape {a.shape}")
    h, w = a.shape[:2]
    rows = a.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    data = deflate(raw, deflate_library)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encode(arr: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 [H, W] or [H, W, 3] -> image bytes in `fmt`: "png" (lossless, this module's encoder),
    "jpeg" (quality 90, 4:2:0; ~6x faster to encode than PNG at 512 px and ~4x smaller) or "webp"
    (lossy, quality 80; the smallest). WebP has no grayscale mode: a [H, W] map decodes as RGB with
    equal channels."""
    if fmt == "png":
        return png_bytes(arr)
    if fmt not in FORMATS:
        raise ValueError(f"heatmap format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, "WEBP", quality=WEBP_QUALITY, method=0)
    return buf.getvalue()
