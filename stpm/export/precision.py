"""Lower precisions of an exported scorer, each shipped only where it holds against fp32 (parity.Gate):

- bf16: the same scorer.onnx run by OpenVINO at bf16 inference precision, on CPUs with bf16 instructions;
- int8: scorer_int8.onnx, static quantisation calibrated on good images, by ONNX Runtime's
  quantize_static (run on ONNX Runtime) or NNCF (run on OpenVINO).

Each writes its record under manifest["exports"] (bf16, int8) whether it ships or not; the runtime
(stpm.runtime.choice) uses a precision only where the record says `shipped`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stpm.bundle.manifest import Manifest
from stpm.bundle.names import INPUT, REJECTED_INT8_ONNX, SCORER_INT8_ONNX, SCORER_ONNX
from stpm.export.parity import Gate, nchw, session_image_scores, tile_check_images
from stpm.export.records import (
    bundle_label,
    exported_manifest,
    file_entry,
    record_export,
    scorer_metadata,
    set_metadata,
)
from stpm.runtime import cpu
from stpm.runtime.sessions import cpu_session, create_session

log = logging.getLogger(__name__)

DEFAULT_MIN_AGREEMENT = 0.995  # decisions (raw score >= threshold) equal to fp32 on at least this share
DEFAULT_MAX_AUROC_MOVE = 0.005  # |AUROC(low precision) - AUROC(fp32)| at most, when labels are given
DEFAULT_MAX_SCORE_MOVE = 0.05  # |normalised score - fp32's| at most (0.5 = threshold), when no labels are
# given: a gate that means something on the few good images a training run keeps for the check
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT8_ENGINES = ("onnxruntime", "nncf")


def _verdict(precision: str, manifest: Manifest, record: dict[str, Any], gate: dict | None) -> str:
    """One log line: shipped or not, and why not in words a user can act on."""
    head = f"{precision} for {bundle_label(manifest)}: " + ("shipped" if record["shipped"] else "not shipped")
    if gate is None:
        return head if record["shipped"] else f"{head}: {record.get('reason', '')}"
    c = gate["criteria"]
    parts = [f"decision agreement {gate['decision_agreement']:.3f} (at least {c['min_decision_agreement']:g})"]
    if "auroc_change" in gate:
        rise = f", at most +{c['max_auroc_rise']:g}" if c["max_auroc_rise"] is not None else ""
        parts.append(f"AUROC change {gate['auroc_change']:+.4f} (at least -{c['max_auroc_drop']:g}{rise})")
    elif c["max_abs_score_move"] is not None:
        parts.append(f"normalised scores moved up to {gate['max_abs_score_vs_fp32']:.3f} "
                     f"(at most {c['max_abs_score_move']:g})")
    return f"{head}: against fp32 on {gate['n_check_images']} check images, " + "; ".join(parts)


# ------------------------------------------------------------------------------------------ bf16

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
    `check_images`: recorded under manifest exports["bf16"], `shipped` only if the gate holds (AUROC may
    move by max_auroc_move either way). Where this CPU has no bf16 instructions or openvino is missing
    nothing is measured: the record says so and bf16 is not shipped (re-run on a bf16 machine)."""
    bundle_dir = Path(bundle_dir)
    manifest = exported_manifest(bundle_dir)
    why = "; ".join(r for r in (cpu.openvino_available(), cpu.cpu_precision_support("bf16")) if r)
    out: dict[str, Any] = {"backend": "openvino", "file": SCORER_ONNX, "cpu": cpu.cpu_name(),
                           "method": "OpenVINO CPU, INFERENCE_PRECISION_HINT=bf16 on the fp32 graph"}
    # (a memory-bank graph: bf16 for the bank search only, f32 features; the session's `mode` says)
    if why:
        out.update(shipped=False, measured=False, reason=f"not measured: {why}")
    else:
        t0 = time.perf_counter()
        gate = Gate(min_agreement, max_auroc_drop=max_auroc_move, max_auroc_rise=max_auroc_move,
                    max_score_move=max_score_move)
        low = create_session(bundle_dir / SCORER_ONNX, "openvino", "bf16")
        out["method"] = f"OpenVINO CPU, {low.mode} (the fp32 graph)"
        out["parity"] = _judge(bundle_dir, manifest, low, check_images, check_labels, gate)
        out.update(measured=True, shipped=out["parity"]["ok"], seconds=round(time.perf_counter() - t0, 2))
    if write:
        record_export(bundle_dir, manifest, "bf16", out)
    log.info("%s", _verdict("bf16", manifest, out, out.get("parity")))
    return out


def check_bf16_after_export(bundle_dir: Path, check_images: Sequence[np.ndarray]) -> dict[str, Any]:
    """check_bf16 on the export's check images; a backend failure costs the bf16 option, never the export."""
    try:
        return check_bf16(bundle_dir, check_images)
    except Exception as e:  # noqa: BLE001 - recorded as not shipped, with the reason
        manifest = exported_manifest(bundle_dir)
        log.warning("bf16 check failed for %s: %s", bundle_label(manifest), e)
        out = {"backend": "openvino", "shipped": False, "measured": False,
               "reason": f"check failed: {type(e).__name__}: {e}"}
        record_export(bundle_dir, manifest, "bf16", out)
        return out


