"""ONNX export of a bundle (teacher, student, fused scorer) with a parity check against torch.

`scorer.onnx` is one graph: uint8 images [N, 3, S, S] -> /255 -> mean/std -> teacher + student ->
anomaly map -> image score -> calibrated normalised score, with normalisation and calibration baked
in as constants. The spatial size S is fixed to the manifest's `model.image_size` (the size the
student was trained and calibrated at; scores at another size are not calibrated, and a fixed shape
lets ONNX Runtime / TensorRT constant-fold the upsampling sizes and plan memory once). The batch axis
is dynamic. `teacher.onnx` / `student.onnx` take float images in [0, 1] [N, 3, H, W] (dynamic batch
and spatial size: they are fully convolutional) and return the feature pyramid.

Tiling (stpm.tiling) stays outside the graph: the graph scores S x S tiles; the runtime plans,
tiles, stitches and computes the image score with the manifest's score function. Its raw_score /
score outputs are per tile (the max of the tile's map); they are an image's score only for a
squash-geometry bundle scored with "max" (format 1 and `--tiling squash`).

Parity: ONNX Runtime (CPU) vs torch on the same uint8 batch of tiles cut from the check images, and
on the stitched per-image maps and image scores computed from them. Differences are reported in raw score
units and in normalised units (threshold = 0.5, `low` = 0); the tolerance `atol` is in normalised
units, so it means the same for every model whatever its raw score scale. Decisions (raw score >=
threshold) must be identical, except for images whose normalised score lies within `atol` of 0.5
on both sides (a flip there is numerical noise, reported as `borderline`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stpm import bundle
from stpm import tiling
from stpm.imageio import resize_rgb
from stpm.loss import anomaly_map, image_score
from stpm.model import STPM
from stpm.weights import load_model

log = logging.getLogger(__name__)

TEACHER_ONNX = "teacher.onnx"
STUDENT_ONNX = "student.onnx"
SCORER_ONNX = "scorer.onnx"
SCORER_FP16_ONNX = "scorer_fp16.onnx"
SCORER_INT8_ONNX = "scorer_int8.onnx"
REJECTED_INT8_ONNX = ".scorer_int8_rejected.onnx"  # kept only on request (benchmarks), never recorded
SCORER_OUTPUTS = ("anomaly_map", "raw_score", "score")
DEFAULT_ATOL = 1e-3  # normalised units: 0.5 is the threshold
DEFAULT_FP16_ATOL = 2e-2


class ExportParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the tolerance; `report` holds the numbers."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


class FusedScorer(nn.Module):
    """uint8 images [N, 3, S, S] -> (anomaly_map [N, S, S] raw, raw_score [N], score [N] in [0, 1])."""

    def __init__(
        self,
        model: STPM,
        image_size: int,
        combine: str,
        sigma: float,
        threshold: float,
        low: float,
        half: bool = False,
    ):
        super().__init__()
        self.model = model
        self.image_size = int(image_size)
        self.combine = combine
        self.sigma = float(sigma)
        self.half = half
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(0.5 / max(threshold - low, 1e-12), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.to(torch.float16 if self.half else torch.float32) * (1.0 / 255.0)
        t, s = self.model(x)
        amap = anomaly_map(t, s, (self.image_size, self.image_size), self.combine, self.sigma)
        raw = image_score(amap)
        score = torch.clamp(0.5 + (raw - self.threshold) * self.scale, 0.0, 1.0)
        return amap, raw, score


class _Features(nn.Module):
    def __init__(self, model: STPM, which: str):
        super().__init__()
        self.model = model
        self.which = which

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.model.teacher_features(x) if self.which == "teacher" else self.model.student_features(x)
        return tuple(f)


def fused_scorer(model: STPM, manifest: dict[str, Any], half: bool = False) -> FusedScorer:
    m, c = manifest["model"], manifest["calibration"]
    return FusedScorer(
        model, m["image_size"], m.get("combine", "product"), m.get("sigma", 0.0),
        c["threshold"], c["low"], half=half,
    ).eval()


def _onnx_export(module: nn.Module, example: torch.Tensor, path: Path, input_names, output_names,
                 dynamic_axes, opset: int) -> None:
    # The TorchScript-based exporter: a plain, fully static graph for these CNNs, and quick.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, still supported
        torch.onnx.export(
            module, (example,), str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def _set_metadata(path: Path, manifest: dict[str, Any], extra: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    props = {
        "stpm.name": str(manifest.get("name")),
        # a staged bundle (export inside publish) has no version yet; the digest does not depend on it
        "stpm.version": str(manifest.get("version") or "staged"),
        "stpm.manifest_digest": bundle.manifest_digest(manifest),
        "stpm.image_size": str(manifest["model"]["image_size"]),
        **extra,
    }
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "stpm"
    onnx.save(m, str(path))


def _synthetic_images(n: int, size: int | tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Deterministic stand-ins when no real images are given: smooth gradients plus noise."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(max(h, w) - 1, 1)
    out = []
    for i in range(n):
        base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 200 * ((i % 3) + 1) / 3
        img = base + rng.normal(0, 20, base.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def synthetic_check_images(geometry: tiling.Geometry) -> list[np.ndarray]:
    """Stand-ins the geometry can plan: three square images and one 1:2.5 image at the native size."""
    if geometry.mode == "squash":
        return _synthetic_images(4, geometry.tile)
    native = int(np.ceil(geometry.tile / geometry.scale))
    return _synthetic_images(3, native) + _synthetic_images(1, (int(round(native * 2.5)), native), seed=1)


def tile_check_images(images: Sequence[np.ndarray], geometry: tiling.Geometry) -> tiling.TiledImages:
    """Check images -> their tiles; an image the geometry cannot cover is an error naming it."""
    imgs = [np.asarray(im, dtype=np.uint8) for im in images]
    for i, im in enumerate(imgs):
        try:
            tiling.plan(im.shape[0], im.shape[1], geometry)
        except tiling.TilingError as e:
            raise ValueError(f"check image {i}: {e}") from None
    return tiling.tile_images(imgs, geometry)


def nchw(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles [T, S, S, 3] -> [T, 3, S, S] for the graph."""
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


