"""The small public Python API: train a model version, load it, score images.

    import stpm

    version = stpm.train("../shared/data/mvtec_ad_bottle_512/bottle", name="bottle", epochs=20)
    scorer = stpm.load(version)
    for r in scorer.score(["photo.png"]):
        print(r.name, r.score, r.is_anomaly)

`train` runs the whole job of `stpm train` (torch); `load` returns the ONNX Runtime scorer the service
uses (no torch). The training options are explicit keywords whose defaults are the config
dataclasses' (stpm.config); a test checks they are exactly the options the CLI and POST /train offer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stpm import bundle
from stpm.options import (
    Backbone,
    CalibrationOptions,
    Combine,
    ImageScoreMethod,
    Method,
    ModelOptions,
    ThresholdMethod,
    TilingOptions,
    TilingMode,
    TrainOptions,
)

if TYPE_CHECKING:
    from stpm.runtime.scorer import Scorer

_M, _T, _C, _G = ModelOptions, TrainOptions, CalibrationOptions, TilingOptions  # class attributes = field defaults
DEVICES = {"auto": ("auto",), "cpu": ("cpu",), "cuda": ("cuda",), "tensorrt": ("tensorrt",)}


@dataclass(frozen=True)
class Version:
    """A published model version: `name/version` in the store at `path`'s parent's parent."""

    name: str
    version: str
    path: Path

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


def train(
    data: str | Path | Sequence[str | Path],
    *,
    name: str,
    models_dir: str | Path | None = None,
    activate: bool = False,
    export: bool = True,
    progress: bool = True,
    # the training options (stpm.config; the CLI's flags and POST /train's fields)
    method: Method = _M.method,
    backbone: Backbone = _M.backbone,
    student_backbone: Backbone | None = _M.student_backbone,
    layers: Sequence[str] = _M.layers,
    image_size: int = _M.image_size,
    pretrained: bool = _M.pretrained,
    weights: str | None = _M.weights,
    combine: Combine = _M.combine,
    sigma: float | None = _M.sigma,
    image_score: ImageScoreMethod = _M.image_score,
    topk: float = _M.topk,
    coreset_ratio: float = _M.coreset_ratio,
    bank_size: int = _M.bank_size,
    neighbourhood: int = _M.neighbourhood,
    epochs: int = _T.epochs,
    batch_size: int = _T.batch_size,
    lr: float = _T.lr,
    momentum: float = _T.momentum,
    weight_decay: float = _T.weight_decay,
    val_fraction: float = _T.val_fraction,
    patience: int = _T.patience,
    seed: int = _T.seed,
    device: str = _T.device,
    amp: bool = _T.amp,
    compile: bool = _T.compile,
    workers: int = _T.num_workers,
    augment: bool = _T.augment,
    max_steps: int = _T.max_steps,
    calibration: ThresholdMethod = _C.method,
    quantile: float = _C.quantile,
    margin: float = _C.margin,
    tiling: TilingMode = _G.mode,
    resolution: int | None = _G.resolution,
    scale: float | None = _G.scale,
    overlap: float = _G.overlap,
    max_upscale: float = _G.max_upscale,
    max_tiles: int = _G.max_tiles,
) -> Version:
    """Train on the good images in `data` (an MVTec category folder, a folder of images, or a list of
    image files), calibrate on held-out good images, export ONNX (parity-checked) and publish the next
    version of `name` in `models_dir` (default: $STPM_MODELS_DIR or ./models). The first version of a
    name is activated; later ones when `activate`. Raises ValueError for a bad option or bad data
    (naming it), KeyboardInterrupt as usual (no version is published then)."""
    values = {k: v for k, v in locals().items() if k not in _RUN_ARGUMENTS}  # the training options, by name
    from stpm.options import build
    from stpm.training.pipeline import run_training

    config = build(values)
    models_dir = Path(models_dir if models_dir is not None else bundle.default_models_dir())
    paths = [Path(p) for p in data] if isinstance(data, Sequence) and not isinstance(data, str) else data
    out = run_training(paths, name, models_dir, config, export=export, show_bar=progress)
    if out.version is None:  # stopped before publishing (Ctrl-C during an epoch)
        raise KeyboardInterrupt(f"training of {name} was interrupted; nothing was published")
    if activate:
        bundle.set_active(models_dir, name, out.version)
    return Version(name, out.version, out.path)


_RUN_ARGUMENTS = frozenset({"data", "name", "models_dir", "activate", "export", "progress"})


def load(
    model: str | Path | Version,
    *,
    models_dir: str | Path | None = None,
    device: str = "auto",
    backend: str | None = None,
    precision: str | None = None,
) -> Scorer:
    """A model to score with: a Version, a bundle folder, or "name" (its active version) / "name/vN" in
    `models_dir` (default: $STPM_MODELS_DIR or ./models). device: auto (TensorRT, CUDA, then CPU: what
    onnxruntime has), cpu, cuda or tensorrt. backend: onnxruntime, openvino or auto; precision: fp32,
    fp16, bf16, int8 or auto (None: $STPM_BACKEND / $STPM_PRECISION, else auto: the fastest of what the
    bundle holds with parity, timed here; `scorer.selection` says what was chosen and why). A precision
    the bundle lacks falls back to fp32 with a warning.
    -> stpm.runtime.Scorer: `scorer.score(images)` takes image files, encoded bytes or arrays."""
    from stpm.runtime.scorer import Scorer

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if isinstance(model, Version):
        path = model.path
    else:
        path = bundle.locate(models_dir if models_dir is not None else bundle.default_models_dir(), str(model))
    return Scorer(path, providers=DEVICES[device], backend=backend, precision=precision)


__all__ = ["Version", "load", "train"]
