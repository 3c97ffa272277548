"""Frozen configuration dataclasses: every hyper-parameter lives here, once, with its default, its
bounds and its help. Torch-free (the API process imports it).

The user-facing options are generated from these fields (stpm.options): `stpm train`'s flags, the
fields of POST /train (and its OpenAPI), the keywords of `stpm.train`, the job parameters the
training worker reads back, and the manifest's record. Nothing re-types a name or a default.

How to add an option (it then appears in all of those at once):

1. Add a field to the dataclass it belongs to, with a default and `metadata=option(...)`:

       sigma: float = field(default=0.0, metadata=option("Gaussian smoothing of the map, in pixels", ge=0, le=64))

   - the type says what users may give: `int`, `float`, `bool`, `str`, `X | None` (optional), a
     `Literal[...]` (the choices; CLI `choices`, an enum in the API), `tuple[str, ...]` (comma-separated);
   - `ge`/`gt`/`le`/`lt` bound numbers (checked by the CLI, by POST /train (422) and by `stpm.train`);
   - `name=` gives it another public name where the field name would be ambiguous (TilingOptions.mode
     is `tiling`); `aliases=` adds CLI spellings; `api=False` keeps it off POST /train (a path or a
     resource of the server's: the teacher weight file, the device, DataLoader workers);
   - a field set only in code (never by users) takes `metadata=internal("why")` instead;
   - a field without metadata is still offered (name, type, default, choices) but has no help or bounds,
     and tests/test_options.py fails until it gets `option(...)` or `internal(...)`.
2. Use it where it acts (pipeline, model, ...). A new *dataclass* (a new section, e.g. a method's own
   settings) also becomes a field of `TrainingOptions` below, and `stpm.pipeline.run_training` passes
   it on to the training code.
3. Add `name=...` to `stpm.train`'s explicit keyword list (stpm/api.py); a test fails until the keyword list,
   the CLI and the API offer exactly the options declared here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from stpm.bundle.names import BACKBONE_NAMES

Backbone = Literal[BACKBONE_NAMES]  # type: ignore[valid-type]  (the table in stpm.names)
Combine = Literal["product", "sum"]
ThresholdMethod = Literal["quantile", "max_margin"]
ImageScoreMethod = Literal["max", "topk_mean", "auto"]
TilingMode = Literal["tile", "squash"]
Method = Literal["stpm", "patchcore"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPTION = "stpm.option"  # the metadata key


@dataclass(frozen=True)
class Option:
    """How a config field is offered to users; see the module docstring."""

    help: str
    name: str | None = None  # the public name (CLI --flag, form field, stpm.train keyword); default: the field's
    aliases: tuple[str, ...] = ()  # more CLI spellings, e.g. "--tile-size"
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    api: bool = True  # offered by POST /train
    user: bool = True  # False: internal, set in code only


def option(help: str, *, name: str | None = None, aliases: tuple[str, ...] = (), ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           api: bool = True) -> dict[str, Option]:
    """Field metadata of a user-facing option."""
    return {OPTION: Option(help, name, aliases, ge, gt, le, lt, api)}


def internal(why: str) -> dict[str, Option]:
    """Field metadata of a value set in code only (recorded in the manifest, never a user option)."""
    return {OPTION: Option(why, api=False, user=False)}


@dataclass(frozen=True)
class ModelOptions:
    """What the network is. Stored in every bundle's manifest."""

    # Defaults chosen by measurement (docs/BENCHMARKS.md, "Quality"): the memory bank on the
    # EfficientNet-Lite1 ImageNet teacher beat STPM on every shared set and needs no training loop.
    method: Method = field(default="patchcore", metadata=option(
        "patchcore: a memory bank of the teacher's patch features (no training loop, minutes); stpm: a student "
        "learns the teacher (epochs)"))
    backbone: Backbone = field(default="efficientnet_lite1", metadata=option("teacher network (ImageNet weights)"))
    student_backbone: Backbone | None = field(default=None, metadata=option(
        "stpm: student network (default: the teacher's architecture)"))
    layers: tuple[str, ...] = field(default=(), metadata=option(
        "feature layers (default: stpm the backbone's three stages, patchcore the middle two)"))
    image_size: int = field(default=256, metadata=option(
        "model input S in pixels: images are covered by S x S tiles", aliases=("--tile-size",), ge=32, le=1024))
    pretrained: bool = field(default=True, metadata=option(
        "ImageNet teacher weights (false: a random teacher, for tests only)"))
    weights: str | None = field(default=None, metadata=option(
        "teacher weight file on this machine (wins over every other source)", api=False))
    combine: Combine = field(default="product", metadata=option(
        "stpm: how the per-layer maps are fused: product (the paper) or sum"))
    sigma: float | None = field(default=None, metadata=option(
        "Gaussian smoothing of the map in tile pixels (none: chosen on synthetic anomalies of the held-out good "
        "images among stpm 0/4, patchcore 4/8)", ge=0, le=64))
    image_score: ImageScoreMethod = field(default="auto", metadata=option(
        "image score from the stitched map: its maximum, or the mean of its top-k values (auto: chosen on "
        "synthetic anomalies of the held-out good images)"))
    topk: float = field(default=0.01, metadata=option(
        "for topk_mean: < 1 a fraction of the map's pixels, >= 1 a number of pixels", gt=0, le=1_000_000))
    coreset_ratio: float = field(default=0.1, metadata=option(
        "patchcore: share of the training patches kept in the memory bank (greedy coreset)", gt=0, le=1))
    bank_size: int = field(default=16384, metadata=option(
        "patchcore: at most this many memory-bank rows (the search cost per tile grows with it)", ge=1,
        le=1_000_000))
    neighbourhood: int = field(default=3, metadata=option(
        "patchcore: patch features are averaged over this many positions square (odd)", ge=1, le=9))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN, metadata=internal("the teacher's input norm"))
    std: tuple[float, float, float] = field(default=IMAGENET_STD, metadata=internal("the teacher's input norm"))


