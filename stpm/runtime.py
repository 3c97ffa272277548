"""ONNX Runtime scorer: bundle -> scores, maps and heatmap PNGs. numpy, onnxruntime and Pillow only.

This is the service's scoring path; it must not import torch (a test checks `sys.modules`).

    scorer = Scorer("models/bottle/v3")
    [r] = scorer.score([png_bytes], map_size="input", overlay=True)
    r.score, r.is_anomaly, r.overlay_png

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
import onnxruntime as ort

from stpm import bundle, render, tiling
from stpm.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_rgb

log = logging.getLogger(__name__)

PRECISION_FILES = {"fp32": "scorer.onnx", "fp16": "scorer_fp16.onnx", "int8": "scorer_int8.onnx"}
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
OUTPUTS = ("anomaly_map", "raw_score", "score")
MapSize = None | str | tuple[int, int]  # None, "input", "model" (the map's own size at the model's scale), (H, W)


@dataclass
class ScoreResult:
    name: str
    raw_score: float
    score: float  # normalised: 0.5 = threshold
    is_anomaly: bool
    threshold: float  # raw units
    anomaly_map: np.ndarray | None = None  # float32 [H, W] in [0, 1] at the requested size
    overlay_png: bytes | None = None
    map_png: bytes | None = None  # grayscale 8-bit: the normalised map * 255 (128 = threshold)
    # decode_ms: decode + resize + tiling of this image; infer_ms: its tiles' share of the runs;
    # render_ms: stitching, score, map/PNGs
    timings: dict[str, float] = field(default_factory=dict)
    tiles: int = 1  # tiles the model scored for this image
    scaled_size: tuple[int, int] = (0, 0)  # (height, width) of the image at the model's scale: the map's own size


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Requested names ("auto", short aliases or full provider names) -> the installed ones, in order.

    "auto" means TensorRT -> CUDA -> CPU. Requested providers that are not installed are dropped with
    a warning; the CPU provider always closes the list as the last fallback. Unknown names raise."""
    wanted: list[str] = []
    explicit: set[str] = set()
    for r in requested:
        if r == "auto":
            wanted.extend(AUTO_PROVIDERS)
            continue
        full = PROVIDER_ALIASES.get(r.lower(), r)
        if not full.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {r!r}; use auto, {', '.join(PROVIDER_ALIASES)} or a full name")
        wanted.append(full)
        explicit.add(full)
    out: list[str] = []
    for p in wanted:
        if p in out:
            continue
        if p in available:
            out.append(p)
        elif p in explicit:
            log.warning("execution provider %s is not available in this onnxruntime (%s); falling back",
                        p, ", ".join(available))
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


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
    """A bundle's exported scorer on ONNX Runtime. Thread-safe for concurrent `score` calls
    (ONNX Runtime sessions are); `max_batch` images go through the graph per run."""

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: Sequence[str] = ("auto",),
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        precision: str = "fp32",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = 16,
        verify: bool = True,
        trt_cache_dir: str | Path | None = None,
    ):
        if precision not in PRECISION_FILES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_FILES)}, got {precision!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.bundle_dir = Path(bundle_dir)
        self.manifest: dict[str, Any] = bundle.read_manifest(self.bundle_dir)
        self.name: str = self.manifest["name"]
        self.version: str | None = self.manifest.get("version")
        self.image_size: int = int(self.manifest["model"]["image_size"])
        self.geometry: tiling.Geometry = tiling.from_manifest(self.manifest)
        self.image_score: tiling.ImageScore = tiling.score_from_manifest(self.manifest)
        # format 1 (and squash + max): one tile per image, whose graph score is the image's score
        self._graph_score = self.geometry.mode == "squash" and self.image_score.method == "max"
        cal = self.manifest["calibration"]
        self.threshold: float = float(cal["threshold"])
        self.low: float = float(cal["low"])
        self._scale = 0.5 / max(self.threshold - self.low, 1e-12)
        self.precision = precision
        self.max_pixels = max_pixels
        self.max_batch = max_batch

        fname = PRECISION_FILES[precision]
        path = self.bundle_dir / fname
        exports = self.manifest.get("exports") or {}
        recorded = (exports.get("files") or {}).get(fname)
        if not path.is_file() or recorded is None:
            hint = "run `stpm export`" if precision != "int8" else "int8 was not shipped for this bundle (see exports.int8)"
            raise bundle.BundleError(f"{self.bundle_dir}: no {precision} scorer ({fname}); {hint}")
        if verify and bundle.sha256_file(path) != recorded["sha256"]:
            raise bundle.BundleError(f"{self.bundle_dir}: {fname} does not match its sha256 in the manifest")

        available = ort.get_available_providers()
        chosen = choose_providers(providers, available)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = True
        so.enable_mem_pattern = True  # fixed spatial size: the memory plan is reused across runs
        so.log_severity_level = 3
        if intra_op_threads is not None:
            so.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            so.inter_op_num_threads = int(inter_op_threads)
        s = self.image_size
        opts: list[dict[str, Any]] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                o: dict[str, Any] = {
                    "trt_fp16_enable": precision == "fp16",
                    "trt_int8_enable": False,
                    "trt_profile_min_shapes": f"images:1x3x{s}x{s}",
                    "trt_profile_opt_shapes": f"images:{max_batch}x3x{s}x{s}",
                    "trt_profile_max_shapes": f"images:{max_batch}x3x{s}x{s}",
                }
                if trt_cache_dir is not None:
                    o.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir))
                opts.append(o)
            elif p == "CUDAExecutionProvider":
                opts.append({"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE"})
            else:
                opts.append({})
        self.session = ort.InferenceSession(str(path), so, providers=chosen, provider_options=opts)
        self.providers: list[str] = list(self.session.get_providers())
        if self.providers[0] != chosen[0]:
            log.warning("execution provider %s failed to initialise; running on %s", chosen[0], self.providers[0])
        log.info("scorer %s/%s (%s) on %s", self.name, self.version, precision, ", ".join(self.providers))
        self._io_binding = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self._check_metadata(path)

    def _check_metadata(self, path: Path) -> None:
        meta = self.session.get_modelmeta().custom_metadata_map
        digest = meta.get("stpm.manifest_digest")
        if digest != bundle.manifest_digest(self.manifest):  # the digest ignores the version name
            raise bundle.BundleError(f"{path} was exported from a different model (manifest digest mismatch)")

    # ------------------------------------------------------------------------------- inference

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [N, 3, S, S] -> (raw anomaly maps [N, S, S], raw scores [N], normalised scores [N])."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self._io_binding:
            io = self.session.io_binding()
            io.bind_cpu_input("images", batch)
            for o in OUTPUTS:
                io.bind_output(o, "cuda")
            self.session.run_with_iobinding(io)
            maps, raw, score = io.copy_outputs_to_cpu()
        else:
            maps, raw, score = self.session.run(list(OUTPUTS), {"images": batch})
        return maps, raw, score

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the graph once per batch size so the first request does not pay for allocation / tuning."""
        for n in batch_sizes:
            self.infer(np.zeros((n, 3, self.image_size, self.image_size), dtype=np.uint8))

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw scores or maps -> [0, 1] (low -> 0, threshold -> 0.5), as stpm.calibrate.normalize, float32."""
        return np.clip(0.5 + (np.asarray(x, dtype=np.float32) - np.float32(self.threshold)) * np.float32(self._scale),
                       0.0, 1.0)

    def plan(self, height: int, width: int) -> tiling.TilePlan:
        """The tile plan of a height x width input; raises tiling.TilingError naming the size and the limit."""
        return tiling.plan(height, width, self.geometry)

    def prepare(self, image: bytes | np.ndarray, name: str) -> tuple[np.ndarray, tiling.TilePlan]:
        """One input -> (uint8 RGB at its own size, its tile plan). Raises ImageDecodeError naming it."""
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
        except tiling.TilingError as e:
            raise ImageDecodeError(name, str(e)) from None
        return rgb, p

    def score(
        self,
        images: Sequence[bytes | np.ndarray],
        *,
        names: Sequence[str] | None = None,
        map_size: MapSize = None,
        overlay: bool = False,
        raw_map_png: bool = False,
    ) -> list[ScoreResult]:
        """Score images (encoded bytes or decoded arrays). map_size: None (no map), "input" (each image's
        own size), "model" (the map's own size: the image at the model's scale) or (H, W). Overlay / map
        PNGs are rendered at map_size, or at the input size when map_size is None. Raises
        ImageDecodeError for an undecodable input or one the geometry cannot cover (nothing is scored
        then). Tiles of all images go through the graph together, `max_batch` per run."""
        n = len(images)
        if names is None:
            names = [f"image{i}" for i in range(n)]
        elif len(names) != n:
            raise ValueError(f"{n} images but {len(names)} names")
        if not (map_size is None or map_size in ("input", "model") or
                (isinstance(map_size, (tuple, list)) and len(map_size) == 2 and all(int(v) >= 1 for v in map_size))):
            raise ValueError(f"map_size must be None, 'input', 'model' or (height, width), got {map_size!r}")

        rgbs, plans, decode_ms = [], [], []
        for img, nm in zip(images, names):
            t0 = time.perf_counter()
            rgb, p = self.prepare(img, nm)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            rgbs.append(rgb)
            plans.append(p)

        # tiles of all images, in order, through the graph `max_batch` at a time; an image is finished
        # (stitched, scored, rendered) as soon as its last tile has been scored
        parts: list[list[tuple[np.ndarray, float, float]]] = [[] for _ in range(n)]
        infer_ms = [0.0] * n
        results: list[ScoreResult | None] = [None] * n
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
                results[i] = self._finish(i, names[i], rgbs[i], plans[i], parts[i], map_size, overlay, raw_map_png)
                results[i].timings = {"decode_ms": decode_ms[i], "infer_ms": infer_ms[i],
                                      "render_ms": results[i].timings["render_ms"]}
                parts[i] = []

        for i in range(n):
            t0 = time.perf_counter()
            cut = tiling.tiles(rgbs[i], plans[i])
            decode_ms[i] += (time.perf_counter() - t0) * 1e3
            for t in cut:
                queue.append(t)
                owners.append(i)
                if len(queue) == self.max_batch:
                    run()
        if queue:
            run()
        return results  # type: ignore[return-value]

    def _finish(
        self, i: int, name: str, rgb: np.ndarray, p: tiling.TilePlan, parts: list[tuple[np.ndarray, float, float]],
        map_size: MapSize, overlay: bool, raw_map_png: bool,
    ) -> ScoreResult:
        """One image's tile outputs -> its ScoreResult (stitched map, image score, renders)."""
        t1 = time.perf_counter()
        amap = tiling.stitch(np.stack([m for m, _, _ in parts]), p)
        if self._graph_score:
            raw, score = parts[0][1], parts[0][2]
        else:
            raw = tiling.image_score(amap, self.image_score)
            score = float(self.normalise(np.float32(raw)))
        r = ScoreResult(
            name=name, raw_score=raw, score=score, is_anomaly=bool(raw >= self.threshold), threshold=self.threshold,
            tiles=p.n_tiles, scaled_size=(p.h, p.w),
        )
        if map_size is not None or overlay or raw_map_png:
            if map_size in (None, "input"):
                size = rgb.shape[:2]
            elif map_size == "model":
                size = (p.h, p.w)
            else:
                size = (int(map_size[0]), int(map_size[1]))
            nmap = render.resize_map(self.normalise(amap), size)
            if map_size is not None:
                r.anomaly_map = nmap
            if overlay:
                base = rgb if rgb.shape[:2] == size else resize_rgb(rgb, size)
                r.overlay_png = render.png_bytes(render.overlay(base, nmap))
            if raw_map_png:
                r.map_png = render.png_bytes(render.to_uint8(nmap))
        r.timings = {"render_ms": (time.perf_counter() - t1) * 1e3}
        return r

    def __repr__(self) -> str:
        return f"Scorer({self.name}/{self.version}, {self.precision}, {self.providers[0]})"


__all__ = ["PRECISION_FILES", "ScoreResult", "Scorer", "as_rgb", "choose_providers"]
