"""The training options, declared once as pydantic models: every hyper-parameter with its default, bounds
and help. Torch-free (the API process imports it).

`stpm train`'s flags, the POST /train form (and its OpenAPI), the keywords of `stpm.train`, the job
parameters the training worker reads back and the manifest's record are all generated from these fields
(stpm.options.table). Nothing re-types a name or a default.

How to add an option (it then appears in all of those at once):

1. Add a field to the section it belongs to, declared with `option(default, help, ...)`:

       sigma: float | None = option(None, "Gaussian smoothing of the map, in pixels", ge=0, le=64)

   - the type says what users may give: `int`, `float`, `bool`, `str`, `X | None` (optional: "" or
     "none" means None in the CLI and forms), a `Literal[...]` (the choices), `tuple[str, ...]`
     (comma-separated on the command line and in forms);
   - `ge`/`gt`/`le`/`lt` bound numbers (pydantic checks them wherever a value enters);
   - `name=` gives it another public name where the field name would be ambiguous (TilingOptions.mode
     is `tiling`); `aliases=` adds CLI spellings; `api=False` keeps it off POST /train (a path or a
     resource of the server's: the teacher weight file, the device, DataLoader workers);
   - a field set only in code (never by users) is declared with `internal(default, why)` instead.
2. Use it where it acts (a method's fit, the pipeline, ...). A new *section* also becomes a field of
   `TrainingOptions` below.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from stpm.imaging.geometry import DEFAULT_MAX_TILES, DEFAULT_MAX_UPSCALE, DEFAULT_OVERLAP, DEFAULT_SCALE_QUANTILE
from stpm.imaging.scores import ImageScore
from stpm.methods import registry
from stpm.methods.backbone_specs import BACKBONE_NAMES
from stpm.methods.patchcore.spec import MIRROR_NAMES

Backbone = Literal[BACKBONE_NAMES]  # type: ignore[valid-type]  (the table in stpm.methods.backbone_specs)
Combine = Literal["product", "sum"]
ThresholdMethod = Literal["target_fpr", "synthetic_f1", "max_margin", "quantile"]
ImageScoreMethod = Literal["max", "topk_mean", "auto"]
PositionPriorMode = Literal["auto", "on", "off"]
TilingMode = Literal["tile", "squash"]
SmallImages = Literal["pad", "upscale"]
Mirrors = Literal[MIRROR_NAMES]  # type: ignore[valid-type]  (the table in stpm.methods.patchcore.spec)

AUTO = "auto"  # an option value that model selection resolves after fitting (image_score)
# The most model input one image may need: max_tiles x image_size^2 (e.g. 128 tiles of 256 px, 2,048 of 64 px).
# The server's default per-request work budget is the same (app setting max_request_tile_pixels), so every
# image a model accepts can be scored, and no model trained here turns one image into unbounded work.
MAX_TILE_PIXELS = 8 * 1024 * 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META = "stpm"  # the key of our metadata in a field's json_schema_extra


def _comma_separated(v: Any) -> Any:
    """A tuple option from text: "a,b" -> ("a", "b") (empty items dropped)."""
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    return v


def _method_name(v: str) -> str:
    registry.spec(v)  # ValueError naming the registered methods
    return v


MethodName = Annotated[str, AfterValidator(_method_name)]
Names = Annotated[tuple[str, ...], BeforeValidator(_comma_separated)]


def _on_off(v: Any) -> Any:
    """A former boolean option's value (a job queued before it had an auto) -> on / off."""
    return ("on" if v else "off") if isinstance(v, bool) else v


# search_settings was a boolean (on / off) before it had an auto mode
SearchMode = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]


def option(default: Any, help: str, *, name: str | None = None, aliases: tuple[str, ...] = (), api: bool = True,
           **bounds: float) -> Any:
    """A user-facing option: its default, help, bounds (ge/gt/le/lt) and how it is offered."""
    return Field(default, description=help, json_schema_extra={META: {"name": name, "aliases": list(aliases),
                                                                      "api": api, "user": True}}, **bounds)


