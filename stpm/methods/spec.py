"""A method as data (torch-free): its name, what it is, its selection candidates, its weight files and how
its options are resolved. The option models, the API process and model selection read specs without
importing torch; stpm.methods.registry loads the torch implementation when one is asked for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # one line, for help texts
    sigma_candidates: tuple[float, ...]  # map smoothing (tile pixels) model selection tries; the first is the default
    weight_files: tuple[str, ...]  # the bundle files that hold its torch weights
    resolve: Callable[[Any], Any]  # ModelOptions -> the same with this method's defaults explicit; raises ValueError

    @property
    def default_sigma(self) -> float:
        return self.sigma_candidates[0]


__all__ = ["MethodSpec"]
