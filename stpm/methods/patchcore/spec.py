"""PatchCore (Roth et al., CVPR 2022) as data: a memory bank of the frozen teacher's locally aware patch
features, thinned by a greedy coreset; a patch's anomaly is its distance to the nearest bank row. No
training loop. Torch-free."""

from __future__ import annotations

from typing import Any

from stpm.bundle.names import MEMORY_BANK_WEIGHTS, TEACHER_WEIGHTS
from stpm.methods.backbone_specs import resolve_layers, spec
from stpm.methods.spec import MethodSpec

DEFAULT_SIGMA = 4.0  # PatchCore's smoothing at 224-256 px tiles
# --mirrors (stpm.methods.patchcore.mirrors): name -> the mirrors besides the identity, each as the tensor dims it
# flips ([..., H, W]: rows -2, columns -1)
MIRRORS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "h": ((-1,),),  # left-right
    "v": ((-2,),),  # top-bottom
    "hv": ((-1,), (-2,), (-2, -1)),  # both, and the two together (a half turn)
}
MIRROR_NAMES = tuple(MIRRORS)


def default_layers(backbone: str) -> tuple[str, ...]:
    """The mid-level layers: the backbone's default pyramid without its finest stage (ResNets: layer2 +
    layer3, as in the paper; EfficientNet-Lite: blocks.2 + blocks.4)."""
    return spec(backbone).default_layers[1:]


def layer_candidates(backbone: str) -> list[tuple[str, ...]]:
    """The default mid-level pair, and the same pair with the stage below it (the backbone's whole default
    pyramid): its stride-4 grid gives 4x the patches and queries at the same receptive fields (thin defects).
    Measured through the pipeline (docs/BENCHMARKS.md, "A stride-4 patch grid"): it localises better on bottle
    and metal plate, slightly worse on KolektorSDD, at several times the cost, so it is a candidate, not the
    default; the finer pair alone (stride 4 / 8), the candidate before it, scored lower."""
    return [default_layers(backbone), tuple(spec(backbone).default_layers)]


def resolve(cfg: Any) -> Any:
    """Layers made explicit (default: the mid-level pair); options that belong to STPM refused."""
    if cfg.student_backbone:
        raise ValueError("student_backbone applies to method stpm only (patchcore trains no student)")
    return cfg.model_copy(update={"layers": resolve_layers(cfg.backbone, cfg.layers or default_layers(cfg.backbone))})


SPEC = MethodSpec(
    name="patchcore",
    summary="a memory bank of the teacher's patch features (no training loop, minutes)",
    sigma_candidates=(DEFAULT_SIGMA, 2 * DEFAULT_SIGMA),
    weight_files=(TEACHER_WEIGHTS, MEMORY_BANK_WEIGHTS),
    resolve=resolve,
    layer_candidates=layer_candidates,
    cheap_fit=True,
)