def prepare_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] images -> uint8 [N, 3, size, size] (resized as the runtime does)."""
    return np.stack([resize_rgb(np.asarray(im, dtype=np.uint8), size).transpose(2, 0, 1) for im in images])


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity_report(
    ref: tuple[np.ndarray, np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray, np.ndarray],
    threshold: float,
    low: float,
    atol: float,
) -> dict[str, Any]:
    """Compare (map, raw, score) triples; differences in raw and normalised units, decisions."""
    scale = 0.5 / max(threshold - low, 1e-12)
    (m0, r0, s0), (m1, r1, s1) = ref, got
    d_map = float(np.max(np.abs(m0.astype(np.float64) - m1)))
    d_raw = float(np.max(np.abs(r0.astype(np.float64) - r1)))
    d_score = float(np.max(np.abs(s0.astype(np.float64) - s1)))
    dec0, dec1 = r0 >= threshold, r1 >= threshold
    flips = dec0 != dec1
    borderline = flips & (np.abs(s0 - 0.5) <= atol) & (np.abs(s1 - 0.5) <= atol)
    report = {
        "n_images": len(r0),
        "max_abs_map": d_map,
        "max_abs_raw_score": d_raw,
        "max_abs_map_normalised": d_map * scale,
        "max_abs_raw_score_normalised": d_raw * scale,
        "max_abs_score": d_score,
        "decision_flips": int(flips.sum()),
        "borderline_flips": int(borderline.sum()),
        "atol_normalised": atol,
        "raw_score_range": [float(r0.min()), float(r0.max())],
    }
    report["ok"] = bool(
        report["max_abs_map_normalised"] <= atol
        and report["max_abs_raw_score_normalised"] <= atol
        and d_score <= atol
        and report["decision_flips"] == report["borderline_flips"]
    )
    return report


def image_parity(
    ref_maps: Sequence[np.ndarray],
    got_maps: Sequence[np.ndarray],
    spec: tiling.ImageScore,
    threshold: float,
    low: float,
    atol: float,
) -> dict[str, Any]:
    """Compare stitched per-image maps and the image scores the manifest's score function gives."""
    scale = 0.5 / max(threshold - low, 1e-12)
    r0, r1 = tiling.image_scores(ref_maps, spec), tiling.image_scores(got_maps, spec)
    d_map = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(ref_maps, got_maps))
    d_raw = float(np.max(np.abs(r0 - r1)))
    s0 = np.clip(0.5 + (r0 - threshold) * scale, 0, 1)
    s1 = np.clip(0.5 + (r1 - threshold) * scale, 0, 1)
    flips = (r0 >= threshold) != (r1 >= threshold)
    borderline = flips & (np.abs(s0 - 0.5) <= atol) & (np.abs(s1 - 0.5) <= atol)
    out = {
        "n_images": len(r0),
        "map_shapes": sorted({f"{m.shape[0]}x{m.shape[1]}" for m in ref_maps}),
        "image_score": spec.method,
        "max_abs_map_normalised": d_map * scale,
        "max_abs_image_score_normalised": d_raw * scale,
        "decision_flips": int(flips.sum()),
        "borderline_flips": int(borderline.sum()),
    }
    out["ok"] = bool(out["max_abs_map_normalised"] <= atol and out["max_abs_image_score_normalised"] <= atol
                     and out["decision_flips"] == out["borderline_flips"])
    return out


