"""ONNX export of a bundle (teacher, student, fused scorer) with a parity check against torch.

`scorer.onnx` is one graph: uint8 images [N, 3, S, S] -> /255 -> mean/std -> teacher + student ->
anomaly map -> image score -> calibrated normalised score, with normalisation and calibration baked
in as constants. The spatial size S is fixed to the manifest's `model.image_size` (the size the
student was trained and calibrated at; scores at another size are not calibrated, and a fixed shape
lets ONNX Runtime / TensorRT constant-fold the upsampling sizes and plan memory once). The batch axis
is dynamic. `teacher.onnx` / `student.onnx` take float images in [0, 1] [N, 3, H, W] (dynamic batch
and spatial size: they are fully convolutional) and return the feature pyramid.

Tiling (stpm.imaging.geometry) stays outside the graph: the graph scores S x S tiles; the runtime plans,
tiles, stitches and computes the image score with the manifest's score function. Its raw_score /
score outputs are per tile (the max of the tile's map); they are an image's score only for a
squash-geometry bundle scored with "max" (format 1 and `--tiling squash`).

Parity (stpm.export.parity): ONNX Runtime (CPU) vs torch on the same uint8 tiles cut from the check
images, and on the stitched per-image maps and image scores computed from them; the tolerance `atol`
is in normalised units. Lower precisions: stpm.export.precision.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stpm import bundle
from stpm.bundle.calibration import Calibration
from stpm.bundle.manifest import Manifest
from stpm.bundle.names import (
    INPUT,
    SCORER_FP16_ONNX,
    SCORER_INT8_ONNX,
    SCORER_ONNX,
    SCORER_OUTPUTS,
    feature_output,
)
from stpm.export.parity import (
    DEFAULT_ATOL,
    DEFAULT_FP16_ATOL,
    ExportParityError,
    image_parity,
    ort_outputs,
    parity_report,
    synthetic_check_images,
    tile_check_images,
    torch_reference,
)
from stpm.export.precision import check_bf16_after_export
from stpm.export.records import bundle_label, file_entry, scorer_metadata, set_metadata
from stpm.imaging.geometry import TiledImages, stitch_all
from stpm.methods import registry
from stpm.methods.loading import load_map
from stpm.methods.maps import tile_score
from stpm.runtime.sessions import cpu_session

log = logging.getLogger(__name__)

SCORER_AXES = {n: {0: "N"} for n in (INPUT, *SCORER_OUTPUTS)}  # dynamic batch; the tile size is fixed
# Warnings the TorchScript exporter prints for these graphs, known and harmless: (category, message, module
# that warns). The methods' Python branches on a map's spatial size (fixed in the scorer: tracing keeps the
# branch every run takes), Slice ops that are merely not constant-folded, and the deprecation notices of
# the exporter (still supported) and of its internals.
KNOWN_EXPORT_WARNINGS = (
    (torch.jit.TracerWarning, r"Converting a tensor to a Python boolean", r"stpm\.methods\."),
    (UserWarning, r"Constant folding - Only steps=1 can be constant folded", r"torch\.onnx\."),
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export", r""),
    (DeprecationWarning, r"", r"torch\.onnx\."),
)


class FusedScorer(nn.Module):
    """uint8 images [N, 3, S, S] -> (anomaly_map [N, S, S] raw, raw_score [N], score [N] in [0, 1]).

    `amap` is any method's map module (stpm.methods): float [N, 3, S, S] in [0, 1] -> [N, S, S]."""

    def __init__(self, amap: nn.Module, calibration: Calibration, half: bool = False):
        super().__init__()
        self.amap = amap
        self.half = half
        self.register_buffer("threshold", torch.tensor(calibration.threshold, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(calibration.scale, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.to(torch.float16 if self.half else torch.float32) * (1.0 / 255.0)
        amap = self.amap(x).float()
        raw = tile_score(amap)
        score = torch.clamp(0.5 + (raw - self.threshold) * self.scale, 0.0, 1.0)
        return amap, raw, score


def fused_scorer(amap: nn.Module, manifest: Manifest, half: bool = False) -> FusedScorer:
    return FusedScorer(amap, manifest.calibration, half=half).eval()


@dataclass
class Graph:
    """One graph of a bundle: its file, the module it is exported from and how."""

    file: str
    module: nn.Module
    example: torch.Tensor
    outputs: list[str]
    axes: dict[str, dict[int, str]]
    metadata: dict[str, str]  # graph-specific ONNX metadata, beside the bundle's (set_metadata)


def onnx_export(graph: Graph, path: Path, opset: int) -> None:
    """The TorchScript-based exporter (a plain, fully static graph for these CNNs, and quick), quiet
    about the warnings known to be harmless here (KNOWN_EXPORT_WARNINGS); any other one is shown."""
    with torch.no_grad(), warnings.catch_warnings():
        for category, message, module in KNOWN_EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        torch.onnx.export(
            graph.module, (graph.example,), str(path), input_names=[INPUT], output_names=list(graph.outputs),
            dynamic_axes=graph.axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def graphs_of(amap: nn.Module, scorer: FusedScorer, manifest: Manifest) -> list[Graph]:
    """The graphs a bundle exports: its method's feature graphs (STPM: teacher, student), then the scorer."""
    size = manifest.model.image_size
    out = []
    features = registry.method(manifest.method).feature_graphs(amap)  # file name -> module
    if features:
        example = torch.zeros(1, 3, size, size, dtype=torch.float32)
        with torch.no_grad():
            feats = [feature_output(i) for i in range(len(next(iter(features.values()))(example)))]
        axes = {INPUT: {0: "N", 2: "H", 3: "W"}, **{n: {0: "N", 2: f"H{i}", 3: f"W{i}"} for i, n in enumerate(feats)}}
        out += [Graph(file, module.eval(), example, feats, axes, {"stpm.graph": file.removesuffix(".onnx")})
                for file, module in features.items()]
    out.append(Graph(SCORER_ONNX, scorer, torch.zeros(1, 3, size, size, dtype=torch.uint8), list(SCORER_OUTPUTS),
                     SCORER_AXES, scorer_metadata(manifest.calibration, "fp32")))
    return out


def check_parity(graphs: list[Graph], paths: dict[str, Path], tiled: TiledImages, manifest: Manifest,
                 atol: float) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The exported graphs at `paths` against their torch modules on the check tiles -> (the parity
    record, torch's scorer outputs). Raises ExportParityError beyond `atol` (normalised units)."""
    calibration = manifest.calibration
    scorer = next(g for g in graphs if g.file == SCORER_ONNX)
    ref = torch_reference(scorer.module, tiled)
    got = ort_outputs(cpu_session(paths[SCORER_ONNX]), tiled)
    parity = parity_report(ref, got, calibration, atol, manifest.image_score.map_offset)  # per tile
    parity["n_tiles"], parity["n_images"] = parity["n_images"], len(tiled)
    parity["images"] = image_parity(stitch_all(ref[0], tiled), stitch_all(got[0], tiled),
                                    manifest.image_score, calibration, atol)
    parity["ok"] = bool(parity["ok"] and parity["images"]["ok"])
    # the feature graphs too: max abs difference over every pyramid level, on one tile
    x = torch.from_numpy(tiled.tiles[:1].transpose(0, 3, 1, 2).copy()).float() / 255.0
    for g in graphs:
        if g is not scorer:
            with torch.no_grad():
                ref_f = g.module(x)
            got_f = cpu_session(paths[g.file]).run_outputs(None, {INPUT: x.numpy()})
            parity[f"{g.metadata['stpm.graph']}_max_abs_feature"] = float(
                max(np.max(np.abs(a.numpy() - b)) for a, b in zip(ref_f, got_f)))
    if not parity["ok"]:
        im = parity["images"]
        raise ExportParityError(
            f"ONNX scorer disagrees with torch: tile map {parity['max_abs_map_normalised']:.2e}, "
            f"tile score {parity['max_abs_score']:.2e}, stitched map {im['max_abs_map_normalised']:.2e}, "
            f"image score {im['max_abs_image_score_normalised']:.2e} (normalised, atol {atol}), "
            f"{parity['decision_flips']} tile / {im['decision_flips']} image decision flip(s)", parity)
    return parity, ref


def _write_checked(bundle_dir: Path, graphs: list[Graph], manifest: Manifest, tiled: TiledImages,
                   opset: int, atol: float) -> tuple[dict[str, Any], dict[str, Any], tuple]:
    """Export every graph under a temporary name and move them into place only once parity holds, so a
    failed re-export leaves a bundle's previous exports (files and records) as they were.
    -> (file records, parity record, torch's scorer outputs)."""
    tmp = {g.file: bundle_dir / f".{g.file}.tmp" for g in graphs}
    try:
        for g in graphs:
            onnx_export(g, tmp[g.file], opset)
            set_metadata(tmp[g.file], manifest, g.metadata)
        parity, ref = check_parity(graphs, tmp, tiled, manifest, atol)
        files = {}
        for f, t in tmp.items():
            files[f] = file_entry(t)
            os.replace(t, bundle_dir / f)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    return files, parity, ref


def exports_record(manifest: Manifest, graphs: list[Graph], opset: int, files: dict[str, Any],
                   parity: dict[str, Any]) -> dict[str, Any]:
    """manifest["exports"]: what was written, from which manifest, and how it held against torch."""
    size = manifest.model.image_size
    exports: dict[str, Any] = {
        "created_at": bundle.utc_now(),
        "manifest_digest": manifest.digest(),
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
            "tiling": "outside the graph: stpm.imaging.geometry with manifest['tiling'] and model.image_score",
        },
        "parity": parity,
    }
    features = [g for g in graphs if g.file != SCORER_ONNX]
    if features:
        exports["features"] = {
            "inputs": {INPUT: {"dtype": "float32", "shape": ["N", 3, "H", "W"], "range": [0, 1]}},
            "outputs": features[0].outputs,
        }
    return exports


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
    feature pyramids) into `bundle_dir`, check parity against torch on `check_images` (uint8 RGB arrays,
    any size; None: 4 synthetic images), record everything under manifest["exports"] and return that
    dict. Raises ExportParityError if the fp32 scorer disagrees with torch beyond `atol`; the bundle is
    then left as it was. precisions: lower precisions of the same graph to check against fp32 on the
    check images and record (shipped or not): "bf16" (OpenVINO, see stpm.export.precision.check_bf16)."""
    unknown = set(precisions) - {"bf16"}
    if unknown:
        raise ValueError(f"precisions: only bf16 is checked at export (int8: quantize_int8), got {sorted(unknown)}")
    if check_images is not None and not len(check_images):
        raise ValueError("check_images is empty")
    bundle_dir = Path(bundle_dir)
    t0 = time.perf_counter()
    amap, manifest = load_map(bundle_dir)
    imgs = synthetic_check_images(manifest.geometry) if check_images is None else list(check_images)
    tiled = tile_check_images(imgs, manifest.geometry)
    graphs = graphs_of(amap, fused_scorer(amap, manifest), manifest)
    files, parity, ref = _write_checked(bundle_dir, graphs, manifest, tiled, opset, atol)
    parity["check_images"] = "synthetic" if check_images is None else "given"
    exports = exports_record(manifest, graphs, opset, files, parity)
    if fp16:
        exports["fp16"] = _export_fp16(amap, manifest, bundle_dir, tiled, ref, opset, fp16_atol)
        if exports["fp16"].get("file"):
            files[SCORER_FP16_ONNX] = file_entry(bundle_dir / SCORER_FP16_ONNX)
    else:
        (bundle_dir / SCORER_FP16_ONNX).unlink(missing_ok=True)  # a re-export replaces every record
    (bundle_dir / SCORER_INT8_ONNX).unlink(missing_ok=True)  # re-quantise from the new fp32 graph
    exports["seconds"] = round(time.perf_counter() - t0, 2)
    bundle.write_manifest(bundle_dir, {**manifest.to_dict(), "exports": exports})
    log.info("exported %s: %s; parity with torch on %d check images: max normalised difference %.1e "
             "(tolerance %g), %d decision flips", bundle_label(manifest), ", ".join(files), len(tiled),
             max(parity["max_abs_map_normalised"], parity["images"]["max_abs_image_score_normalised"]), atol,
             parity["images"]["decision_flips"])
    if "bf16" in precisions:
        exports["bf16"] = check_bf16_after_export(bundle_dir, imgs)
    return exports


def _export_fp16(amap: nn.Module, manifest: Manifest, bundle_dir: Path, tiled: TiledImages, ref: tuple,
                 opset: int, atol: float) -> dict[str, Any]:
    """Half-precision backbones (map maths stay fp32) for GPUs. Parity against torch fp32 is measured
    with ONNX Runtime's CPU provider (tolerance `atol`, normalised units); a graph that fails it is
    deleted and recorded as not shipped. Where the CPU provider cannot run it, the file is kept and
    parity recorded as unmeasured."""
    calibration = manifest.calibration
    scorer = FusedScorer(copy.deepcopy(amap).half(), calibration, half=True).eval()
    path = bundle_dir / SCORER_FP16_ONNX
    size = manifest.model.image_size
    onnx_export(Graph(SCORER_FP16_ONNX, scorer, torch.zeros(1, 3, size, size, dtype=torch.uint8),
                      list(SCORER_OUTPUTS), SCORER_AXES, {}), path, opset)
    set_metadata(path, manifest, scorer_metadata(calibration, "fp16"))
    out: dict[str, Any] = {"file": SCORER_FP16_ONNX, "shipped": True}
    try:
        got = ort_outputs(cpu_session(path), tiled)
    except Exception as e:  # noqa: BLE001 - a CPU provider without fp16 kernels fails in many ways
        out["parity"] = None
        out["parity_note"] = f"not measurable on ONNX Runtime CPU here ({type(e).__name__}); measure on a GPU"
        return out
    out["parity"] = {**parity_report(ref, got, calibration, atol, manifest.image_score.map_offset),
                     "provider": "CPUExecutionProvider",
                     "reference": "torch fp32"}
    if not out["parity"]["ok"]:  # recorded, not shipped: Scorer(precision="fp16") then refuses the bundle
        path.unlink(missing_ok=True)
        out["file"], out["shipped"] = None, False
    return out


__all__ = ["FusedScorer", "Graph", "KNOWN_EXPORT_WARNINGS", "SCORER_AXES", "export_bundle", "fused_scorer",
           "onnx_export"]
