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

from stpm.runtime import backends

from stpm import bundle

from stpm.imaging.scores import ImageScore, image_scores

from stpm.imaging.geometry import Geometry, TiledImages, TilingError, from_manifest, plan, score_from_manifest, stitch_all, tile_images
from stpm.imaging.decode import resize_rgb
from stpm.methods.maps import tile_score as image_score
from stpm.methods import registry
from stpm.bundle.names import (
    INPUT,
    REJECTED_INT8_ONNX,
    SCORER_FP16_ONNX,
    SCORER_INT8_ONNX,
    SCORER_ONNX,
    SCORER_OUTPUTS,
    STUDENT_ONNX,
    TEACHER_ONNX,
    feature_output,
)
from stpm.methods.loading import load_map

log = logging.getLogger(__name__)

SCORER_AXES = {n: {0: "N"} for n in (INPUT, *SCORER_OUTPUTS)}  # dynamic batch; the tile size is fixed
DEFAULT_ATOL = 1e-3  # normalised units: 0.5 is the threshold
DEFAULT_FP16_ATOL = 2e-2


class ExportParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the tolerance; `report` holds the numbers."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


class FusedScorer(nn.Module):
    """uint8 images [N, 3, S, S] -> (anomaly_map [N, S, S] raw, raw_score [N], score [N] in [0, 1]).

    `amap` is any method's map module (stpm.methods): float [N, 3, S, S] in [0, 1] -> [N, S, S]."""

    def __init__(self, amap: nn.Module, threshold: float, low: float, half: bool = False):
        super().__init__()
        self.amap = amap
        self.half = half
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(0.5 / max(threshold - low, 1e-12), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.to(torch.float16 if self.half else torch.float32) * (1.0 / 255.0)
        amap = self.amap(x).float()
        raw = image_score(amap)
        score = torch.clamp(0.5 + (raw - self.threshold) * self.scale, 0.0, 1.0)
        return amap, raw, score


def fused_scorer(amap: nn.Module, manifest: dict[str, Any], half: bool = False) -> FusedScorer:
    c = manifest["calibration"]
    return FusedScorer(amap, c["threshold"], c["low"], half=half).eval()


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


def synthetic_check_images(geometry: Geometry) -> list[np.ndarray]:
    """Stand-ins the geometry can plan: three square images and one 1:2.5 image at the native size."""
    if geometry.mode == "squash":
        return _synthetic_images(4, geometry.tile)
    native = int(np.ceil(geometry.tile / geometry.scale))
    return _synthetic_images(3, native) + _synthetic_images(1, (int(round(native * 2.5)), native), seed=1)


def tile_check_images(images: Sequence[np.ndarray], geometry: Geometry) -> TiledImages:
    """Check images -> their tiles; an image the geometry cannot cover is an error naming it."""
    imgs = [np.asarray(im, dtype=np.uint8) for im in images]
    for i, im in enumerate(imgs):
        try:
            plan(im.shape[0], im.shape[1], geometry)
        except TilingError as e:
            raise ValueError(f"check image {i}: {e}") from None
    return tile_images(imgs, geometry)


def nchw(tiles: np.ndarray) -> np.ndarray:
    """uint8 tiles [T, S, S, 3] -> [T, 3, S, S] for the graph."""
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


def prepare_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 RGB [H, W, 3] images -> uint8 [N, 3, size, size] (resized as the runtime does)."""
    return np.stack([resize_rgb(np.asarray(im, dtype=np.uint8), size).transpose(2, 0, 1) for im in images])


def _ort_session(path: Path, threads: int | None = None):
    """The reference session (ONNX Runtime, CPU provider), made by stpm.backends like every session."""
    return backends.cpu_session(path, threads)


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
    spec: ImageScore,
    threshold: float,
    low: float,
    atol: float,
) -> dict[str, Any]:
    """Compare stitched per-image maps and the image scores the manifest's score function gives."""
    scale = 0.5 / max(threshold - low, 1e-12)
    r0, r1 = image_scores(ref_maps, spec), image_scores(got_maps, spec)
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
    """A scorer session (any stpm.backends session) on a uint8 batch, `chunk` tiles per run."""
    outs = [session.run(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]
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
    precisions: Sequence[str] = ("bf16",),
) -> dict[str, Any]:
    """Write scorer.onnx (+ scorer_fp16.onnx; and for stpm bundles teacher.onnx, student.onnx: the
    feature pyramids) into `bundle_dir`, check
    parity against torch on `check_images` (uint8 RGB arrays, any size; None: 4 synthetic images),
    record everything under manifest["exports"] and return that dict. Raises ExportParityError
    if the fp32 scorer disagrees with torch beyond `atol`; the bundle is then left as it was.
    precisions: lower precisions of the same graph to check against fp32 on the check images and
    record (shipped or not): "bf16" (OpenVINO, see check_bf16)."""
    unknown = set(precisions) - {"bf16"}
    if unknown:
        raise ValueError(f"precisions: only bf16 is checked at export (int8: quantize_int8), got {sorted(unknown)}")
    bundle_dir = Path(bundle_dir)
    t0 = time.perf_counter()
    amap, typed = load_map(bundle_dir)
    manifest = typed.to_dict()
    graph_modules = registry.method(typed.method).feature_graphs(amap)  # e.g. STPM's teacher and student
    size = int(manifest["model"]["image_size"])
    geometry, spec = from_manifest(manifest), score_from_manifest(manifest)
    cal = manifest["calibration"]
    threshold, low = float(cal["threshold"]), float(cal["low"])
    digest = bundle.manifest_digest(manifest)
    scorer = fused_scorer(amap, manifest)

    example_u8 = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    example_f = torch.zeros(1, 3, size, size, dtype=torch.float32)
    files: dict[str, Any] = {}
    # Written under temporary names and renamed into place only once parity holds, so a failed
    # re-export leaves a bundle's previous exports (files and records) as they were.
    graphs = (*graph_modules, SCORER_ONNX)
    feature_graphs = [(fname, fname.removesuffix(".onnx"), module) for fname, module in graph_modules.items()]
    tmp = {f: bundle_dir / f".{f}.tmp" for f in graphs}
    feat_names: list[str] = []
    try:
        if feature_graphs:
            with torch.no_grad():
                feat_names = [feature_output(i) for i in range(len(feature_graphs[0][2](example_f)))]
        for fname, which, module in feature_graphs:
            axes = {INPUT: {0: "N", 2: "H", 3: "W"},
                    **{n: {0: "N", 2: f"H{i}", 3: f"W{i}"} for i, n in enumerate(feat_names)}}
            _onnx_export(module, example_f, tmp[fname], [INPUT], feat_names, axes,
                         opset)
            _set_metadata(tmp[fname], manifest, {"stpm.graph": which})

        _onnx_export(scorer, example_u8, tmp[SCORER_ONNX], [INPUT], SCORER_OUTPUTS, SCORER_AXES, opset)
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
        parity["images"] = image_parity(stitch_all(ref[0], tiled), stitch_all(got[0], tiled), spec,
                                        threshold, low, atol)
        parity["ok"] = bool(parity["ok"] and parity["images"]["ok"])
        # the feature graphs too: max abs difference over every pyramid level, on one image
        xf = torch.from_numpy(batch[:1]).float() / 255.0
        for fname, which, module in feature_graphs:
            with torch.no_grad():
                tf = module(xf)
            of = _ort_session(tmp[fname]).run_outputs(None, {INPUT: xf.numpy()})
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
            "inputs": {INPUT: {"dtype": "uint8", "shape": ["N", 3, size, size], "layout": "NCHW RGB"}},
            "outputs": {
                "anomaly_map": {"dtype": "float32", "shape": ["N", size, size], "units": "raw score"},
                "raw_score": {"dtype": "float32", "shape": ["N"], "units": "max of the tile's map"},
                "score": {"dtype": "float32", "shape": ["N"], "units": "normalised, 0.5 = threshold"},
            },
            "spatial_size": "fixed (the calibrated image_size, one tile); batch dynamic",
            "tiling": "outside the graph: stpm.tiling with manifest['tiling'] and model.image_score",
        },
        "parity": parity,
    }
    if feat_names:
        exports["features"] = {
            "inputs": {INPUT: {"dtype": "float32", "shape": ["N", 3, "H", "W"], "range": [0, 1]}},
            "outputs": feat_names,
        }

    if fp16:
        exports["fp16"] = _export_fp16(amap, manifest, bundle_dir, batch, ref, threshold, low, opset, fp16_atol)
        if exports["fp16"].get("file"):
            files[SCORER_FP16_ONNX] = _file_entry(bundle_dir / SCORER_FP16_ONNX)

    if not fp16:
        (bundle_dir / SCORER_FP16_ONNX).unlink(missing_ok=True)  # a re-export replaces every record
    (bundle_dir / SCORER_INT8_ONNX).unlink(missing_ok=True)  # re-quantise from the new fp32 graph
    exports["seconds"] = round(time.perf_counter() - t0, 2)
    manifest["exports"] = exports
    bundle.write_manifest(bundle_dir, manifest)
    log.info("exported %s/%s: parity %s", manifest.get("name"), manifest.get("version"), parity)
    if "bf16" in precisions:
        try:
            exports["bf16"] = check_bf16(bundle_dir, imgs)
        except Exception as e:  # noqa: BLE001 - a backend failure costs the bf16 option, never the export
            log.warning("bf16 check failed for %s: %s", bundle_dir, e)
            exports["bf16"] = {"backend": "openvino", "shipped": False, "measured": False,
                               "reason": f"check failed: {type(e).__name__}: {e}"}
            manifest["exports"] = exports
            bundle.write_manifest(bundle_dir, manifest)
    return exports