def torch_reference(scorer: FusedScorer, batch: np.ndarray, chunk: int = 8):
    outs = []
    with torch.no_grad():
        for i in range(0, len(batch), chunk):
            outs.append([o.float().numpy() for o in scorer(torch.from_numpy(batch[i:i + chunk]))])
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(3))


def ort_outputs(session, batch: np.ndarray, chunk: int = 8):
    outs = [session.run(list(SCORER_OUTPUTS), {"images": batch[i:i + chunk]}) for i in range(0, len(batch), chunk)]
    return tuple(np.concatenate([o[k] for o in outs]).astype(np.float32) for k in range(3))


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": bundle.sha256_file(path), "bytes": path.stat().st_size}


def export_bundle(
    bundle_dir: str | Path,
    *,
    fp16: bool = False,
    opset: int = 17,
    check_images: Sequence[np.ndarray] | None = None,
    atol: float = DEFAULT_ATOL,
    fp16_atol: float = DEFAULT_FP16_ATOL,
) -> dict[str, Any]:
    """Write teacher.onnx, student.onnx, scorer.onnx (+ scorer_fp16.onnx) into `bundle_dir`, check
    parity against torch on `check_images` (uint8 RGB arrays, any size; None: 4 synthetic images),
    record everything under manifest["exports"] and return that dict. Raises ExportParityError
    if the fp32 scorer disagrees with torch beyond `atol`; the bundle is then left as it was."""
    bundle_dir = Path(bundle_dir)
    t0 = time.perf_counter()
    model, manifest = load_model(bundle_dir)
    size = int(manifest["model"]["image_size"])
    geometry, spec = tiling.from_manifest(manifest), tiling.score_from_manifest(manifest)
    cal = manifest["calibration"]
    threshold, low = float(cal["threshold"]), float(cal["low"])
    digest = bundle.manifest_digest(manifest)
    scorer = fused_scorer(model, manifest)

    example_u8 = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    example_f = torch.zeros(1, 3, size, size, dtype=torch.float32)
    files: dict[str, Any] = {}
    # Written under temporary names and renamed into place only once parity holds, so a failed
    # re-export leaves a bundle's previous exports (files and records) as they were.
    tmp = {f: bundle_dir / f".{f}.tmp" for f in (TEACHER_ONNX, STUDENT_ONNX, SCORER_ONNX)}
    try:
        n_layers = len(model.teacher_features(example_f))
        feat_names = [f"feat{i}" for i in range(n_layers)]
        for fname, which in ((TEACHER_ONNX, "teacher"), (STUDENT_ONNX, "student")):
            axes = {"images": {0: "N", 2: "H", 3: "W"},
                    **{n: {0: "N", 2: f"H{i}", 3: f"W{i}"} for i, n in enumerate(feat_names)}}
            _onnx_export(_Features(model, which).eval(), example_f, tmp[fname], ["images"], feat_names, axes, opset)
            _set_metadata(tmp[fname], manifest, {"stpm.graph": which})

        axes = {"images": {0: "N"}, "anomaly_map": {0: "N"}, "raw_score": {0: "N"}, "score": {0: "N"}}
        _onnx_export(scorer, example_u8, tmp[SCORER_ONNX], ["images"], SCORER_OUTPUTS, axes, opset)
        _set_metadata(tmp[SCORER_ONNX], manifest, {
            "stpm.graph": "scorer", "stpm.precision": "fp32",
            "stpm.threshold": repr(threshold), "stpm.low": repr(low),
        })

        source = "synthetic" if check_images is None else "given"
        imgs = synthetic_check_images(geometry) if check_images is None else list(check_images)
        if not imgs:
            raise ValueError("check_images is empty")
        tiled = tile_check_images(imgs, geometry)
        batch = nchw(tiled.tiles)
        ref = torch_reference(scorer, batch)
        got = ort_outputs(_ort_session(tmp[SCORER_ONNX]), batch)
        parity = parity_report(ref, got, threshold, low, atol)  # per tile
        parity["n_tiles"], parity["n_images"] = parity["n_images"], len(imgs)
        parity["check_images"] = source
        parity["images"] = image_parity(tiling.stitch_all(ref[0], tiled), tiling.stitch_all(got[0], tiled), spec,
                                        threshold, low, atol)
        parity["ok"] = bool(parity["ok"] and parity["images"]["ok"])
        # the feature graphs too: max abs difference over every pyramid level, on one image
        xf = torch.from_numpy(batch[:1]).float() / 255.0
        for fname, which in ((TEACHER_ONNX, "teacher"), (STUDENT_ONNX, "student")):
            with torch.no_grad():
                tf = _Features(model, which)(xf)
            of = _ort_session(tmp[fname]).run(None, {"images": xf.numpy()})
            parity[f"{which}_max_abs_feature"] = float(max(np.max(np.abs(a.numpy() - b)) for a, b in zip(tf, of)))
        if not parity["ok"]:
            im = parity["images"]
            raise ExportParityError(
                f"ONNX scorer disagrees with torch: tile map {parity['max_abs_map_normalised']:.2e}, "
                f"tile score {parity['max_abs_score']:.2e}, stitched map {im['max_abs_map_normalised']:.2e}, "
                f"image score {im['max_abs_image_score_normalised']:.2e} (normalised, atol {atol}), "
                f"{parity['decision_flips']} tile / {im['decision_flips']} image decision flip(s)", parity)
        for f, t in tmp.items():
            files[f] = _file_entry(t)
            os.replace(t, bundle_dir / f)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)

    exports: dict[str, Any] = {
        "created_at": bundle.utc_now(),
        "manifest_digest": digest,
        "opset": opset,
        "torch": torch.__version__,
        "files": files,
        "scorer": {
            "file": SCORER_ONNX,
            "inputs": {"images": {"dtype": "uint8", "shape": ["N", 3, size, size], "layout": "NCHW RGB"}},
            "outputs": {
                "anomaly_map": {"dtype": "float32", "shape": ["N", size, size], "units": "raw score"},
                "raw_score": {"dtype": "float32", "shape": ["N"], "units": "max of the tile's map"},
                "score": {"dtype": "float32", "shape": ["N"], "units": "normalised, 0.5 = threshold"},
            },
            "spatial_size": "fixed (the calibrated image_size, one tile); batch dynamic",
            "tiling": "outside the graph: stpm.tiling with manifest['tiling'] and model.image_score",
        },
        "features": {
            "inputs": {"images": {"dtype": "float32", "shape": ["N", 3, "H", "W"], "range": [0, 1]}},
            "outputs": feat_names,
        },
        "parity": parity,
    }

    if fp16:
        exports["fp16"] = _export_fp16(model, manifest, bundle_dir, batch, ref, threshold, low, opset, fp16_atol)
        if exports["fp16"].get("file"):
            files[SCORER_FP16_ONNX] = _file_entry(bundle_dir / SCORER_FP16_ONNX)

    if not fp16:
        (bundle_dir / SCORER_FP16_ONNX).unlink(missing_ok=True)  # a re-export replaces every record
    (bundle_dir / SCORER_INT8_ONNX).unlink(missing_ok=True)  # re-quantise from the new fp32 graph
    exports["seconds"] = round(time.perf_counter() - t0, 2)
    manifest["exports"] = exports
    bundle.write_manifest(bundle_dir, manifest)
    log.info("exported %s/%s: parity %s", manifest.get("name"), manifest.get("version"), parity)
    return exports


