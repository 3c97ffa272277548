"""The small public Python API: train a model version, load it, score images.

    import stpm

    version = stpm.train("../shared/data/mvtec_ad_bottle_512/bottle", name="bottle", epochs=20)
    scorer = stpm.load(version)
    for r in scorer.score(["photo.png"]):
        print(r.name, r.score, r.is_anomaly)

`train` runs the whole job of `stpm train` (torch); `load` returns the ONNX Runtime scorer the service
uses (no torch). The training options are keywords generated from the option models (stpm.options);
a test checks they are exactly the options the CLI and POST /train offer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpm import bundle
from stpm.options import training_options

if TYPE_CHECKING:
    from stpm.runtime.scorer import Scorer

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
    **options: Any,
) -> Version:
    """Train on the good images in `data` (an MVTec category folder, a folder of images, or a list of
    image files), calibrate on held-out good images, export ONNX (parity-checked) and publish the next
    version of `name` in `models_dir` (default: $STPM_MODELS_DIR or ./models). The first version of a
    name is activated; later ones when `activate`. The training options are keywords named like
    `stpm train`'s flags (the signature lists them with their defaults); an unknown one raises TypeError,
    a bad value or bad data ValueError (naming it), KeyboardInterrupt as usual (nothing is published)."""
    from stpm.options import build
    from stpm.training.pipeline import run_training

    unknown = sorted(set(options) - {o.name for o in training_options()})
    if unknown:
        raise TypeError(f"train() got unexpected keyword argument(s): {', '.join(unknown)}")
    config = build(options)
    models_dir = Path(models_dir if models_dir is not None else bundle.default_models_dir())
    paths = [Path(p) for p in data] if isinstance(data, Sequence) and not isinstance(data, str) else data
    out = run_training(paths, name, models_dir, config, export=export, show_bar=progress)
    if out.version is None:  # stopped before publishing (Ctrl-C during an epoch)
        raise KeyboardInterrupt(f"training of {name} was interrupted; nothing was published")
    if activate:
        bundle.set_active(models_dir, name, out.version)
    return Version(name, out.version, out.path)


def _with_option_keywords(fn):
    """`fn`'s signature with one keyword-only parameter per training option (name, default): what help(),
    IDEs and tests see. The options come from the option models, so a new option is a new keyword here."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
             for o in training_options()]
    fn.__signature__ = sig.replace(parameters=own + extra)
    return fn


train = _with_option_keywords(train)


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