def _export_fp16(amap, manifest, bundle_dir, batch, ref, threshold, low, opset, atol) -> dict[str, Any]:
    """Half-precision backbones (map maths stay fp32) for GPUs. Parity against torch fp32 is measured
    with ONNX Runtime's CPU provider (tolerance `atol`, normalised units); a graph that fails it is
    deleted and recorded as not shipped. Where the CPU provider cannot run it, the file is kept and
    parity recorded as unmeasured."""
    import copy

    scorer = fused_scorer(copy.deepcopy(amap).half(), manifest, half=True)
    path = bundle_dir / SCORER_FP16_ONNX
    size = int(manifest["model"]["image_size"])
    _onnx_export(scorer, torch.zeros(1, 3, size, size, dtype=torch.uint8), path, [INPUT], SCORER_OUTPUTS, SCORER_AXES,
                 opset)
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


# ------------------------------------------------------------------------------ lower precisions

DEFAULT_MIN_AGREEMENT = 0.995  # decisions (raw score >= threshold) equal to fp32 on at least this share
DEFAULT_MAX_AUROC_MOVE = 0.005  # |AUROC(low precision) - AUROC(fp32)| at most, when labels are given
DEFAULT_MAX_SCORE_MOVE = 0.05  # |normalised score - fp32's| at most (0.5 = threshold), when no labels are
# given: a gate that means something on the few good images a training run keeps for the check