def _export_fp16(model, manifest, bundle_dir, batch, ref, threshold, low, opset, atol) -> dict[str, Any]:
    """Half-precision backbones (map maths stay fp32) for GPUs. Parity against torch fp32 is measured
    with ONNX Runtime's CPU provider (tolerance `atol`, normalised units); a graph that fails it is
    deleted and recorded as not shipped. Where the CPU provider cannot run it, the file is kept and
    parity recorded as unmeasured."""
    import copy

    half_model = copy.deepcopy(model).half()
    scorer = fused_scorer(half_model, manifest, half=True)
    path = bundle_dir / SCORER_FP16_ONNX
    size = int(manifest["model"]["image_size"])
    axes = {"images": {0: "N"}, "anomaly_map": {0: "N"}, "raw_score": {0: "N"}, "score": {0: "N"}}
    _onnx_export(scorer, torch.zeros(1, 3, size, size, dtype=torch.uint8), path, ["images"], SCORER_OUTPUTS, axes, opset)
    _set_metadata(path, manifest, {"stpm.graph": "scorer", "stpm.precision": "fp16",
                                   "stpm.threshold": repr(threshold), "stpm.low": repr(low)})
    out: dict[str, Any] = {"file": SCORER_FP16_ONNX, "shipped": True}
    try:
        got = ort_outputs(_ort_session(path), batch)
    except Exception as e:  # noqa: BLE001 - a CPU provider without fp16 kernels fails in many ways
        out["parity"] = None
        out["parity_note"] = f"not measurable on ONNX Runtime CPU here ({type(e).__name__}); measure on a GPU"
        return out
    out["parity"] = parity_report(ref, got, threshold, low, atol)
    out["parity"]["provider"] = "CPUExecutionProvider"
    out["parity"]["reference"] = "torch fp32"
    if not out["parity"]["ok"]:  # recorded, not shipped: Scorer(precision="fp16") then refuses the bundle
        path.unlink(missing_ok=True)
        out["file"], out["shipped"] = None, False
    return out


