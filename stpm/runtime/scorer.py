"""The scorer: bundle -> scores, maps and heatmap images. numpy, Pillow and an inference backend only.

This is the service's scoring path; it must not import torch (a test checks `sys.modules`).

    scorer = Scorer("models/bottle/v3")                      # backend / precision: STPM_BACKEND / STPM_PRECISION, else auto
    [r] = scorer.score([png_bytes], map_size="input", overlay=True, heatmap_format="jpeg")
    r.score, r.is_anomaly, r.overlay_image
    scorer.selection                                          # which backend and precision run, and why

Sessions come from stpm.backends (ONNX Runtime CPU/CUDA/TensorRT, OpenVINO; fp32, fp16, bf16, int8).
Scoring has two phases so a server can run them on different threads: `infer_images` (decode, tile,
run the graph, stitch, image score: the decision) and `render` (maps and heatmap images); `score`
runs both.

The graph (`scorer.onnx`, see stpm.export) takes uint8 tiles [N, 3, S, S] and carries preprocessing;
this module decodes, plans and cuts tiles at the bundle's geometry (stpm.tiling, manifest["tiling"]),
batches tiles across images, stitches each image's map, scores it with the manifest's image score,
normalises with the calibration, and renders at the input size. A format-1 bundle (no `tiling`)
squashes to S x S and takes the graph's own score, exactly as it always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stpm.runtime import backends

from stpm import bundle

from stpm.imaging import render

from stpm.imaging.scores import ImageScore, image_score

from stpm.imaging.geometry import Geometry, TilePlan, TilingError, from_manifest, plan, score_from_manifest, stitch, tiles
from stpm.runtime.backends import PRECISION_FILES, choose_providers, ort_session
from stpm.imaging.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_rgb

log = logging.getLogger(__name__)

MapSize = None | str | tuple[int, int]  # None, "input", "model" (the map's own size at the model's scale), (H, W)


@dataclass
class ScoreResult:
    name: str
    raw_score: float
    score: float  # normalised: 0.5 = threshold
    is_anomaly: bool
    threshold: float  # raw units
    anomaly_map: np.ndarray | None = None  # float32 [H, W] in [0, 1] at the requested size
    overlay_image: bytes | None = None  # the image with the coloured map blended on, in heatmap_format
    map_image: bytes | None = None  # grayscale: the normalised map * 255 (128 = threshold), in heatmap_format
    heatmap_format: str = "png"
    # decode_ms: decode + resize + tiling of this image; infer_ms: its tiles' share of the runs;
    # render_ms: maps and heatmap images (stitching and the image score count to infer_ms)
    timings: dict[str, float] = field(default_factory=dict)
    tiles: int = 1  # tiles the model scored for this image
    scaled_size: tuple[int, int] = (0, 0)  # (height, width) of the image at the model's scale: the map's own size

    @property
    def overlay_png(self) -> bytes | None:
        """The overlay bytes (historical name: they are in `heatmap_format`, PNG by default)."""
        return self.overlay_image

    @property
    def map_png(self) -> bytes | None:
        """The grayscale map bytes (historical name: they are in `heatmap_format`)."""
        return self.map_image


@dataclass
class Scored:
    """One image after inference, before rendering: what `render` needs to finish it."""

    result: ScoreResult
    rgb: np.ndarray  # uint8 [H, W, 3] at the input's size
    amap: np.ndarray  # float32 raw stitched map [h, w] at the model's scale


def as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """A decoded array -> uint8 RGB [H, W, 3]. Accepts gray [H, W] / [H, W, 1], RGB, RGBA (composited on
    black, as stpm.imageio does for files), uint8, uint16 (/257) and float in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise ImageDecodeError(name, f"array of shape {a.shape} is not an image ([H, W], [H, W, 3] or [H, W, 4])")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ImageDecodeError(name, "float array contains NaN or inf")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    else:
        raise ImageDecodeError(name, f"unsupported array dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.uint16)
        return ((a[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(a)


class Scorer:
    """A bundle's exported scorer on the backend and precision `stpm.backends.select` picks. Thread-safe
    for concurrent `score` calls; `max_batch` tiles go through the graph per run.

    backend: "onnxruntime", "openvino" or "auto"; precision: "fp32", "fp16", "bf16", "int8" or "auto";
    None reads STPM_BACKEND / STPM_PRECISION, else "auto" (the fastest candidate on this machine that
    the bundle records as holding parity). A precision the bundle lacks falls back to fp32 with a
    warning (`selection.warnings`)."""

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: Sequence[str] = ("auto",),
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        precision: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = 16,
        verify: bool = True,
        trt_cache_dir: str | Path | None = None,
        backend: str | None = None,
        fall_back_to_fp32: bool = True,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.bundle_dir = Path(bundle_dir)
        self.manifest: dict[str, Any] = bundle.read_manifest(self.bundle_dir)
        self.name: str = self.manifest["name"]
        self.version: str | None = self.manifest.get("version")
        self.image_size: int = int(self.manifest["model"]["image_size"])
        self.geometry: Geometry = from_manifest(self.manifest)
        self.image_score: ImageScore = score_from_manifest(self.manifest)
        # format 1 (and squash + max): one tile per image, whose graph score is the image's score
        self._graph_score = self.geometry.mode == "squash" and self.image_score.method == "max"
        cal = self.manifest["calibration"]
        self.threshold: float = float(cal["threshold"])
        self.low: float = float(cal["low"])
        self._scale = 0.5 / max(self.threshold - self.low, 1e-12)
        self.max_pixels = max_pixels
        self.max_batch = max_batch

        if verify:  # every scorer graph the selection may load, before any is parsed
            files = (self.manifest.get("exports") or {}).get("files") or {}
            for fname in sorted(set(PRECISION_FILES.values())):
                f = self.bundle_dir / fname
                if fname in files and f.is_file() and bundle.sha256_file(f) != files[fname]["sha256"]:
                    raise bundle.BundleError(f"{self.bundle_dir}: {fname} does not match its sha256 in the manifest")
        self.session, self.selection = backends.select(
            self.bundle_dir, self.manifest, self.image_size, backend, precision, providers=providers,
            intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, max_batch=max_batch,
            trt_cache_dir=trt_cache_dir, fall_back_to_fp32=fall_back_to_fp32)
        self.backend: str = self.selection.backend
        self.precision: str = self.selection.precision
        self.providers: list[str] = list(self.session.devices)
        path = self.bundle_dir / PRECISION_FILES[self.precision]
        log.info("scorer %s/%s on %s/%s (%s): %s", self.name, self.version, self.backend, self.precision,
                 ", ".join(self.providers), self.selection.reason)
        self._check_metadata(path)

    def _check_metadata(self, path: Path) -> None:
        digest = self.session.metadata().get("stpm.manifest_digest")
        if digest != bundle.manifest_digest(self.manifest):  # the digest ignores the version name
            raise bundle.BundleError(f"{path} was exported from a different model (manifest digest mismatch)")

    # ------------------------------------------------------------------------------- inference

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [N, 3, S, S] -> (raw anomaly maps [N, S, S], raw scores [N], normalised scores [N])."""
        return self.session.run(batch)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the graph once per batch size so the first request does not pay for allocation / tuning."""
        for n in batch_sizes:
            self.infer(np.zeros((n, 3, self.image_size, self.image_size), dtype=np.uint8))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw scores or maps -> [0, 1] (low -> 0, threshold -> 0.5), as stpm.calibrate.normalize, float32."""
        return np.clip(0.5 + (np.asarray(x, dtype=np.float32) - np.float32(self.threshold)) * np.float32(self._scale),
                       0.0, 1.0)

    def plan(self, height: int, width: int) -> TilePlan:
        """The tile plan of a height x width input; raises TilingError naming the size and the limit."""
        return plan(height, width, self.geometry)

    def prepare(self, image: bytes | np.ndarray | str | Path, name: str) -> tuple[np.ndarray, TilePlan]:
        """One input -> (uint8 RGB at its own size, its tile plan). Raises ImageDecodeError naming it."""
        if isinstance(image, (str, Path)):
            try:
                image = Path(image).read_bytes()
            except OSError as e:
                raise ImageDecodeError(name, f"cannot read the file ({e.strerror or e})") from None
        if isinstance(image, (bytes, bytearray, memoryview)):
            rgb = decode_image(bytes(image), name, self.max_pixels)
        elif isinstance(image, np.ndarray):
            rgb = as_rgb(image, name)
            if rgb.shape[0] * rgb.shape[1] > self.max_pixels:
                raise ImageDecodeError(name, f"{rgb.shape[1]}x{rgb.shape[0]} exceeds the limit of {self.max_pixels} pixels")
        else:
            raise ImageDecodeError(name, f"expected bytes or a numpy array, got {type(image).__name__}")
        try:
            p = self.plan(rgb.shape[0], rgb.shape[1])
        except TilingError as e:
            raise ImageDecodeError(name, str(e)) from None
        return rgb, p

    def score(
        self,
        images: Sequence[bytes | np.ndarray | str | Path],
        *,
        names: Sequence[str] | None = None,
        map_size: MapSize = None,
        overlay: bool = False,
        raw_map_png: bool = False,
        heatmap_format: str = "png",
    ) -> list[ScoreResult]:
        """Score images (image files, encoded bytes or decoded arrays; names default to the file paths).
        map_size: None (no map), "input" (each image's
        own size), "model" (the map's own size: the image at the model's scale) or (H, W). Overlay / map
        images are rendered at map_size, or at the input size when map_size is None, encoded as
        heatmap_format ("png", "jpeg" or "webp"). Raises ImageDecodeError for an undecodable input or
        one the geometry cannot cover (nothing is scored then). Tiles of all images go through the graph
        together, `max_batch` per run."""
        check_render_options(map_size, heatmap_format)
        return self.render(self.infer_images(images, names=names), map_size=map_size, overlay=overlay,
                           raw_map_png=raw_map_png, heatmap_format=heatmap_format)

    def infer_images(self, images: Sequence[bytes | np.ndarray], *, names: Sequence[str] | None = None) -> list[Scored]:
        """Decode, tile, run the graph, stitch and score: each image's decision, not yet rendered."""
        n = len(images)
        if names is None:
            names = [str(im) if isinstance(im, (str, Path)) else f"image{i}" for i, im in enumerate(images)]
        elif len(names) != n:
            raise ValueError(f"{n} images but {len(names)} names")
        rgbs, plans, decode_ms = [], [], []
        for img, nm in zip(images, names):
            t0 = time.perf_counter()
            rgb, p = self.prepare(img, nm)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            rgbs.append(rgb)
            plans.append(p)

        # tiles of all images, in order, through the graph `max_batch` at a time; an image is finished
        # (stitched, scored) as soon as its last tile has been scored
        parts: list[list[tuple[np.ndarray, float, float]]] = [[] for _ in range(n)]
        infer_ms = [0.0] * n
        out: list[Scored | None] = [None] * n
        queue: list[np.ndarray] = []
        owners: list[int] = []

        def run() -> None:
            t0 = time.perf_counter()
            maps, raw, score = self.infer(np.stack(queue).transpose(0, 3, 1, 2))
            share = (time.perf_counter() - t0) * 1e3 / len(queue)
            done = []
            for k, i in enumerate(owners):
                parts[i].append((maps[k], float(raw[k]), float(score[k])))
                infer_ms[i] += share
                if len(parts[i]) == plans[i].n_tiles:
                    done.append(i)
            queue.clear()
            owners.clear()
            for i in done:
                t1 = time.perf_counter()
                out[i] = self._decide(names[i], rgbs[i], plans[i], parts[i])
                out[i].result.timings = {"decode_ms": decode_ms[i],
                                         "infer_ms": infer_ms[i] + (time.perf_counter() - t1) * 1e3}
                parts[i] = []

        for i in range(n):
            t0 = time.perf_counter()
            cut = tiles(rgbs[i], plans[i])
            decode_ms[i] += (time.perf_counter() - t0) * 1e3
            for t in cut:
                queue.append(t)
                owners.append(i)
                if len(queue) == self.max_batch:
                    run()
        if queue:
            run()
        return out  # type: ignore[return-value]

    def _decide(self, name: str, rgb: np.ndarray, p: TilePlan,
                parts: list[tuple[np.ndarray, float, float]]) -> Scored:
        """One image's tile outputs -> its stitched map, image score and decision."""
        amap = stitch(np.stack([m for m, _, _ in parts]), p)
        if self._graph_score:
            raw, score = parts[0][1], parts[0][2]
        else:
            raw = image_score(amap, self.image_score)
            score = float(self.normalise(np.float32(raw)))
        r = ScoreResult(
            name=name, raw_score=raw, score=score, is_anomaly=bool(raw >= self.threshold), threshold=self.threshold,
            tiles=p.n_tiles, scaled_size=(p.h, p.w),
        )
        return Scored(r, rgb, amap)

    def render(
        self,
        scored: Sequence[Scored],
        *,
        map_size: MapSize = None,
        overlay: bool = False,
        raw_map_png: bool = False,
        heatmap_format: str = "png",
    ) -> list[ScoreResult]:
        """Maps and heatmap images of scored images (see `score`); -> their ScoreResults. Safe to run on
        another thread than inference (a server renders one batch while the next is inferred)."""
        check_render_options(map_size, heatmap_format)
        out = []
        for sc in scored:
            t1 = time.perf_counter()
            r, rgb = sc.result, sc.rgb
            if map_size is not None or overlay or raw_map_png:
                if map_size in (None, "input"):
                    size = rgb.shape[:2]
                elif map_size == "model":
                    size = r.scaled_size
                else:
                    size = (int(map_size[0]), int(map_size[1]))
                nmap = render.resize_map(self.normalise(sc.amap), size)
                if map_size is not None:
                    r.anomaly_map = nmap
                if overlay:
                    base = rgb if rgb.shape[:2] == size else resize_rgb(rgb, size)
                    r.overlay_image = render.encode(render.overlay(base, nmap), heatmap_format)
                if raw_map_png:
                    r.map_image = render.encode(render.to_uint8(nmap), heatmap_format)
                r.heatmap_format = heatmap_format
            r.timings = {**r.timings, "render_ms": (time.perf_counter() - t1) * 1e3}
            out.append(r)
        return out

    def __repr__(self) -> str:
        return f"Scorer({self.name}/{self.version}, {self.backend}/{self.precision}, {self.providers[0]})"


def check_render_options(map_size: MapSize, heatmap_format: str) -> None:
    if not (map_size is None or map_size in ("input", "model") or
            (isinstance(map_size, (tuple, list)) and len(map_size) == 2 and all(int(v) >= 1 for v in map_size))):
        raise ValueError(f"map_size must be None, 'input', 'model' or (height, width), got {map_size!r}")
    if heatmap_format not in render.FORMATS:
        raise ValueError(f"heatmap_format must be one of {', '.join(render.FORMATS)}, got {heatmap_format!r}")


__all__ = ["PRECISION_FILES", "ScoreResult", "Scored", "Scorer", "as_rgb", "check_render_options", "choose_providers",
           "ort_session"]