def decision_parity(
    ref_raw: np.ndarray, got_raw: np.ndarray, threshold: float, low: float, labels: Sequence[int] | None,
    min_agreement: float, max_auroc_move: float, max_score_move: float,
) -> dict[str, Any]:
    """Image scores of a lower precision vs fp32 (same images): decisions, AUROC, normalised score moves."""
    scale = 0.5 / max(threshold - low, 1e-12)
    norm = lambda r: np.clip(0.5 + (np.asarray(r, np.float64) - threshold) * scale, 0, 1)  # noqa: E731
    flips = (ref_raw >= threshold) != (got_raw >= threshold)
    out: dict[str, Any] = {
        "n_check_images": int(len(ref_raw)),
        "decision_agreement": float(1.0 - flips.mean()),
        "decision_flips": int(flips.sum()),
        "max_abs_score_vs_fp32": float(np.max(np.abs(norm(ref_raw) - norm(got_raw)))),
        "median_rel_raw_score_vs_fp32": float(np.median(np.abs(got_raw - ref_raw) / np.maximum(np.abs(ref_raw), 1e-12))),
    }
    ok = out["decision_agreement"] >= min_agreement
    if labels is None:  # good images only: few flips are possible, so the scores must stay close too
        ok = ok and out["max_abs_score_vs_fp32"] <= max_score_move
    else:
        from sklearn.metrics import roc_auc_score

        y = np.asarray(labels, dtype=int)
        out["auroc_fp32"] = float(roc_auc_score(y, ref_raw))
        out["auroc"] = float(roc_auc_score(y, got_raw))
        out["auroc_change"] = out["auroc"] - out["auroc_fp32"]
        ok = ok and abs(out["auroc_change"]) <= max_auroc_move
    out["criteria"] = {"min_decision_agreement": min_agreement, "max_auroc_move": max_auroc_move,
                       "max_abs_score_move": max_score_move}
    out["ok"] = bool(ok)
    return out


