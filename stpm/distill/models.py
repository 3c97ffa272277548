"""Small classifier zoo (MLPs, plain CNNs) and model resolution by name or import path.

Names: mlp<H> (two hidden layers of H ReLUs, e.g. mlp1200, mlp800, mlp30), mlp<H>d (same with
dropout 0.2 on the input and 0.5 on hidden units, Hinton's regularised teacher), cnn<D> (plain CNN
with D conv layers, seed 002's TAKD family), torchvision:<name>, timm:<name>, or "package.module:attr"
(a callable taking num_classes=...).
cnn<D>x<W> sets the first-stage width W (second stage 2W; default 16).
takd<D>[x<P>] (D in 2, 4, 6, 8, 10): the plain CNNs of the TAKD paper's CIFAR code (Mirzadeh et al. 2020),
conv widths scaled to P percent (default 100).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class InputSpec:
    """What the classifier sees: channels, square image size, number of classes."""

    in_channels: int
    image_size: int
    num_classes: int


class MLP(nn.Module):
    """Flatten -> [dropout] -> (Linear -> ReLU -> [dropout]) x len(hidden) -> Linear. Feature layer: "body"."""

    feature_layers = ("body",)

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int,
                 input_dropout: float = 0.0, hidden_dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            if hidden_dropout > 0:
                layers.append(nn.Dropout(hidden_dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _conv_stack(in_ch: int, out_ch: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False),
                   nn.BatchNorm2d(out_ch), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers)


class PlainCNN(nn.Module):
    """Plain CNN with `depth` 3x3 conv layers in two stages, max pools and one FC layer (TAKD's family).

    stage1: ceil(depth/2) convs at full resolution; pool; stage2: floor(depth/2) convs; pool; FC.
    Feature layers (same shapes for every depth with the same widths): "stage1", "stage2".
    """

    feature_layers = ("stage1", "stage2")

    def __init__(self, depth: int, in_channels: int, image_size: int, num_classes: int,
                 widths: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("PlainCNN needs depth >= 2")
        n1 = (depth + 1) // 2
        self.stage1 = _conv_stack(in_channels, widths[0], n1)
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = _conv_stack(widths[0], widths[1], depth - n1)
        self.pool2 = nn.MaxPool2d(2)
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(widths[1] * side * side, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool2(self.stage2(self.pool1(self.stage1(x)))))


# The TAKD paper's plain CNNs for CIFAR (its model_factory "plane_cifar10_book"): 3x3 conv + BN + ReLU,
# 2x2 max pools, then fully connected layers (ReLU between them).
TAKD_BOOK: dict[int, tuple[str, ...]] = {
    2: ("C16", "M", "C16", "M", "F10"),
    4: ("C16", "C16", "M", "C32", "C32", "M", "F10"),
    6: ("C16", "C16", "M", "C32", "C32", "M", "C64", "C64", "M", "F10"),
    8: ("C16", "C16", "M", "C32", "C32", "M", "C64", "C64", "M", "C128", "C128", "M", "F64", "F10"),
    10: ("C32", "C32", "M", "C64", "C64", "M", "C128", "C128", "M", "C256", "C256", "C256", "C256", "M",
         "F128", "F10"),
}


class TakdCNN(nn.Module):
    """A TAKD plain CNN: `stageK` = the convs before the K-th max pool, `embed` = input of the last FC layer.

    feature_layers: the stages (one per pool); embedding_layer: "embed" (flattened, [B, D]).
    """

    embedding_layer = "embed"

    def __init__(self, depth: int, in_channels: int, image_size: int, num_classes: int, width_percent: int = 100):
        super().__init__()
        if depth not in TAKD_BOOK:
            raise ValueError(f"takd depth must be one of {sorted(TAKD_BOOK)}, got {depth}")
        book = TAKD_BOOK[depth]
        stages, convs, ch, side = [], [], in_channels, image_size
        for item in book:
            if item.startswith("C"):
                out = max(1, int(round(int(item[1:]) * width_percent / 100)))
                convs += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=False)]
                ch = out
            elif item == "M":
                stages.append(nn.Sequential(*convs))
                convs = []
                side //= 2
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2)
        widths = [int(i[1:]) for i in book if i.startswith("F")]
        widths = [max(1, int(round(w * width_percent / 100))) for w in widths[:-1]] + [num_classes]
        fc: list[nn.Module] = [nn.Flatten()]
        d = ch * side * side
        for w in widths[:-1]:
            fc += [nn.Linear(d, w), nn.ReLU(inplace=False)]
            d = w
        self.embed = nn.Sequential(*fc)  # output: the last FC layer's input, [B, d]
        self.head = nn.Linear(d, widths[-1])
        self.feature_layers = tuple(f"stages.{i}" for i in range(len(stages)))

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = self.pool(stage(x))
        return self.head(self.embed(x))


class RepeatChannels(nn.Module):
    """Repeat a 1-channel input to 3 channels for stock RGB models."""

    def __init__(self, model: nn.Module, repeats: int) -> None:
        super().__init__()
        self.repeats = repeats
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.repeat(1, self.repeats, 1, 1))


_MLP = re.compile(r"^mlp(\d+)(d?)$")
_CNN = re.compile(r"^cnn(\d+)(?:x(\d+))?$")
_TAKD = re.compile(r"^takd(\d+)(?:x(\d+))?$")


def build_model(name: str, spec: InputSpec) -> nn.Module:
    """Build an untrained classifier from a zoo name, torchvision:/timm: name or 'module:attr' path."""
    if m := _MLP.match(name):
        h, reg = int(m.group(1)), m.group(2) == "d"
        return MLP(spec.in_channels * spec.image_size**2, (h, h), spec.num_classes,
                   input_dropout=0.2 if reg else 0.0, hidden_dropout=0.5 if reg else 0.0)
    if m := _CNN.match(name):
        w = int(m.group(2) or 16)
        return PlainCNN(int(m.group(1)), spec.in_channels, spec.image_size, spec.num_classes, widths=(w, 2 * w))
    if m := _TAKD.match(name):
        return TakdCNN(int(m.group(1)), spec.in_channels, spec.image_size, spec.num_classes, int(m.group(2) or 100))
    if name.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=spec.num_classes)
        return RepeatChannels(model, 3) if spec.in_channels == 1 else model
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=spec.num_classes,
                                 in_chans=spec.in_channels)
    if ":" in name:
        module_name, attr = name.split(":", 1)
        factory = getattr(importlib.import_module(module_name), attr)
        model = factory(num_classes=spec.num_classes)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} did not return an nn.Module")
        return model
    raise ValueError(f"unknown model name {name!r}: use mlp<H>[d], cnn<D>, torchvision:<n>, timm:<n> or module:attr")


def default_feature_layers(model: nn.Module) -> tuple[str, ...]:
    """Layer names used for feature-based KD: the model's `feature_layers`, or ResNet-style layer1..4."""
    if isinstance(model, RepeatChannels):
        return tuple(f"model.{n}" for n in default_feature_layers(model.model))
    names = getattr(model, "feature_layers", None)
    if names is not None:
        return tuple(names)
    modules = dict(model.named_modules())
    resnet = tuple(n for n in ("layer1", "layer2", "layer3", "layer4") if n in modules)
    if resnet:
        return resnet
    raise ValueError(f"{type(model).__name__} has no known feature layers; pass layer names explicitly")


def default_embedding_layer(model: nn.Module) -> str:
    """The layer whose output is the penultimate embedding (input of the classifier) for relational KD
    (SP, CC, RKD, PKT, CRD): the model's `embedding_layer`, the last feature layer of the zoo's MLP/plain CNN
    (pooled by the loss), torchvision's "avgpool" or timm's "global_pool"."""
    if isinstance(model, RepeatChannels):
        return f"model.{default_embedding_layer(model.model)}"
    name = getattr(model, "embedding_layer", None)
    if name is not None:
        return name
    if isinstance(model, (MLP, PlainCNN)):
        return model.feature_layers[-1]
    modules = dict(model.named_modules())
    for candidate in ("avgpool", "global_pool"):
        if candidate in modules:
            return candidate
    raise ValueError(f"{type(model).__name__} has no known embedding layer; pass a layer name explicitly")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a state_dict saved by the trainer (weights_only, never pickled modules)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"] if "model" in state else state)
    return model
