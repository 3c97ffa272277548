"""The teacher backbones as data: names, feature layers, channels, strides, canonical weight files.

Torch-free: the option models (stpm.options), the API's form and each method's spec read it; the torch
extractors live in stpm.methods.backbones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def resolve_layers(name: str, layers: Sequence[str]) -> tuple[str, ...]:
    """`layers` of backbone `name` (its default pyramid when empty), each checked to exist."""
    s = spec(name)
    layers = tuple(layers) or s.default_layers
    bad = [layer for layer in layers if layer not in s.layer_channels]
    if bad:
        raise ValueError(f"{name} has no feature layer {', '.join(bad)}; available: {', '.join(s.layer_channels)}")
    return layers


__all__ = ["BACKBONES", "BACKBONE_NAMES", "EFFICIENTNET_LITES", "BackboneSpec", "resolve_layers", "spec"]