def internal(default: Any, why: str) -> Any:
    """A value set in code only (recorded in the manifest, never a user option)."""
    return Field(default, description=why, json_schema_extra={META: {"user": False, "api": False}})


class Section(BaseModel):
    """Frozen, validated, unknown names refused, no inf/nan."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=False)


class ModelOptions(Section):
    """What the network is. Stored in every bundle's manifest (`model`)."""

    # Defaults chosen by measurement (docs/BENCHMARKS.md, "Quality"): the memory bank on the
    # EfficientNet-Lite1 ImageNet teacher beat STPM on every shared set and needs no training loop.
    method: MethodName = option("patchcore", "patchcore: a memory bank of the teacher's patch features (no training "
                                "loop, minutes); stpm: a student learns the teacher (epochs)")
    backbone: Backbone = option("efficientnet_lite1", "teacher network (ImageNet weights)")
    student_backbone: Backbone | None = option(None, "stpm: student network (default: the teacher's architecture)")
    layers: Names = option((), "feature layers (default: stpm the backbone's three stages, patchcore the middle two)")
    image_size: int = option(256, "model input S in pixels: images are covered by S x S tiles",
                             aliases=("--tile-size",), ge=32, le=1024)
    pretrained: bool = option(True, "ImageNet teacher weights (false: a random teacher, for tests only)")
    weights: str | None = option(None, "teacher weight file on this machine (wins over every other source)",
                                 api=False)
    combine: Combine = option("product", "stpm: how the per-layer maps are fused: product (the paper) or sum")
    sigma: float | None = option(None, "Gaussian smoothing of the map in tile pixels (none: chosen on synthetic "
                                 "anomalies of the held-out good images among stpm 0/4, patchcore 4/8)", ge=0, le=64)
    image_score: ImageScoreMethod = option("auto", "image score from the stitched map: its maximum, or the mean of "
                                           "its top-k values (auto: chosen on synthetic anomalies of the held-out "
                                           "good images)")
    topk: float = option(0.01, "for topk_mean: < 1 a fraction of the map's pixels, >= 1 a number of pixels",
                         gt=0, le=1_000_000)
    position_prior: PositionPriorMode = option(
        "auto", "discount what good images score at each position of the image (relative to its size) before "
        "the image score: for parts in a fixed framing whose good images all score high somewhere (an edge, a rim); "
        "auto: where it raises the synthetic image AUROC of the held-out good images (estimated from the "
        "training images scored out of fold, so patchcore only)")
    # The bank: the paper's 1 % of the patches (at least MIN_BANK rows, at most bank_size): the floor on bottle and
    # metal plate, more rows on KolektorSDD's larger set; within 0.005 image and pixel AUROC of the former 10 % /
    # 16384-row bank on each, where a fixed 2048-row cap was not (docs/BENCHMARKS.md, "Memory-bank size").
    coreset_ratio: float = option(0.01, "patchcore: share of the training patches kept in the memory bank (greedy "
                                  "coreset; at least 2048 rows, or every patch when there are fewer)", gt=0, le=1)
    bank_size: int = option(16384, "patchcore: at most this many memory-bank rows (the search cost per tile grows "
                            "with it)", ge=1, le=1_000_000)
    neighbourhood: int = option(3, "patchcore: patch features are averaged over this many positions square (odd)",
                                ge=1, le=9)
    mirrors: Mirrors = option("none", "patchcore: the bank also learns each good tile's mirror images and a tile's map "
                              "is averaged over its mirrors (h left-right, v top-bottom, hv both): sharper maps at "
                              "2x (h, v) or 4x (hv) the features per tile, and a bank as much larger unless "
                              "coreset_ratio is lowered with it; not for parts whose mirror image is a defect")
    mean: tuple[float, float, float] = internal(IMAGENET_MEAN, "the teacher's input norm")
    std: tuple[float, float, float] = internal(IMAGENET_STD, "the teacher's input norm")

    @model_validator(mode="after")
    def _consistent(self) -> ModelOptions:
        if self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood={self.neighbourhood}: must be odd")
        if self.image_score != AUTO:  # auto: model selection chooses after fitting
            ImageScore(self.image_score, self.topk)  # type: ignore[arg-type]
        registry.spec(self.method).resolve(self)  # the method's own checks: layers exist in the teacher, ...
        return self


