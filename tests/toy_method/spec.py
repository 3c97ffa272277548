"""The toy method as data: a pixel's anomaly is its colour's distance to the good tiles' mean colour."""

from __future__ import annotations

from typing import Any

from stpm.methods.spec import MethodSpec


def resolve(cfg: Any) -> Any:
    if cfg.student_backbone:
        raise ValueError("student_backbone applies to method stpm only (toy_colour has no student)")
    return cfg


def load() -> type:
    from tests.toy_method.method import ToyColour

    return ToyColour


SPEC = MethodSpec(
    name="toy_colour",
    summary="distance of each pixel's colour to the good images' mean colour (a test of the method interface)",
    sigma_candidates=(0.0, 2.0),
    weight_files=("toy_colour.safetensors",),
    resolve=resolve,
)
