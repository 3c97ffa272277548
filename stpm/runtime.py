"""ONNX Runtime scorer: bundle -> scores, maps and heatmap PNGs. numpy, onnxruntime and Pillow only.

This is the service's scoring path; it must not import torch (a test checks `sys.modules`).

    scorer = Scorer("models/bottle/v3")
    [r] = scorer.score([png_bytes], map_size="input", overlay=True)
    r.score, r.is_anomaly, r.overlay_png

The graph (`scorer.onnx`, see stpm.export) takes uint8 [N, 3, S, S] and carries preprocessing and
calibration; this module decodes, resizes to S, batches, and renders.
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

from stpm import bundle, render
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
MapSize = None | str | tuple[int, int]


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
    # decode_ms: decode + resize of this image; infer_ms: its share of its batch's run; render_ms: map/PNGs
    timings: dict[str, float] = field(default_factory=dict)


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

    def prepare(self, image: bytes | np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One input -> (uint8 RGB at its own size, uint8 [3, S, S] for the graph)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            rgb = decode_image(bytes(image), name, self.max_pixels)
        elif isinstance(image, np.ndarray):
            rgb = as_rgb(image, name)
            if rgb.shape[0] * rgb.shape[1] > self.max_pixels:
                raise ImageDecodeError(name, f"{rgb.shape[1]}x{rgb.shape[0]} exceeds the limit of {self.max_pixels} pixels")
        else:
            raise ImageDecodeError(name, f"expected bytes or a numpy array, got {type(image).__name__}")
        return rgb, resize_rgb(rgb, self.image_size).transpose(2, 0, 1)

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
        own size) or (H, W). Overlay / map PNGs are rendered at map_size, or at the input size when
        map_size is None. Raises ImageDecodeError for an undecodable input (nothing is scored then)."""
        n = len(images)
        if names is None:
            names = [f"image{i}" for i in range(n)]
        elif len(names) != n:
            raise ValueError(f"{n} images but {len(names)} names")
        if not (map_size is None or map_size == "input" or
                (isinstance(map_size, (tuple, list)) and len(map_size) == 2 and all(int(v) >= 1 for v in map_size))):
            raise ValueError(f"map_size must be None, 'input' or (height, width), got {map_size!r}")

        rgbs, small, decode_ms = [], [], []
        for img, nm in zip(images, names):
            t0 = time.perf_counter()
            rgb, x = self.prepare(img, nm)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            rgbs.append(rgb)
            small.append(x)

        results: list[ScoreResult] = []
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            t0 = time.perf_counter()
            maps, raw, score = self.infer(np.stack(small[start:stop]))
            infer_ms = (time.perf_counter() - t0) * 1e3 / (stop - start)
            for j, i in enumerate(range(start, stop)):
                t1 = time.perf_counter()
                r = ScoreResult(
                    name=names[i], raw_score=float(raw[j]), score=float(score[j]),
                    is_anomaly=bool(raw[j] >= self.threshold), threshold=self.threshold,
                )
                if map_size is not None or overlay or raw_map_png:
                    size = rgbs[i].shape[:2] if map_size in (None, "input") else (int(map_size[0]), int(map_size[1]))
                    amap = render.resize_map(self.normalise(maps[j]), size)
                    if map_size is not None:
                        r.anomaly_map = amap
                    if overlay:
                        base = rgbs[i] if rgbs[i].shape[:2] == size else resize_rgb(rgbs[i], size)
                        r.overlay_png = render.png_bytes(render.overlay(base, amap))
                    if raw_map_png:
                        r.map_png = render.png_bytes(render.to_uint8(amap))
                r.timings = {"decode_ms": decode_ms[i], "infer_ms": infer_ms,
                             "render_ms": (time.perf_counter() - t1) * 1e3}
                results.append(r)
        return results

    def __repr__(self) -> str:
        return f"Scorer({self.name}/{self.version}, {self.precision}, {self.providers[0]})"


__all__ = ["PRECISION_FILES", "ScoreResult", "Scorer", "as_rgb", "choose_providers"]
