"""Frozen configuration dataclasses. Every hyper-parameter lives here; the CLI and the API mirror them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Combine = Literal["product", "sum"]
ThresholdMethod = Literal["quantile", "max_margin"]
ImageScoreMethod = Literal["max", "topk_mean"]
TilingMode = Literal["tile", "squash"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What the network is. Stored in every bundle's manifest."""

    backbone: str = "resnet18"
    student_backbone: str | None = None  # None: same architecture as the teacher
    layers: tuple[str, ...] = ()  # empty: the backbone's default (the paper's three stages)
    image_size: int = 256  # the model input S: the tile size
    pretrained: bool = True
    weights: str | None = None  # explicit teacher weight file (wins over every other source)
    combine: Combine = "product"  # how per-layer maps are fused: the paper multiplies
    sigma: float = 0.0  # Gaussian smoothing of the map, in output pixels (0: off)
    image_score: ImageScoreMethod = "max"  # image score from the stitched map (stpm.tiling.image_score)
    topk: float = 0.01  # for "topk_mean": < 1 a fraction of the map's pixels, >= 1 a number of pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class TilingConfig:
    """How images of any size and shape meet the S x S model input (see stpm.tiling).

    mode "tile": every image is resized by one fixed `scale` (aspect ratio kept) and covered by
    overlapping S x S tiles. The scale is chosen at training as resolution / median short side of
    the training images (resolution default: S), unless `scale` is given. mode "squash": every image
    is resized to S x S (the format-1 behaviour; say so explicitly, it loses thin defects)."""

    mode: TilingMode = "tile"
    resolution: int | None = None  # pixels the median short side becomes; None: the tile size S
    scale: float | None = None  # fixed input -> model scale; wins over resolution
    overlap: float = 0.25  # minimum overlap of neighbouring tiles, fraction of a tile
    max_upscale: float = 2.0  # a smaller image is upscaled to one tile by at most this factor, else refused
    max_tiles: int = 64  # more tiles per image are refused


@dataclass(frozen=True)
class TrainConfig:
    """How training runs. Defaults are the paper's recipe."""

    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    patience: int = 0  # early stopping on the validation loss; 0: off
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # CUDA only
    compile: bool = False  # CUDA only
    num_workers: int = 0
    augment: bool = False
    max_steps: int = 0  # cap optimizer steps per epoch (0: none); for smoke tests


@dataclass(frozen=True)
class CalibrationConfig:
    """How the threshold and the [0, 1] normalisation come from held-out good images."""

    method: ThresholdMethod = "max_margin"
    quantile: float = 0.99  # for method="quantile"
    margin: float = 0.1  # threshold = max + margin * (max - median) for "max_margin"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass from a dict; unknown keys raise (no silent typos)."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            v = data[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "TilingConfig",
    "CalibrationConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_dict",
    "from_dict",
    "field",
]
