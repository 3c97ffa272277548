"""The names that writers and readers of a bundle must agree on, in one torch-free place.

The files of a version folder, the ONNX graphs' input and output names, the scorer file of each
precision, and the backbone table (names, feature layers, channels, strides, weight files) that the
config's choices, the torch extractors (stpm.backbones) and the API's form all read. Nothing here
imports torch: the scoring service and the API process use it too.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ------------------------------------------------------------------ backbones


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    default_layers: tuple[str, ...]
    layer_channels: dict[str, int]
    layer_strides: dict[str, int]
    weight_file: str  # canonical file name looked up in weights dirs and the hub cache


_RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18", ("layer1", "layer2", "layer3"),
        {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}, _RESNET_STRIDES,
        "resnet18-f37072fd.pth",
    ),
    "resnet34": BackboneSpec(
        "resnet34", ("layer1", "layer2", "layer3"),
        {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}, _RESNET_STRIDES,
        "resnet34-b627a593.pth",
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", ("layer1", "layer2", "layer3"),
        {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}, _RESNET_STRIDES,
        "wide_resnet50_2-95faca4d.pth",
    ),
    **{
        f"efficientnet_lite{n}": BackboneSpec(
            f"efficientnet_lite{n}", ("blocks.1", "blocks.2", "blocks.4"),
            {"blocks.0": 16, "blocks.1": 24, "blocks.2": c2, "blocks.4": c4, "blocks.6": c6},
            {"blocks.0": 2, "blocks.1": 4, "blocks.2": 8, "blocks.4": 16, "blocks.6": 32},
            f"efficientnet_lite{n}.pth",
        )
        for n, (c2, c4, c6) in {0: (40, 112, 320), 1: (40, 112, 320), 2: (48, 120, 352)}.items()
    },
}
BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)
EFFICIENTNET_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
