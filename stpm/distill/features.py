"""Intermediate features of stock models, through forward hooks or torchvision's feature extraction."""
from __future__ import annotations

from torch import Tensor, nn


class FeatureHooks:
    """Record outputs of named sub-modules on every forward; remove the hooks with `close()`.

    hooks = FeatureHooks(model, ("layer1", "layer2")); logits = model(x); f = hooks.outputs["layer1"]
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(f"no sub-module named {missing}; available: {list(modules)[:20]}...")
        self.names = tuple(names)
        self.outputs: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in names]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.outputs[name] = output
        return hook

    def features(self) -> list[Tensor]:
        """Outputs of the last forward, in the order of `names`."""
        return [self.outputs[n] for n in self.names]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def torchvision_feature_extractor(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """torchvision.models.feature_extraction graph module returning {name: tensor} for `names`."""
    from torchvision.models.feature_extraction import create_feature_extractor

    return create_feature_extractor(model, return_nodes={n: n for n in names})
