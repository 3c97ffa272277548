"""The names that writers and readers of a bundle must agree on, in one torch-free place.

The files of a version folder, the ONNX graphs' input and output names, the scorer file of each
precision. Nothing here imports torch: the scoring service and the API process use it too.
"""

from __future__ import annotations

# ------------------------------------------------------------------ files of a version folder
MANIFEST = "manifest.json"
TEACHER_WEIGHTS = "teacher.safetensors"
STUDENT_WEIGHTS = "student.safetensors"
MEMORY_BANK_WEIGHTS = "memory_bank.safetensors"  # patchcore: the coreset of training patch features
TEACHER_ONNX = "teacher.onnx"
STUDENT_ONNX = "student.onnx"
SCORER_ONNX = "scorer.onnx"
SCORER_FP16_ONNX = "scorer_fp16.onnx"
SCORER_INT8_ONNX = "scorer_int8.onnx"
REJECTED_INT8_ONNX = ".scorer_int8_rejected.onnx"  # kept only on request (benchmarks), never recorded
EVALUATIONS = "eval.json"  # `stpm eval` results, one entry per dataset (the manifest is never rewritten for them)
PRECISION_FILES = {"fp32": SCORER_ONNX, "fp16": SCORER_FP16_ONNX, "int8": SCORER_INT8_ONNX}

# ------------------------------------------------------------------ ONNX graphs
INPUT = "images"  # every graph's one input
SCORER_OUTPUTS = ("anomaly_map", "raw_score", "score")  # scorer*.onnx, in this order


def feature_output(i: int) -> str:
    """The i-th output of teacher.onnx / student.onnx (the feature pyramid, shallowest first)."""
    return f"feat{i}"
