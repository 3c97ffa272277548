"""Image decoding with limits, shared by training (stpm.data) and scoring (stpm.runtime).

Torch-free: numpy and Pillow only. Every image becomes uint8 RGB [H, W, 3]: grayscale, RGBA
(composited on black), palette, CMYK and 16-bit inputs are converted; EXIF orientation is applied.

Pillow reads every header (format, mode, size, orientation: the limits are checked there). The pixels
of the two commonest inputs are then decoded by faster libraries when installed, with the same
result: baseline 8-bit RGB JPEG without an orientation tag by simplejpeg (libjpeg-turbo, ~4x faster
than Pillow here), 8-bit RGB PNG without an eXIf chunk by OpenCV (~25 % faster). Anything else, or
a fast decoder that refuses the data, goes through Pillow, whose errors name the problem.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; raise it deliberately for very large sensors
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class ImageDecodeError(ValueError):
    """An input that is not a decodable image within the limits. `name` says which one."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class DataError(ValueError):
    """A data folder that cannot be used; the message names the folder or every bad file."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        a8 = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a8 = ((a - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    return cv2


_FAST = {}


def fast_decoder(name: str):
    """The optional fast library `name` ("simplejpeg", "cv2"), imported once; None where it is not installed."""
    if name not in _FAST:
        _FAST[name] = {"simplejpeg": _simplejpeg, "cv2": _cv2}[name]()
    return _FAST[name]


def _fast_decode(data: bytes, img: Image.Image) -> np.ndarray | None:
    """The pixels of a plain 8-bit RGB JPEG or PNG by a faster decoder, or None (use Pillow)."""
    w, h = img.size
    if img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1:
        sj = fast_decoder("simplejpeg")
        if sj is None:
            return None
        try:
            a = sj.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
        except ValueError:  # truncated or corrupt: Pillow says what is wrong
            return None
    elif (img.format == "PNG" and img.mode == "RGB" and len(data) > 25 and data[24] == 8 and data[25] == 2
          and b"eXIf" not in data):
        cv2 = fast_decoder("cv2")
        if cv2 is None:
            return None
        a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    else:
        return None
    if a is None or a.shape != (h, w, 3) or a.dtype != np.uint8:
        return None
    return a


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 RGB [H, W, 3]. Raises ImageDecodeError naming `name` on any problem."""
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(name, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            if w < 1 or h < 1:
                raise ImageDecodeError(name, f"invalid size {w}x{h}")
            fast = _fast_decode(data, img)
            if fast is not None:
                return fast
            img.load()  # truncated files fail here
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(name, f"decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(name, f"cannot decode ({type(e).__name__}: {e})") from None
    return np.asarray(rgb, dtype=np.uint8)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """File -> uint8 RGB [H, W, 3]; errors name the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageDecodeError(str(p), f"cannot read file ({e.strerror or e})") from None
    return decode_image(data, name=str(p), max_pixels=max_pixels)


def read_image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """A file's (height, width) after EXIF orientation, from its header (no pixel decoding).

    Raises ImageDecodeError naming the file, as read_image would for a bad header or size."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                orientation = img.getexif().get(0x0112, 1)
    except OSError as e:
        if isinstance(e, UnidentifiedImageError):
            raise ImageDecodeError(str(p), "not an image Pillow can read") from None
        raise ImageDecodeError(str(p), f"cannot read file ({e.strerror or e})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(str(p), f"decompression bomb refused ({e})") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(str(p), f"cannot decode ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ImageDecodeError(str(p), f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageDecodeError(str(p), f"invalid size {w}x{h}")
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def resize_rgb(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] (or (h, w)), bilinear with antialiasing (Pillow)."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape[0] == h and img.shape[1] == w:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def is_image_path(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