class TilingOptions(Section):
    """How images of any size and shape meet the S x S model input (stpm.imaging.geometry).

    mode "tile": every image is resized by one fixed `scale` (aspect ratio kept) and covered by
    overlapping S x S tiles. The scale is chosen at training as resolution / the training images' short
    side at quantile scale_quantile (resolution default: S), unless `scale` is given. An image whose scaled side is
    shorter than a tile is padded (its padding masked out of training and scoring), or with
    small_images="upscale" enlarged by at most max_upscale, else refused. mode "squash": every image
    is resized to S x S (the format-1 behaviour; say so explicitly, it loses thin defects)."""

    mode: TilingMode = option("tile", "tile: keep the aspect ratio, one fixed scale, overlapping S x S tiles; squash: "
                              "resize every image to S x S (loses thin defects in elongated images)", name="tiling")
    resolution: int | None = option(None, "pixels the training images' short side at scale_quantile is scaled to "
                                    "(default: S, so such an image is one tile high or wide)", ge=16, le=8192)
    scale_quantile: float = option(DEFAULT_SCALE_QUANTILE, "which training image's short side sets the scale: its "
                                   "quantile over the training images (0.5 the median, 1 the largest)", ge=0, le=1)
    scale: float | None = option(None, "fixed input -> model scale (wins over resolution)", gt=0, le=16)
    overlap: float = option(DEFAULT_OVERLAP, "minimum overlap of neighbouring tiles, fraction of a tile", ge=0, lt=1)
    small_images: SmallImages = option("pad", "an image whose scaled side is shorter than a tile: pad (reflect-padded "
                                       "to the tile, the padding masked out of training and scoring) or upscale "
                                       "(by at most max_upscale, else refused: bundles before format 3)")
    max_upscale: float = option(DEFAULT_MAX_UPSCALE, "small_images=upscale: a smaller image is upscaled to one tile "
                                "by at most this factor, else refused", ge=1, le=16)
    max_tiles: int = option(DEFAULT_MAX_TILES, "images needing more tiles are refused", ge=1, le=4096)