def _judge(bundle_dir: Path, manifest: Manifest, session, images: Sequence[np.ndarray],
           labels: Sequence[int] | None, gate: Gate) -> dict[str, Any]:
    """Image scores of a lower-precision session vs the fp32 reference on the same images, judged by `gate`."""
    tiled = tile_check_images(images, manifest.geometry)
    spec = manifest.image_score
    ref = session_image_scores(cpu_session(bundle_dir / SCORER_ONNX), tiled, spec)
    got = session_image_scores(session, tiled, spec)
    return gate.judge(ref, got, manifest.calibration, labels)


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
    if engine not in INT8_ENGINES:
        raise ValueError(f"engine must be onnxruntime or nncf, got {engine!r}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibrate_method must be one of {', '.join(CALIBRATION_METHODS)}, got {calibrate_method!r}")
    bundle_dir = Path(bundle_dir)
    manifest = exported_manifest(bundle_dir)
    t0 = time.perf_counter()
    src, dst = bundle_dir / SCORER_ONNX, bundle_dir / SCORER_INT8_ONNX
    tiles = nchw(tile_check_images(calibration_images, manifest.geometry).tiles)
    if engine == "nncf":
        _nncf_quantize(src, dst, tiles)
        method = "NNCF post-training quantisation (mixed preset, fast bias correction), run on OpenVINO"
    else:
        excluded = _ort_quantize(src, dst, tiles, per_channel, calibrate_method, skip_depthwise)
        method = (f"onnxruntime quantize_static, QDQ, Conv only, {calibrate_method} calibration, "
                  f"{'per-channel' if per_channel else 'per-tensor'} int8 weights, uint8 activations"
                  + (f", {len(excluded)} depthwise convs kept fp32" if excluded else ""))
    set_metadata(dst, manifest, scorer_metadata(manifest.calibration, "int8"))
    session = create_session(dst, "openvino", "int8") if engine == "nncf" else cpu_session(dst)
    verdict = _judge(bundle_dir, manifest, session, check_images, check_labels,
                     Gate(1.0 - max_decision_disagreement, max_auroc_drop))
    out = _int8_record(verdict, method, "openvino" if engine == "nncf" else "onnxruntime", len(calibration_images))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    files = _keep_or_drop_int8(bundle_dir, out["shipped"], keep_rejected)
    record_export(bundle_dir, manifest, "int8", out, files)
    log.info("%s", _verdict("int8", manifest, out, verdict))
    return out


def _int8_record(verdict: dict[str, Any], method: str, backend: str, n_calibration: int) -> dict[str, Any]:
    """exports["int8"]: the gate's numbers at the top level, the int8 AUROC as `auroc_int8` (its name in
    every int8 record so far)."""
    numbers = {k: v for k, v in verdict.items() if k not in ("ok", "auroc", "n_check_images")}
    if "auroc" in verdict:
        numbers["auroc_int8"] = verdict["auroc"]
    return {"file": SCORER_INT8_ONNX, "backend": backend, "method": method, "n_calibration_images": n_calibration,
            "n_check_images": verdict["n_check_images"], **numbers, "shipped": verdict["ok"]}


def _keep_or_drop_int8(bundle_dir: Path, shipped: bool, keep_rejected: bool) -> dict[str, Any]:
    """A shipped int8 graph is recorded among the bundle's files; a rejected one is deleted (or kept
    under REJECTED_INT8_ONNX, never recorded). -> the change to exports.files (None: removed)."""
    dst = bundle_dir / SCORER_INT8_ONNX
    if shipped:
        return {SCORER_INT8_ONNX: file_entry(dst)}
    if keep_rejected:
        os.replace(dst, bundle_dir / REJECTED_INT8_ONNX)
    dst.unlink(missing_ok=True)
    return {SCORER_INT8_ONNX: None}


def _ort_quantize(src: Path, dst: Path, tiles: np.ndarray, per_channel: bool, calibrate_method: str,
                  skip_depthwise: bool) -> list[str]:
    """ONNX Runtime's quantize_static (QDQ, convolutions only) -> the names of the convolutions left in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    pre = src.parent / ".scorer_pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        excluded = _depthwise_convs(onnx.load(str(pre), load_external_data=False)) if skip_depthwise else []
        quantize_static(
            str(pre), str(dst), _CalibrationReader(tiles),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"], per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate_method], nodes_to_exclude=excluded,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibPercentile": 99.999},
        )
    finally:
        pre.unlink(missing_ok=True)
    return excluded


def _depthwise_convs(model) -> list[str]:
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]


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
    data = nncf.Dataset([tiles[i:i + 1] for i in range(len(tiles))], lambda x: {INPUT: x})
    q = nncf.quantize(model, data, subset_size=len(tiles), preset=nncf.QuantizationPreset.MIXED)
    onnx.save(q, str(dst))


__all__ = [
    "DEFAULT_MAX_AUROC_MOVE",
    "DEFAULT_MAX_SCORE_MOVE",
    "DEFAULT_MIN_AGREEMENT",
    "check_bf16",
    "check_bf16_after_export",
    "quantize_int8",
]
