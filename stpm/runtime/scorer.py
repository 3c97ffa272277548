"""The scorer: bundle -> scores, maps and heatmap images. numpy, Pillow and an inference backend only.

This is the service's scoring path; it must not import torch (a test checks `sys.modules`).

    scorer = Scorer("models/bottle/v3")                      # backend / precision: STPM_BACKEND / STPM_PRECISION, else auto
    [r] = scorer.score([png_bytes], map_size="input", overlay=True, heatmap_format="jpeg")
    r.score, r.is_anomaly, r.overlay_image
    scorer.selection                                          # which backend and precision run, and why

Sessions come from stpm.runtime.sessions (ONNX Runtime CPU/CUDA/TensorRT, OpenVINO; fp32, fp16, bf16,
int8), chosen by stpm.runtime.choice. Scoring has two phases so a server can run them on different
threads: `infer_images` (prepare, tile, run the graph, stitch, image score: the decision) and `render`
(maps and heatmap images); `score` runs both. An input is prepared once (stpm.runtime.images: decoded
within the pixel limit, planned); a server that prepared it already (to check a request's budget) passes
the PreparedImage and nothing is done twice.

The graph (`scorer.onnx`, see stpm.export) takes uint8 tiles [N, 3, S, S] and carries preprocessing;
this module plans and cuts tiles at the bundle's geometry (stpm.imaging.geometry, manifest["tiling"]),
batches tiles across images, stitches each image's map, scores it with the manifest's image score,
normalises with the calibration, and renders at the input size. A format-1 bundle (no `tiling`)
squashes to S x S and takes the graph's own score, exactly as it always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stpm import bundle
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.imaging import render
from stpm.imaging.decode import DEFAULT_MAX_PIXELS, resize_rgb
from stpm.imaging.geometry import (
    Geometry,
    TilePlan,
    batch_tiles,
    plan,
    stitch,
    tiles,
)
from stpm.imaging.scores import ImageScore, image_score
from stpm.runtime import images as prep
from stpm.runtime.choice import choose_backend
from stpm.runtime.images import ImageInput, PreparedImage
from stpm.runtime.sessions import PRECISION_FILES, SessionOptions

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


@dataclass
class Scored:
    """One image after inference, before rendering: what `render` needs to finish it."""

    result: ScoreResult
    rgb: np.ndarray  # uint8 [H, W, 3] at the input's size
    amap: np.ndarray  # float32 raw stitched map [h, w] at the model's scale


def _default_name(image: Any, i: int) -> str:
    if isinstance(image, PreparedImage):
        return image.name
    return str(image) if isinstance(image, (str, Path)) else f"image{i}"


@dataclass
class _Progress:
    """One image's tile outputs as they come back from the graph, and the time spent on it."""

    n_tiles: int
    decode_ms: float
    infer_ms: float = 0.0
    maps: list[np.ndarray] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def add(self, amap: np.ndarray, raw: float, score: float, ms: float) -> bool:
        """One tile's outputs; -> True when it was the image's last."""
        self.maps.append(amap)
        self.raw.append(raw)
        self.scores.append(score)
        self.infer_ms += ms
        return len(self.maps) == self.n_tiles