@dataclass(frozen=True)
class TilingOptions:
    """How images of any size and shape meet the S x S model input (see stpm.tiling).

    mode "tile": every image is resized by one fixed `scale` (aspect ratio kept) and covered by
    overlapping S x S tiles. The scale is chosen at training as resolution / median short side of
    the training images (resolution default: S), unless `scale` is given. mode "squash": every image
    is resized to S x S (the format-1 behaviour; say so explicitly, it loses thin defects)."""

    mode: TilingMode = field(default="tile", metadata=option(
        "tile: keep the aspect ratio, one fixed scale, overlapping S x S tiles; squash: resize every image to "
        "S x S (loses thin defects in elongated images)", name="tiling"))
    resolution: int | None = field(default=None, metadata=option(
        "pixels the training images' median short side is scaled to (default: S, so an image of the median "
        "size is one tile high or wide)", ge=16, le=8192))
    scale: float | None = field(default=None, metadata=option(
        "fixed input -> model scale (wins over resolution)", gt=0, le=16))
    overlap: float = field(default=0.25, metadata=option(
        "minimum overlap of neighbouring tiles, fraction of a tile", ge=0, lt=1))
    max_upscale: float = field(default=2.0, metadata=option(
        "a smaller image is upscaled to one tile by at most this factor, else refused", ge=1, le=16))
    max_tiles: int = field(default=64, metadata=option("images needing more tiles are refused", ge=1, le=4096))


@dataclass(frozen=True)
class TrainOptions:
    """How training runs. Defaults are the paper's recipe."""

    epochs: int = field(default=100, metadata=option("training epochs (the best validation loss is kept)",
                                                     ge=1, le=100_000))
    batch_size: int = field(default=32, metadata=option("images (tiles) per optimizer step", ge=1, le=1024))
    lr: float = field(default=0.4, metadata=option("SGD learning rate", gt=0, le=10))
    momentum: float = field(default=0.9, metadata=option("SGD momentum", ge=0, lt=1))
    weight_decay: float = field(default=1e-4, metadata=option("SGD weight decay", ge=0, le=1))
    val_fraction: float = field(default=0.2, metadata=option(
        "fraction of the good images held out for validation and calibration", gt=0, lt=1))
    patience: int = field(default=0, metadata=option(
        "early stopping after N epochs without a better validation loss (0: off)", ge=0, le=100_000))
    seed: int = field(default=0, metadata=option("seed of the split, the student's init and the shuffling",
                                                 ge=0, le=2**31 - 1))
    device: str = field(default="auto", metadata=option(
        "auto, cpu, cuda, cuda:1 ... (POST /train: the server's setting train_device)", api=False))
    amp: bool = field(default=False, metadata=option("mixed precision (CUDA only)"))
    compile: bool = field(default=False, metadata=option("torch.compile (CUDA only)"))
    num_workers: int = field(default=0, metadata=option("DataLoader worker processes", name="workers", ge=0, le=64,
                                                        api=False))
    augment: bool = field(default=False, metadata=option("mild photometric jitter"))
    max_steps: int = field(default=0, metadata=option("cap on optimizer steps per epoch (0: none; smoke tests)",
                                                      ge=0, le=1_000_000_000))


@dataclass(frozen=True)
class CalibrationOptions:
    """How the threshold and the [0, 1] normalisation come from held-out good images."""

    method: ThresholdMethod = field(default="max_margin", metadata=option(
        "threshold from the held-out good images' scores: max_margin (their maximum plus a margin) or "
        "quantile", name="calibration"))
    quantile: float = field(default=0.99, metadata=option("for quantile: which quantile of the good scores",
                                                          ge=0.5, le=1))
    margin: float = field(default=0.1, metadata=option(
        "for max_margin: threshold = max + margin x spread of the good scores", ge=0, le=10))


@dataclass(frozen=True)
class TrainingOptions:
    """Everything one training run is configured by, one field per section. The section names are the
    keys of a training job's parameters and of `from_params`."""

    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    tiling: TilingOptions = field(default_factory=TilingOptions)


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


def to_params(cfg: TrainingOptions) -> dict[str, dict[str, Any]]:
    """TrainingOptions -> {section: dict} (a training job's parameters, JSON-ready)."""
    return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(TrainingOptions)}


def from_params(params: dict[str, Any]) -> TrainingOptions:
    """{section: dict} -> TrainingOptions; a missing section takes its defaults, keys that are not
    sections are ignored (a job also stores e.g. `activate`), unknown fields raise."""
    return TrainingOptions(**{f.name: from_dict(f.default_factory, params.get(f.name) or {})  # type: ignore[misc]
                             for f in fields(TrainingOptions)})


__all__ = [
    "Backbone",
    "Combine",
    "ImageScoreMethod",
    "Method",
    "ThresholdMethod",
    "TilingMode",
    "ModelOptions",
    "TrainOptions",
    "TilingOptions",
    "CalibrationOptions",
    "TrainingOptions",
    "Option",
    "option",
    "internal",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_dict",
    "from_dict",
    "to_params",
    "from_params",
    "field",
]
