"""The typed manifest of a bundle (manifest.json): parsed and validated once, read through one object.

Every reader (the scorer, backend choice, export, evaluation, loading a model, the service's listing)
takes a `Manifest`; a malformed manifest is one `MalformedBundleError` (a BundleError) naming the bundle and
the field, never a KeyError deep inside a reader. Manifests of every format load: format 1 (no `tiling`, no
`image_score`: squash to S x S, score = map maximum), format 2 (tiling; an image smaller than a tile is
upscaled by at most `max_upscale`, else refused), format 3 (`tiling.small_images` = "pad": such an image is
padded and its padding masked), and bundles from before PatchCore (no `model.method`: STPM). Fields a
reader does not know are kept (`extra="allow"`).

The JSON as read is kept beside the typed view: the digest that identifies what a model computes is taken
over it (stpm.bundle.store.manifest_digest), so a parse never changes a bundle's identity. Torch-free.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from stpm.bundle.calibration import Calibration
from stpm.bundle.errors import MalformedBundleError
from stpm.bundle.files import manifest_digest, read_manifest
from stpm.imaging.geometry import Geometry
from stpm.imaging.scores import ImageScore, PositionPrior

LEGACY_METHOD = "stpm"  # bundles written before PatchCore have no model.method


class ModelRecord(BaseModel):
    """manifest["model"]: the network and its map settings (the ModelOptions of the training run)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str = LEGACY_METHOD
    backbone: str
    image_size: int = Field(ge=1)
    layers: tuple[str, ...] = ()
    sigma: float | None = None
    image_score: str = "max"  # format 1: the map maximum
    topk: float = 0.01
    combine: str = "product"

    @property
    def score_spec(self) -> ImageScore:
        return ImageScore(self.image_score, float(self.topk))  # type: ignore[arg-type]


class PriorRecord(BaseModel):
    """manifest["position_prior"]: what good images score per position (stpm.imaging.scores.PositionPrior),
    discounted from every map before its image score; with how training estimated it."""

    model_config = ConfigDict(frozen=True, extra="allow")

    grid: tuple[int, int]
    values: list[float]

    _prior: PositionPrior = PrivateAttr()

    @model_validator(mode="after")
    def _shape(self) -> PriorRecord:
        self._prior = PositionPrior.from_record({"grid": self.grid, "values": self.values})  # size, finiteness
        return self

    @property
    def prior(self) -> PositionPrior:
        """The prior itself, built once when the manifest was read."""
        return self._prior


class FileRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    sha256: str
    bytes: int = 0


class ExportsRecord(BaseModel):
    """manifest["exports"]: the ONNX files (`stpm export`) and the parity record of each precision."""

    model_config = ConfigDict(frozen=True, extra="allow")

    files: dict[str, FileRecord] = {}
    parity: dict[str, Any] | None = None
    fp16: dict[str, Any] | None = None
    bf16: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None

    def precision(self, name: str) -> dict[str, Any] | None:
        """The parity record of a lower precision (fp16, bf16, int8), if any."""
        return getattr(self, name, None) if name in ("fp16", "bf16", "int8") else None


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    format_version: int = 1
    name: str
    version: str | None = None
    created_at: str | None = None
    model: ModelRecord
    tiling: Geometry | None = None  # format 1: none (squash to model.image_size)
    calibration: Calibration
    training: dict[str, Any] = {}
    data: dict[str, Any] = {}
    files: dict[str, str] = {}  # weight file -> sha256
    exports: ExportsRecord | None = None
    library_versions: dict[str, str] = {}
    teacher_weights_source: str | None = None
    position_prior: PriorRecord | None = None  # absent: the image score is the map's own

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    # ------------------------------------------------------------------ reading

    @classmethod
    def parse(cls, raw: Any, where: str = "manifest") -> Manifest:
        """A manifest's JSON value -> Manifest; MalformedBundleError naming `where` and the bad field otherwise."""
        if not isinstance(raw, dict):
            raise MalformedBundleError(f"{where}: the manifest is not a JSON object")
        try:
            m = cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise MalformedBundleError(f"{where}: malformed manifest: {field}: {err['msg']}") from None
        if m.tiling is not None and m.tiling.tile != m.model.image_size:
            raise MalformedBundleError(f"{where}: malformed manifest: tiling.tile {m.tiling.tile} differs from "
                              f"model.image_size {m.model.image_size}")
        m._raw = copy.deepcopy(raw)
        return m

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        """The manifest of a bundle folder. Errors name the bundle as name/version, not the store's path:
        ModelNotFoundError without a manifest, MalformedBundleError for one that cannot be parsed."""
        bundle_dir = Path(bundle_dir)
        where = f"{bundle_dir.parent.name}/{bundle_dir.name}"
        raw = read_manifest(bundle_dir)
        return cls.parse(raw, where)

    # ------------------------------------------------------------------ views

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def method(self) -> str:
        return self.model.method

    @property
    def geometry(self) -> Geometry:
        """The bundle's image geometry; format 1 (no `tiling`) squashes, as it always did."""
        return self.tiling if self.tiling is not None else Geometry.squash(self.model.image_size)

    @property
    def image_score(self) -> ImageScore:
        """How an image score comes from a stitched map: the method, top-k and position prior recorded."""
        spec = self.model.score_spec
        if self.position_prior is None:
            return spec
        return ImageScore(spec.method, spec.topk, self.position_prior.prior)

    @property
    def export_files(self) -> dict[str, FileRecord]:
        return dict(self.exports.files) if self.exports is not None else {}

    def digest(self) -> str:
        """What the model computes (stpm.bundle.store.manifest_digest over the JSON as read)."""
        return manifest_digest(self._raw)

    def to_dict(self) -> dict[str, Any]:
        """The JSON as read (a copy): what a writer changes and writes back."""
        return copy.deepcopy(self._raw)


__all__ = ["ExportsRecord", "FileRecord", "LEGACY_METHOD", "Manifest", "ModelRecord", "PriorRecord"]
