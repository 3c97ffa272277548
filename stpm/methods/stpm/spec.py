"""STPM (Wang et al., BMVC 2021) as data: a student network learns the frozen teacher's feature pyramid on
good images; where it fails to match, the image is anomalous. Torch-free."""

from __future__ import annotations

from typing import Any

from stpm.bundle.names import STUDENT_WEIGHTS, TEACHER_WEIGHTS
from stpm.methods.backbone_specs import resolve_layers, spec
from stpm.methods.spec import MethodSpec


def student_layers(backbone: str, student: str | None, layers: tuple[str, ...]) -> tuple[str, ...]:
    """The student's layers: the teacher's when it is the same network, else its own at the same strides."""
    if not student or student == backbone:
        return layers
    t_spec, s_spec = spec(backbone), spec(student)
    by_stride = {stride: layer for layer, stride in s_spec.layer_strides.items()}
    out = []
    for layer in layers:
        stride = t_spec.layer_strides[layer]
        if stride not in by_stride:
            raise ValueError(f"student {student} has no feature layer at stride {stride} (teacher {layer})")
        out.append(by_stride[stride])
    return tuple(out)


def resolve(cfg: Any) -> Any:
    """The teacher's layers made explicit (default: its three-stage pyramid) and the student checked."""
    layers = resolve_layers(cfg.backbone, cfg.layers)
    student_layers(cfg.backbone, cfg.student_backbone, layers)
    return cfg.model_copy(update={"layers": layers})


SPEC = MethodSpec(
    name="stpm",
    summary="a student learns the teacher's feature pyramid on good images (a training loop: epochs)",
    sigma_candidates=(0.0, 4.0),
    weight_files=(TEACHER_WEIGHTS, STUDENT_WEIGHTS),
    resolve=resolve,
)
