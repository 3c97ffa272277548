"""An input on its way to the graph, prepared once: its size (from the header, before any decoding), its
tile plan, its pixels (decoded within the per-image pixel limit). numpy + Pillow only.

A server reads every file of a request first (`read`: header and plan, nothing decoded), checks the
request's pixel budget from those sizes and plans, then decodes (`decode`); the Scorer takes the
prepared images as they are. A caller with bytes, files or arrays in hand calls `prepare`, which does
all of it at once.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stpm.imaging.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from stpm.imaging.geometry import Geometry, TilePlan, TilingError, plan

ImageInput = bytes | np.ndarray | str | Path  # what the Scorer takes besides a PreparedImage
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(eq=False)
class PreparedImage:
    """One input: its size and tile plan, then its pixels. Nothing here is computed twice."""

    name: str
    size: tuple[int, int] | None = None  # (height, width), from the header until decoded; None: unreadable
    plan: TilePlan | None = None  # None: not planned (no geometry, unreadable header) or refused (tiling_error)
    tiling_error: str | None = None  # why the geometry cannot cover this size
    rgb: np.ndarray | None = None  # uint8 [H, W, 3] once decoded
    data: bytes | None = None  # the encoded bytes, until decoded
    prepare_ms: float = 0.0  # reading, planning and decoding

    @property
    def decoded(self) -> bool:
        return self.rgb is not None

    def scaled_pixels(self) -> int:
        """Pixels of this image at the model's scale (its map's own size); 0 where it has no plan."""
        return self.plan.h * self.plan.w if self.plan is not None else 0

    def tile_pixels(self) -> int:
        """The model's work on this image: its tiles x tile^2 pixels of model input (they cover the scaled
        image, so this also bounds its size); 0 where it has no plan."""
        return self.plan.n_tiles * self.plan.tile**2 if self.plan is not None else 0


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an encoded image after its EXIF orientation, from the header (nothing decoded);
    None when the header is unreadable (decoding then names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                orientation = _header_orientation(img)
    except Exception:  # noqa: BLE001 - any unreadable header: left to the decoder's error
        return None
    if w < 1 or h < 1:
        return None
    return (int(w), int(h)) if orientation in ROTATED else (int(h), int(w))


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation if the header holds it. A PNG's eXIf chunk may follow the pixels, and PIL's
    getexif() then decodes the whole image to find it: that is left to decoding (which transposes and
    plans the decoded size again)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(0x0112, 1)


def _plan(image: PreparedImage, geometry: Geometry | None) -> None:
    """Plan `image.size` on `geometry`; a size the geometry cannot cover is recorded, not raised."""
    image.plan, image.tiling_error = None, None
    if geometry is None or image.size is None:
        return
    try:
        image.plan = plan(image.size[0], image.size[1], geometry)
    except TilingError as e:
        image.tiling_error = str(e)


def read(data: bytes, name: str, geometry: Geometry | None) -> PreparedImage:
    """Encoded bytes -> a PreparedImage with its header size and tile plan; nothing decoded, nothing raised."""
    t0 = time.perf_counter()
    image = PreparedImage(name, size=header_size(data), data=data)
    _plan(image, geometry)
    image.prepare_ms = (time.perf_counter() - t0) * 1e3
    return image


def decode(image: PreparedImage, geometry: Geometry | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode a read image's bytes (raises ImageDecodeError naming it); planned again only if the pixels'
    size is not the header's. The bytes are dropped."""
    if image.decoded:
        return image
    t0 = time.perf_counter()
    image.rgb = decode_image(image.data or b"", image.name, max_pixels)
    image.data = None
    if image.rgb.shape[:2] != image.size:
        image.size = image.rgb.shape[:2]
        _plan(image, geometry)
    image.prepare_ms += (time.perf_counter() - t0) * 1e3
    return image


def prepare(image: ImageInput | PreparedImage, name: str, geometry: Geometry,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Any input -> a decoded, planned PreparedImage (one already prepared is taken as it is). Raises
    ImageDecodeError naming the input for an undecodable one or one the geometry cannot cover."""
    if isinstance(image, PreparedImage):
        prepared = decode(image, geometry, max_pixels)
        if prepared.plan is None and prepared.tiling_error is None:  # read without a geometry
            _plan(prepared, geometry)
    else:
        t0 = time.perf_counter()
        rgb = _pixels(image, name, max_pixels)
        prepared = PreparedImage(name, size=rgb.shape[:2], rgb=rgb)
        _plan(prepared, geometry)
        prepared.prepare_ms = (time.perf_counter() - t0) * 1e3
    if prepared.tiling_error is not None:
        raise ImageDecodeError(prepared.name, prepared.tiling_error)
    return prepared


def _pixels(image: ImageInput, name: str, max_pixels: int) -> np.ndarray:
    """A file, encoded bytes or an array -> uint8 RGB [H, W, 3] within max_pixels."""
    if isinstance(image, (str, Path)):
        try:
            image = Path(image).read_bytes()
        except OSError as e:
            raise ImageDecodeError(name, f"cannot read the file ({e.strerror or e})") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name, max_pixels)
    if isinstance(image, np.ndarray):
        rgb = as_rgb(image, name)
        if rgb.shape[0] * rgb.shape[1] > max_pixels:
            raise ImageDecodeError(name, f"{rgb.shape[1]}x{rgb.shape[0]} exceeds the limit of {max_pixels} pixels")
        return rgb
    raise ImageDecodeError(name, f"expected bytes or a numpy array, got {type(image).__name__}")


def as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """A decoded array -> uint8 RGB [H, W, 3]. Accepts gray [H, W] / [H, W, 1], RGB, RGBA (composited on
    black, as stpm.imaging.decode does for files), uint8, uint16 (/257) and float in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise ImageDecodeError(name, f"array of shape {a.shape} is not an image ([H, W], [H, W, 3] or [H, W, 4])")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ImageDecodeError(name, "float array contains NaN or inf")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageDecodeError(name, f"unsupported array dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.uint16)
        return ((a[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(a)


__all__ = ["ImageInput", "PreparedImage", "as_rgb", "decode", "header_size", "prepare", "read"]
