"""A method as data (torch-free): its name, what it is, its selection candidates, its weight files and how
its options are resolved. The option models, the API process and model selection read specs without
importing torch; stpm.methods.registry loads the torch implementation when one is asked for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _no_alternatives(backbone: str) -> list[tuple[str, ...]]:
    return []


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line, for help texts
    sigma_candidates: tuple[float, ...]  # map smoothing (tile pixels) model selection tries; the first is the default
    weight_files: tuple[str, ...]  # the bundle files that hold its torch weights
    resolve: Callable[[Any], Any]  # ModelOptions -> the same with this method's defaults explicit; raises ValueError
    # feature-layer sets model selection may try besides the default when the user leaves `layers` open
    # (stpm.training.settings); none for a method whose fit is a training loop (one per candidate costs hours)
    layer_candidates: Callable[[str], list[tuple[str, ...]]] = _no_alternatives
    # a fit cheap enough to repeat per candidate setting (scale, layers): no training loop
    cheap_fit: bool = False

    @property
    def default_sigma(self) -> float:
        return self.sigma_candidates[0]


__all__ = ["MethodSpec"]
