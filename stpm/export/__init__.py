"""ONNX export of a bundle (torch): the graphs and their ONNX metadata (stpm.export.onnx), parity checks
(stpm.export.parity), lower precisions bf16 / int8 (stpm.export.precision) and the `stpm export`
command (stpm.export.cli, whose add_arguments / main the package re-exports for stpm.cli)."""

from stpm.bundle.names import SCORER_FP16_ONNX, SCORER_INT8_ONNX, SCORER_ONNX
from stpm.export.cli import add_arguments, main
from stpm.export.onnx import FusedScorer, export_bundle, fused_scorer
from stpm.export.parity import (
    DEFAULT_ATOL,
    DEFAULT_FP16_ATOL,
    ExportParityError,
    Gate,
    nchw,
    ort_outputs,
    parity_report,
    synthetic_check_images,
    tile_check_images,
)
from stpm.export.precision import check_bf16, quantize_int8

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_FP16_ATOL",
    "SCORER_FP16_ONNX",
    "SCORER_INT8_ONNX",
    "SCORER_ONNX",
    "ExportParityError",
    "FusedScorer",
    "Gate",
    "add_arguments",
    "check_bf16",
    "export_bundle",
    "fused_scorer",
    "main",
    "nchw",
    "ort_outputs",
    "parity_report",
    "quantize_int8",
    "synthetic_check_images",
    "tile_check_images",
]