class Scorer:
    """A bundle's exported scorer on the backend and precision `stpm.runtime.choice.choose_backend` picks.
    Thread-safe for concurrent `score` calls; `max_batch` tiles go through the graph per run.

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
        self._read_manifest()
        self.max_pixels = max_pixels
        self.max_batch = max_batch
        if verify:
            self._verify_files()
        options = SessionOptions(providers=tuple(providers), intra_op_threads=intra_op_threads,
                                 inter_op_threads=inter_op_threads, max_batch=max_batch,
                                 trt_cache_dir=trt_cache_dir, image_size=self.image_size)
        self.session, self.selection = choose_backend(self.bundle_dir, self.manifest, self.image_size, backend,
                                                      precision, options=options, fall_back_to_fp32=fall_back_to_fp32)
        self.backend: str = self.selection.backend
        self.precision: str = self.selection.precision
        self.providers: list[str] = list(self.session.devices)
        log.info("scorer %s/%s on %s/%s (%s): %s", self.name, self.version, self.backend, self.precision,
                 ", ".join(self.providers), self.selection.reason)
        self._check_metadata(self.bundle_dir / PRECISION_FILES[self.precision])

    def _read_manifest(self) -> None:
        """What scoring needs from the manifest, parsed once (stpm.bundle.manifest)."""
        self.manifest: Manifest = Manifest.read(self.bundle_dir)
        self.name: str = self.manifest.name
        self.version: str | None = self.manifest.version
        self.image_size: int = self.manifest.model.image_size
        self.geometry: Geometry = self.manifest.geometry
        self.image_score: ImageScore = self.manifest.image_score
        self.calibration: Calibration = self.manifest.calibration
        self.threshold: float = self.calibration.threshold
        self.low: float = self.calibration.low
        # format 1 (and squash + max): one tile per image, whose graph score is the image's score
        self._graph_score = (self.geometry.mode == "squash" and self.image_score.method == "max"
                             and self.image_score.prior is None)

    def _verify_files(self) -> None:
        """Every scorer graph the backend choice may load matches its sha256 in the manifest, before any is parsed."""
        files = self.manifest.export_files
        for fname in sorted(set(PRECISION_FILES.values())):
            f = self.bundle_dir / fname
            if fname in files and f.is_file() and bundle.sha256_file(f) != files[fname].sha256:
                raise bundle.BundleError(f"{self.manifest.ref}: {fname} does not match its sha256 in the manifest")

    def _check_metadata(self, path: Path) -> None:
        digest = self.session.metadata().get("stpm.manifest_digest")
        if digest != self.manifest.digest():  # the digest ignores the version name
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
        """Raw scores or maps -> [0, 1] (low -> 0, threshold -> 0.5), float32 as the graph computes it."""
        return self.calibration.normalise(x, np.float32)

    def plan(self, height: int, width: int) -> TilePlan:
        """The tile plan of a height x width input; raises TilingError naming the size and the limit."""
        return plan(height, width, self.geometry)

    def read(self, data: bytes, name: str) -> PreparedImage:
        """Encoded bytes -> their size and tile plan from the header, nothing decoded (stpm.runtime.images.read)."""
        return prep.read(data, name, self.geometry)

    def decode(self, image: PreparedImage) -> PreparedImage:
        """A read image's pixels, within max_pixels; raises ImageDecodeError naming it."""
        return prep.decode(image, self.geometry, self.max_pixels)

    def prepare(self, image: ImageInput | PreparedImage, name: str) -> PreparedImage:
        """One input -> decoded and planned (one already prepared is taken as it is). Raises
        ImageDecodeError naming it for an undecodable input or one the geometry cannot cover."""
        return prep.prepare(image, name, self.geometry, self.max_pixels)

    def score(
        self,
        images: Sequence[ImageInput | PreparedImage],
        *,
        names: Sequence[str] | None = None,
        map_size: MapSize = None,
        overlay: bool = False,
        raw_map_png: bool = False,
        heatmap_format: str = "png",
    ) -> list[ScoreResult]:
        """Score images (image files, encoded bytes, decoded arrays or PreparedImages; names default to the
        file paths, the prepared names, else image0, image1, ...). map_size: None (no map), "input" (each
        image's own size), "model" (the map's own size: the image at the model's scale) or (H, W). Overlay /
        map images are rendered at map_size, or at the input size when map_size is None, encoded as
        heatmap_format ("png", "jpeg" or "webp"). Raises ImageDecodeError for an undecodable input or
        one the geometry cannot cover (nothing is scored then). Tiles of all images go through the graph
        together, `max_batch` per run."""
        check_render_options(map_size, heatmap_format)
        return self.render(self.infer_images(images, names=names), map_size=map_size, overlay=overlay,
                           raw_map_png=raw_map_png, heatmap_format=heatmap_format)

    def infer_images(self, images: Sequence[ImageInput | PreparedImage], *,
                     names: Sequence[str] | None = None) -> list[Scored]:
        """Prepare (unless prepared), tile, run the graph, stitch and score: each image's decision, not yet
        rendered. Tiles of consecutive images share graph runs; an image is finished (stitched, scored) as
        soon as its last tile has been scored."""
        prepared, prepare_ms = self._prepare_all(images, names)
        progress = [_Progress(p.plan.n_tiles, ms) for p, ms in zip(prepared, prepare_ms)]
        out: list[Scored | None] = [None] * len(prepared)
        for batch, owners in batch_tiles(self._cut_tiles(prepared, progress), self.max_batch):
            t0 = time.perf_counter()
            maps, raw, score = self.infer(batch)
            share = (time.perf_counter() - t0) * 1e3 / len(owners)
            for k, i in enumerate(owners):
                if progress[i].add(maps[k], float(raw[k]), float(score[k]), share):
                    out[i] = self._finish(prepared[i], progress[i])
                    progress[i] = None  # type: ignore[call-overload]  # its tile maps are no longer needed
        return out  # type: ignore[return-value]

    def _prepare_all(self, images: Sequence[ImageInput | PreparedImage],
                     names: Sequence[str] | None) -> tuple[list[PreparedImage], list[float]]:
        """Every input prepared (all before any is scored: a bad one fails the call) and the ms it took here."""
        if names is None:
            names = [_default_name(im, i) for i, im in enumerate(images)]
        elif len(names) != len(images):
            raise ValueError(f"{len(images)} images but {len(names)} names")
        prepared, ms = [], []
        for img, nm in zip(images, names):
            t0 = time.perf_counter()
            p = self.prepare(img, nm)
            p.name = nm
            prepared.append(p)
            ms.append((time.perf_counter() - t0) * 1e3)
        return prepared, ms

    @staticmethod
    def _cut_tiles(prepared: list[PreparedImage], progress: list[_Progress]) -> Iterator[np.ndarray]:
        """Each image's tiles when the batching asks for them (the cut counts to the image's decode_ms)."""
        for p, pr in zip(prepared, progress):
            t0 = time.perf_counter()
            cut = tiles(p.rgb, p.plan)
            pr.decode_ms += (time.perf_counter() - t0) * 1e3
            yield cut

    def _finish(self, p: PreparedImage, progress: _Progress) -> Scored:
        """One image's tile outputs -> its stitched map, image score and decision."""
        t0 = time.perf_counter()
        amap = stitch(np.stack(progress.maps), p.plan)
        if self._graph_score:
            raw, score = progress.raw[0], progress.scores[0]
        else:
            raw = image_score(amap, self.image_score)  # less the position prior, if the bundle has one
            score = float(self.normalise(np.float32(raw)))
        r = ScoreResult(
            name=p.name, raw_score=raw, score=score, is_anomaly=bool(self.calibration.is_anomaly(raw)),
            threshold=self.threshold, tiles=p.plan.n_tiles, scaled_size=(p.plan.h, p.plan.w),
            timings={"decode_ms": progress.decode_ms, "infer_ms": progress.infer_ms + (time.perf_counter() - t0) * 1e3},
        )
        return Scored(r, p.rgb, amap)

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
                nmap = render.resize_map(self.normalise(sc.amap - self.image_score.map_offset), size)
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


__all__ = ["MapSize", "ScoreResult", "Scored", "Scorer", "check_render_options"]