class TrainOptions(Section):
    """How training runs. Defaults are the STPM paper's recipe."""

    epochs: int = option(100, "training epochs (the best validation loss is kept)", ge=1, le=100_000)
    batch_size: int = option(32, "images (tiles) per optimizer step", ge=1, le=1024)
    lr: float = option(0.4, "SGD learning rate", gt=0, le=10)
    momentum: float = option(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = option(1e-4, "SGD weight decay", ge=0, le=1)
    val_fraction: float = option(0.2, "fraction of the good images held out for validation and calibration",
                                 gt=0, lt=1)
    patience: int = option(0, "early stopping after N epochs without a better validation loss (0: off)",
                           ge=0, le=100_000)
    seed: int = option(0, "seed of the split, the student's init and the shuffling", ge=0, le=2**31 - 1)
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ... (POST /train: the server's setting train_device)",
                         api=False)
    amp: bool = option(False, "mixed precision (CUDA only)")
    compile: bool = option(False, "torch.compile (CUDA only)")
    num_workers: int = option(0, "DataLoader worker processes", name="workers", ge=0, le=64, api=False)
    augment: bool = option(False, "mild photometric jitter")
    max_steps: int = option(0, "cap on optimizer steps per epoch (0: none; smoke tests)", ge=0, le=1_000_000_000)
    search_settings: SearchMode = option(
        "auto", "choose what the options leave open on synthetic anomalies of the held-out good images (PatchCore, "
        ">= 10 held-out images): on: the resolution (the default and 2x finer) and the feature layers (up to 8 "
        "minutes more training; a finer choice scores about 4x slower); auto: the resolution alone, only where "
        "the default scale shrinks the images 2x or more, and 2x finer only where the whole training is expected "
        "to fit in 12 minutes; off: neither")


class CalibrationOptions(Section):
    """How the threshold and the [0, 1] normalisation come from held-out good images."""

    method: ThresholdMethod = option("target_fpr", "threshold from the held-out good images' scores: target_fpr "
                                     "(expected false-positive rate on good parts = --target-fpr, from a fitted "
                                     "tail), synthetic_f1 (best F1 on their synthetic anomalies within that "
                                     "rate), max_margin (their maximum plus a margin) or quantile",
                                     name="calibration")
    target_fpr: float = option(0.01, "for target_fpr and synthetic_f1: the false-positive rate on good parts to "
                               "expect at the threshold", gt=0, lt=0.5)
    quantile: float = option(0.99, "for quantile: which quantile of the good scores", ge=0.5, le=1)
    margin: float = option(0.1, "for max_margin: threshold = max + margin x spread of the good scores", ge=0, le=10)
    folds: int = option(5, "the training images are split into this many folds and each is scored by a model "
                        "fitted without it (PatchCore: the memory bank of the other folds, at no extra cost; STPM: "
                        "only with --refit-folds); these out-of-fold scores join the held-out images' for the "
                        "threshold (0: held-out images only)",
                        name="calibration_folds", ge=0, le=20)
    refit_folds: bool = option(False, "methods with a training loop (STPM): train one more model per calibration "
                               "fold, without that fold, so that the training images are scored out of fold too "
                               "(about --calibration-folds - 1 times the training time more); off: they calibrate "
                               "on the held-out images alone")


class TrainingOptions(BaseModel):
    """Everything one training run is configured by, one field per section. The section names are the
    keys of a training job's parameters and of `from_params`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelOptions = ModelOptions()
    train: TrainOptions = TrainOptions()
    calibration: CalibrationOptions = CalibrationOptions()
    tiling: TilingOptions = TilingOptions()

    @model_validator(mode="after")
    def _bounded_work(self) -> TrainingOptions:
        """max_tiles x image_size^2 within MAX_TILE_PIXELS: one image's work at scoring time is bounded."""
        s, n = self.model.image_size, self.tiling.max_tiles
        if self.tiling.mode == "tile" and n * s * s > MAX_TILE_PIXELS:
            raise ValueError(f"max_tiles={n} with image_size={s}: one image could need {n * s * s} pixels of model "
                             f"input; at most {MAX_TILE_PIXELS} (max_tiles <= {MAX_TILE_PIXELS // (s * s)} at this "
                             "image_size)")
        return self


SECTIONS: dict[str, type[Section]] = {"model": ModelOptions, "train": TrainOptions,
                                      "calibration": CalibrationOptions, "tiling": TilingOptions}


def updated(cfg: Section, **changes: Any) -> Any:
    """A copy of an options section with some fields changed, validated like any other."""
    return type(cfg).model_validate({**cfg.model_dump(), **changes})


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Options -> JSON-ready dict (tuples become lists)."""
    return cfg.model_dump(mode="json")


def from_dict(cls: type[Section], data: dict[str, Any]) -> Any:
    """A section from a dict (a manifest's record, a job's parameters); unknown keys raise ValueError."""
    return cls.model_validate(data)


def to_params(cfg: TrainingOptions) -> dict[str, dict[str, Any]]:
    """TrainingOptions -> {section: dict} (a training job's parameters, JSON-ready)."""
    return {name: to_dict(getattr(cfg, name)) for name in SECTIONS}


def from_params(params: dict[str, Any]) -> TrainingOptions:
    """{section: dict} -> TrainingOptions; a missing section takes its defaults, keys that are not sections
    are ignored (a job also stores e.g. `activate`), unknown fields raise."""
    return TrainingOptions(**{name: from_dict(cls, params.get(name) or {}) for name, cls in SECTIONS.items()})


__all__ = [
    "AUTO",
    "Backbone",
    "CalibrationOptions",
    "Combine",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_TILE_PIXELS",
    "ImageScoreMethod",
    "ModelOptions",
    "SECTIONS",
    "Section",
    "ThresholdMethod",
    "TilingMode",
    "TilingOptions",
    "TrainOptions",
    "TrainingOptions",
    "from_dict",
    "from_params",
    "internal",
    "option",
    "to_dict",
    "to_params",
    "updated",
]
