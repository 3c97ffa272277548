"""Synthetic anomalies on good images, for choosing a model without defect images (numpy only).

Three kinds, after CutPaste (Li et al., CVPR 2021) and DRAEM (Zavrtanik et al., ICCV 2021):
  - `cutpaste`: a rectangle cut from elsewhere in the image, brightness-jittered, pasted;
  - `scar`: a thin rotated stroke (a crack or scratch) of a random colour or of image content;
  - `perlin`: Perlin-noise blobs blending in another good image, shifted, or a flat colour.
Sizes are relative to the image's short side, so the same settings work at any resolution. Every
function is deterministic given its numpy Generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("cutpaste", "scar", "perlin")


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1], shape (h, w); res = lattice cells along each axis."""
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, ry, h, endpoint=False)
    xs = np.linspace(0, rx, w, endpoint=False)
    yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grad[yi[:, None] + oy, xi[None, :] + ox]
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.sqrt(2) * (top * (1 - v) + bottom * v)


def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(0.7, 1.3)
    shift = rng.uniform(-30, 30)
    return np.clip(patch.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)


def cutpaste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jittered rectangle from one place pasted at another. -> (image, bool mask)."""
    h, w = img.shape[:2]
    s = min(h, w)
    area = rng.uniform(0.002, 0.02) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(np.sqrt(area / aspect), 4, s // 2))
    pw = int(np.clip(np.sqrt(area * aspect), 4, s // 2))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    dy, dx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = img.copy()
    out[dy:dy + ph, dx:dx + pw] = _jitter(img[sy:sy + ph, sx:sx + pw], rng)
    mask = np.zeros((h, w), bool)
    mask[dy:dy + ph, dx:dx + pw] = True
    return out, mask


def scar(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight or bent stroke, darker or brighter than its surroundings. -> (image, mask)."""
    h, w = img.shape[:2]
    s = min(h, w)
    width = int(max(1, round(rng.uniform(0.006, 0.02) * s)))
    length = rng.uniform(0.1, 0.35) * s
    y0, x0 = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    angle = rng.uniform(0, np.pi)
    pts = [(x0, y0)]
    for _ in range(int(rng.integers(1, 4))):  # one to three segments
        angle += rng.normal(0, 0.4)
        seg = length / 2
        x, y = pts[-1]
        pts.append((x + seg * np.cos(angle), y + seg * np.sin(angle)))
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).line(pts, fill=255, width=width, joint="curve")
    mask = np.asarray(m) > 0
    out = img.copy()
    local = img[mask].astype(np.float32).mean(axis=0) if mask.any() else np.full(3, 128.0)
    delta = rng.uniform(40, 100) * rng.choice([-1.0, 1.0])
    colour = np.clip(local + delta, 0, 255)
    out[mask] = colour.astype(np.uint8)
    return out, mask


def perlin(img: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Perlin blobs blending in `source` (another good image, rolled) or a flat colour. -> (image, mask)."""
    h, w = img.shape[:2]
    mask = np.zeros((h, w), bool)
    for _ in range(10):  # thresholded noise can come out empty or huge: retry a few times
        scale = int(2 ** rng.integers(1, 4))
        res = (max(1, round(scale * h / min(h, w))), max(1, round(scale * w / min(h, w))))
        noise = perlin_noise((h, w), res, rng)
        # one region: noise blobs inside a random ellipse, so the anomaly is a defect, not a speckle
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.08, 0.3, 2) * min(h, w)
        yy, xx = np.ogrid[:h, :w]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        mask = (noise > rng.uniform(0.2, 0.5)) & inside
        frac = mask.mean()
        if 0.001 <= frac <= 0.05:
            break
    else:
        return cutpaste(img, rng)
    if rng.random() < 0.5 and source.shape == img.shape:
        fill = np.roll(source, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    else:
        colour = rng.uniform(0, 255, 3)
        if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]):
            colour[:] = colour[0]  # a gray image gets a gray defect
        fill = np.broadcast_to(colour, img.shape)
    beta = rng.uniform(0.0, 0.5)  # share of the original kept
    out = img.astype(np.float32)
    out[mask] = beta * out[mask] + (1 - beta) * fill[mask]
    return np.clip(out, 0, 255).astype(np.uint8), mask


def make_anomalies(
    images: Sequence[np.ndarray], per_image: int = 3, seed: int = 0, kinds: Sequence[str] = KINDS
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """uint8 RGB images [H, W, 3] -> per_image synthetic anomalies each: (image, bool mask [H, W], kind).

    Kinds rotate through `kinds`, so each is represented equally; deterministic given `seed`."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown synthetic anomaly kind(s) {bad}; choose from {', '.join(KINDS)}")
    if not images:
        raise ValueError("synthetic anomalies need at least one good image")
    rng = np.random.default_rng(seed)
    out = []
    k = 0
    for i, img in enumerate(images):
        for _ in range(per_image):
            kind = kinds[k % len(kinds)]
            k += 1
            if kind == "cutpaste":
                a, m = cutpaste(img, rng)
            elif kind == "scar":
                a, m = scar(img, rng)
            else:
                a, m = perlin(img, images[(i + 1) % len(images)], rng)
            out.append((a, m, kind))
    return out