def session_image_scores(session, tiled: TiledImages, spec: ImageScore, chunk: int = 8) -> np.ndarray:
    """Per-image raw scores of a scorer session on tiled images (stitched, the manifest's score function)."""
    maps = ort_outputs(session, nchw(tiled.tiles), chunk)[0]
    return image_scores(stitch_all(maps, tiled), spec)


def check_bf16(
    bundle_dir: str | Path,
    check_images: Sequence[np.ndarray],
    check_labels: Sequence[int] | None = None,
    *,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_auroc_move: float = DEFAULT_MAX_AUROC_MOVE,
    max_score_move: float = DEFAULT_MAX_SCORE_MOVE,
    write: bool = True,
) -> dict[str, Any]:
    """bf16 on OpenVINO (same scorer.onnx, bf16 inference precision) vs fp32 ONNX Runtime on
    `check_images`: recorded under manifest exports["bf16"], `shipped` only if the criteria hold.
    Where this CPU has no bf16 instructions or openvino is missing nothing is measured: the record says
    so and bf16 is not shipped (re-run on a bf16 machine)."""
    bundle_dir = Path(bundle_dir)
    manifest = bundle.read_manifest(bundle_dir)
    exports = manifest.get("exports")
    if not exports or SCORER_ONNX not in exports.get("files", {}):
        raise bundle.BundleError(f"{bundle_dir}: export the fp32 scorer first")
    why = backends.openvino_available() or backends.cpu_precision_support("bf16")
    out: dict[str, Any] = {"backend": "openvino", "file": SCORER_ONNX, "cpu": backends.cpu_name(),
                           "method": "OpenVINO CPU, INFERENCE_PRECISION_HINT=bf16 on the fp32 graph"}
    # (a memory-bank graph: bf16 for the bank search only, f32 features; the session's `mode` says)
    if why:
        out.update(shipped=False, measured=False, reason=f"not measured: {why}")
    else:
        geometry, spec = from_manifest(manifest), score_from_manifest(manifest)
        cal = manifest["calibration"]
        tiled = tile_check_images(check_images, geometry)
        t0 = time.perf_counter()
        ref = session_image_scores(_ort_session(bundle_dir / SCORER_ONNX), tiled, spec)
        low = backends.create_session(bundle_dir / SCORER_ONNX, "openvino", "bf16")
        out["method"] = f"OpenVINO CPU, {low.mode} (the fp32 graph)"
        got = session_image_scores(low, tiled, spec)
        out["parity"] = decision_parity(ref, got, float(cal["threshold"]), float(cal["low"]), check_labels,
                                        min_agreement, max_auroc_move, max_score_move)
        out.update(measured=True, shipped=out["parity"]["ok"], seconds=round(time.perf_counter() - t0, 2))
    if write:
        exports["bf16"] = out
        manifest["exports"] = exports
        bundle.write_manifest(bundle_dir, manifest)
    log.info("bf16 for %s: %s", bundle_dir, "shipped" if out["shipped"] else "not shipped")
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
        return {INPUT: self.batch[self.i - 1:self.i]}

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
    engine: str = "onnxruntime",
) -> dict[str, Any]:
    """Static INT8 quantisation of scorer.onnx's convolutions (QDQ, calibrated on good images), then
    parity vs fp32 ONNX on `check_images`: decision agreement and, with labels (1 = anomalous),
    AUROC change. calibrate_method: "minmax", "percentile" (99.999th, robust to outlier activations)
    or "entropy"; skip_depthwise keeps depthwise convolutions (EfficientNet) in fp32, where per-channel
    int8 loses most. The file `scorer_int8.onnx` is kept and recorded under exports["int8"] with
    `shipped: True` only if agreement and AUROC hold; otherwise it is deleted and the numbers
    are recorded with `shipped: False` (keep_rejected: kept as REJECTED_INT8_ONNX, for timing).
    engine: "onnxruntime" (quantize_static; parity measured on ONNX Runtime) or "nncf" (NNCF
    post-training quantisation, mixed preset with bias correction; parity measured on OpenVINO, which
    runs it: the record's `backend` says where the int8 graph may be used). Returns exports["int8"]."""
    if engine not in ("onnxruntime", "nncf"):
        raise ValueError(f"engine must be onnxruntime or nncf, got {engine!r}")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bundle_dir = Path(bundle_dir)
    manifest = bundle.read_manifest(bundle_dir)
    exports = manifest.get("exports")
    if not exports or SCORER_ONNX not in exports.get("files", {}):
        raise bundle.BundleError(f"{bundle_dir}: export the fp32 scorer first")
    geometry, spec = from_manifest(manifest), score_from_manifest(manifest)
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

        excluded = []
        if engine == "nncf":
            _nncf_quantize(src, dst, nchw(tile_check_images(calibration_images, geometry).tiles))
        else:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if skip_depthwise and engine == "onnxruntime":
            g = onnx.load(str(pre), load_external_data=False).graph
            for n in g.node:
                group = next((a.i for a in n.attribute if a.name == "group"), 1)
                if n.op_type == "Conv" and group > 1:
                    excluded.append(n.name)
        if engine == "onnxruntime":
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
    got_session = (backends.create_session(dst, "openvino", "int8") if engine == "nncf" else _ort_session(dst))
    ref_t, got_t = ort_outputs(_ort_session(src), batch), ort_outputs(got_session, batch)
    ref_maps, got_maps = stitch_all(ref_t[0], tiled), stitch_all(got_t[0], tiled)
    ref_raw, got_raw = image_scores(ref_maps, spec), image_scores(got_maps, spec)
    scale = 0.5 / max(threshold - low, 1e-12)
    agree = float(np.mean((ref_raw >= threshold) == (got_raw >= threshold)))
    out: dict[str, Any] = {
        "file": SCORER_INT8_ONNX,
        "backend": "openvino" if engine == "nncf" else "onnxruntime",
        "method": (f"onnxruntime quantize_static, QDQ, Conv only, {calibrate_method} calibration, "
                   f"{'per-channel' if per_channel else 'per-tensor'} int8 weights, uint8 activations"
                   + (f", {len(excluded)} depthwise convs kept fp32" if excluded else "")
                   if engine == "onnxruntime" else
                   "NNCF post-training quantisation (mixed preset, fast bias correction), run on OpenVINO"),
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


def _outputs_not_cast(model):
    """Graph outputs made by a Cast become Identity nodes when the Cast changes nothing (torch's export
    emits such no-op Casts): NNCF's cast-removal pass expects every Cast output in value_info and
    fails on a graph output (nncf 2.x, KeyError). Same values, same names."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {t.name: t.type.tensor_type.elem_type
             for t in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    dtype.update({t.name: t.data_type for t in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in outputs:
            continue
        to = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)
        if to is not None and dtype.get(node.input[0]) == to:
            node.op_type = "Identity"
            del node.attribute[:]
    return model


def _nncf_quantize(src: Path, dst: Path, tiles: np.ndarray) -> None:
    """NNCF post-training quantisation of an ONNX scorer (QDQ ONNX out), calibrated on uint8 tiles."""
    import nncf
    import onnx

    model = _outputs_not_cast(onnx.load(str(src)))
    data = nncf.Dataset([tiles[i:i + 1] for i in range(len(tiles))], lambda x: {"images": x})
    q = nncf.quantize(model, data, subset_size=len(tiles), preset=nncf.QuantizationPreset.MIXED)
    onnx.save(q, str(dst))


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="NAME or NAME/VERSION in --models-dir, or a bundle folder")
    p.add_argument("--fp16", action="store_true", help="also write scorer_fp16.onnx (for GPUs)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check-dir", default=None, help="folder of real images for the parity check")
    p.add_argument("--check-count", type=int, default=8)
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="tolerance in normalised score units")
    p.add_argument("--int8-data", default=None,
                   help="MVTec category folder: also quantise to INT8 (calibrated on train/good), shipped "
                        "only if decisions and AUROC on its test set hold")
    p.add_argument("--int8-calibration-images", type=int, default=32)
    p.add_argument("--int8-engine", choices=("onnxruntime", "nncf"), default="nncf",
                   help="int8 quantiser: NNCF (run on OpenVINO) or ONNX Runtime's quantize_static")
    p.add_argument("--precisions", default="bf16",
                   help="lower precisions to check against fp32 and record ('bf16' or '' for none); with "
                        "--int8-data, bf16 is checked on that folder's labelled test set too")


def main(args: argparse.Namespace) -> int:
    import json

    from stpm.training.data import good_train_dir, list_images, test_samples
    from stpm.imaging.decode import read_image

    path = bundle.locate(args.models_dir, args.model)
    imgs = None
    if args.check_dir:
        files = list_images(args.check_dir, recursive=True)[:args.check_count]
        imgs = [read_image(f) for f in files]
        geometry = from_manifest(bundle.read_manifest(path))
        for f, im in zip(files, imgs):
            try:
                plan(im.shape[0], im.shape[1], geometry)
            except TilingError as e:
                raise ValueError(f"{f}: {e}") from None
    precisions = tuple(x for x in args.precisions.split(",") if x)
    try:
        ex = export_bundle(path, fp16=args.fp16, opset=args.opset, check_images=imgs, atol=args.atol,
                           precisions=precisions)
    except ExportParityError as e:
        print(f"export failed: {e}")
        print(json.dumps(e.report, indent=2))
        return 1
    print(f"exported {path}: {', '.join(ex['files'])}")
    print(json.dumps(ex["parity"], indent=2))
    if args.int8_data:
        train, test = list_images(good_train_dir(args.int8_data)), test_samples(args.int8_data)
        n = args.int8_calibration_images
        cal = train[:: max(1, len(train) // n)][:n]
        test_imgs = [read_image(s.path) for s in test]
        labels = [s.label for s in test]
        if "bf16" in precisions:
            print(json.dumps(check_bf16(path, test_imgs, labels), indent=2))
        q = quantize_int8(path, [read_image(p) for p in cal], test_imgs, labels, engine=args.int8_engine)
        print(json.dumps(q, indent=2))
    return 0


__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_FP16_ATOL",
    "nchw",
    "ort_outputs",
    "SCORER_FP16_ONNX",
    "SCORER_INT8_ONNX",
    "SCORER_ONNX",
    "ExportParityError",
    "FusedScorer",
    "add_arguments",
    "check_bf16",
    "decision_parity",
    "export_bundle",
    "fused_scorer",
    "main",
    "parity_report",
    "prepare_batch",
    "synthetic_check_images",
    "tile_check_images",
    "quantize_int8",
]