# ------------------------------------------------------------------------------------------ INT8

class _CalibrationReader:
    """quantize_static data reader: uint8 tiles of good images, one tile per call."""

    def __init__(self, batch: np.ndarray):
        self.batch = batch
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batch):
            return None
        self.i += 1
        return {"images": self.batch[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def quantize_int8(
    bundle_dir: str | Path,
    calibration_images: Sequence[np.ndarray],
    check_images: Sequence[np.ndarray],
    check_labels: Sequence[int] | None = None,
    *,
    max_decision_disagreement: float = 0.0,
    max_auroc_drop: float = 0.005,
    per_channel: bool = True,
    calibrate_method: str = "percentile",
    skip_depthwise: bool = False,
    keep_rejected: bool = False,
) -> dict[str, Any]:
    """Static INT8 quantisation of scorer.onnx's convolutions (QDQ, calibrated on good images), then
    parity vs fp32 ONNX on `check_images`: decision agreement and, with labels (1 = anomalous),
    AUROC change. calibrate_method: "minmax", "percentile" (99.999th, robust to outlier activations)
    or "entropy"; skip_depthwise keeps depthwise convolutions (EfficientNet) in fp32, where per-channel
    int8 loses most. The file `scorer_int8.onnx` is kept and recorded under exports["int8"] with
    `shipped: True` only if agreement and AUROC hold; otherwise it is deleted and the numbers
    are recorded with `shipped: False` (keep_rejected: kept as REJECTED_INT8_ONNX, for timing).
    Returns exports["int8"]."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bundle_dir = Path(bundle_dir)
    manifest = bundle.read_manifest(bundle_dir)
    exports = manifest.get("exports")
    if not exports or SCORER_ONNX not in exports.get("files", {}):
        raise bundle.BundleError(f"{bundle_dir}: export the fp32 scorer first")
    geometry, spec = tiling.from_manifest(manifest), tiling.score_from_manifest(manifest)
    cal = manifest["calibration"]
    threshold, low = float(cal["threshold"]), float(cal["low"])
    src, dst = bundle_dir / SCORER_ONNX, bundle_dir / SCORER_INT8_ONNX
    pre = bundle_dir / ".scorer_pre.onnx"
    t0 = time.perf_counter()
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method must be one of {', '.join(methods)}, got {calibrate_method!r}")
    try:
        import onnx

        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        excluded = []
        if skip_depthwise:
            g = onnx.load(str(pre), load_external_data=False).graph
            for n in g.node:
                group = next((a.i for a in n.attribute if a.name == "group"), 1)
                if n.op_type == "Conv" and group > 1:
                    excluded.append(n.name)
        quantize_static(
            str(pre), str(dst), _CalibrationReader(nchw(tile_check_images(calibration_images, geometry).tiles)),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"], per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate_method], nodes_to_exclude=excluded,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "CalibPercentile": 99.999},
        )
    finally:
        pre.unlink(missing_ok=True)
    _set_metadata(dst, manifest, {"stpm.graph": "scorer", "stpm.precision": "int8",
                                  "stpm.threshold": repr(threshold), "stpm.low": repr(low)})
    tiled = tile_check_images(check_images, geometry)
    batch = nchw(tiled.tiles)
    ref_t, got_t = ort_outputs(_ort_session(src), batch), ort_outputs(_ort_session(dst), batch)
    ref_maps, got_maps = tiling.stitch_all(ref_t[0], tiled), tiling.stitch_all(got_t[0], tiled)
    ref_raw, got_raw = tiling.image_scores(ref_maps, spec), tiling.image_scores(got_maps, spec)
    scale = 0.5 / max(threshold - low, 1e-12)
    agree = float(np.mean((ref_raw >= threshold) == (got_raw >= threshold)))
    out: dict[str, Any] = {
        "file": SCORER_INT8_ONNX,
        "method": f"onnxruntime quantize_static, QDQ, Conv only, {calibrate_method} calibration, "
                  f"{'per-channel' if per_channel else 'per-tensor'} int8 weights, uint8 activations"
                  + (f", {len(excluded)} depthwise convs kept fp32" if excluded else ""),
        "n_calibration_images": len(calibration_images),
        "n_check_images": len(check_images),
        "decision_agreement": agree,
        "max_abs_score_vs_fp32": float(np.max(np.abs(np.clip(0.5 + (ref_raw - threshold) * scale, 0, 1)
                                                     - np.clip(0.5 + (got_raw - threshold) * scale, 0, 1)))),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    ok = agree >= 1.0 - max_decision_disagreement
    if check_labels is not None:
        from sklearn.metrics import roc_auc_score

        y = np.asarray(check_labels, dtype=int)
        out["auroc_fp32"] = float(roc_auc_score(y, ref_raw))
        out["auroc_int8"] = float(roc_auc_score(y, got_raw))
        out["auroc_change"] = out["auroc_int8"] - out["auroc_fp32"]
        ok = ok and out["auroc_change"] >= -max_auroc_drop
    out["criteria"] = {"max_decision_disagreement": max_decision_disagreement, "max_auroc_drop": max_auroc_drop}
    out["shipped"] = bool(ok)
    if ok:
        exports["files"][SCORER_INT8_ONNX] = _file_entry(dst)
    else:
        if keep_rejected:
            os.replace(dst, bundle_dir / REJECTED_INT8_ONNX)
        dst.unlink(missing_ok=True)
        exports["files"].pop(SCORER_INT8_ONNX, None)
    exports["int8"] = out
    manifest["exports"] = exports
    bundle.write_manifest(bundle_dir, manifest)
    return out


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="NAME or NAME/VERSION in --models-dir, or a bundle folder")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--fp16", action="store_true", help="also write scorer_fp16.onnx (for GPUs)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check-dir", default=None, help="folder of real images for the parity check")
    p.add_argument("--check-count", type=int, default=8)
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="tolerance in normalised score units")
    p.add_argument("--int8-data", default=None,
                   help="MVTec category folder: also quantise to INT8 (calibrated on train/good), shipped "
                        "only if decisions and AUROC on its test set hold")
    p.add_argument("--int8-calibration-images", type=int, default=32)


def _bundle_path(model: str, models_dir: str) -> Path:
    p = Path(model)
    if (p / bundle.MANIFEST).is_file():
        return p
    return bundle.resolve(models_dir, model)


def image_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    from stpm.imageio import is_image_path

    files = sorted(p for p in Path(folder).rglob("*") if is_image_path(p))
    return files[:limit] if limit else files


def main(args: argparse.Namespace) -> int:
    import json

    from stpm.imageio import read_image

    path = _bundle_path(args.model, args.models_dir)
    imgs = None
    if args.check_dir:
        files = image_files(args.check_dir, args.check_count)
        imgs = [read_image(f) for f in files]
        geometry = tiling.from_manifest(bundle.read_manifest(path))
        for f, im in zip(files, imgs):
            try:
                tiling.plan(im.shape[0], im.shape[1], geometry)
            except tiling.TilingError as e:
                raise ValueError(f"{f}: {e}") from None
    try:
        ex = export_bundle(path, fp16=args.fp16, opset=args.opset, check_images=imgs, atol=args.atol)
    except ExportParityError as e:
        print(f"export failed: {e}")
        print(json.dumps(e.report, indent=2))
        return 1
    print(f"exported {path}: {', '.join(ex['files'])}")
    print(json.dumps(ex["parity"], indent=2))
    if args.int8_data:
        from stpm.bench import mvtec_split

        train, test, labels = mvtec_split(Path(args.int8_data))
        n = args.int8_calibration_images
        cal = train[:: max(1, len(train) // n)][:n]
        q = quantize_int8(path, [read_image(p) for p in cal], [read_image(p) for p in test], labels)
        print(json.dumps(q, indent=2))
    return 0


__all__ = [
    "SCORER_FP16_ONNX",
    "SCORER_INT8_ONNX",
    "SCORER_ONNX",
    "ExportParityError",
    "FusedScorer",
    "add_arguments",
    "export_bundle",
    "fused_scorer",
    "main",
    "parity_report",
    "prepare_batch",
    "synthetic_check_images",
    "tile_check_images",
    "quantize_int8",
]
