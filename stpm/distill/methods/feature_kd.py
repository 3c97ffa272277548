"""Feature-map objectives through forward hooks: FitNets hints, AT, FSP, VID, NST, ReviewKD.

Each is ce_weight * CE(y) + weight * (its distillation loss); the teacher is frozen (methods.offline.frozen).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stpm.distill import feature_losses as FL
from stpm.distill import losses
from stpm.distill.features import FeatureHooks
from stpm.distill.methods.offline import frozen
from stpm.distill.trainer import Objective


@torch.no_grad()
def probe_shapes(model: nn.Module, names: tuple[str, ...], example: Tensor) -> list[torch.Size]:
    """Output shapes of the named layers for one example batch (model left in its previous mode)."""
    hooks = FeatureHooks(model, names)
    was = model.training
    model.eval()
    model(example)
    model.train(was)
    shapes = [f.shape for f in hooks.features()]
    hooks.close()
    return shapes


class HintRegressor(nn.Module):
    """Maps a student feature to the teacher feature's shape: 1x1 conv (+ resize) or a linear layer."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        self.size = tuple(teacher_shape[2:]) if len(teacher_shape) == 4 else None
        if len(student_shape) == 4 and len(teacher_shape) == 4:
            self.map: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        elif len(student_shape) == 2 and len(teacher_shape) == 2:
            self.map = nn.Linear(student_shape[1], teacher_shape[1])
        else:
            raise ValueError(f"cannot regress {tuple(student_shape)} onto {tuple(teacher_shape)}")

    def forward(self, s: Tensor) -> Tensor:
        out = self.map(s)
        if self.size is not None and out.shape[-2:] != self.size:
            out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return out


class _FeatureObjective(Objective):
    """Shared plumbing: student + frozen teacher with hooks on the given layers."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...]) -> None:
        super().__init__()
        self.student, self.teacher = student, frozen(teacher)
        self.s_hooks = FeatureHooks(student, student_layers)
        self.t_hooks = FeatureHooks(self.teacher.model, teacher_layers)

    def _run(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        self.teacher(x)
        t_feats = self.t_hooks.features()
        z = self.student(x)
        return z, self.s_hooks.features(), t_feats


class FitNetObjective(_FeatureObjective):
    """CE(y) + hint_weight * 1/2||r(student layer) - teacher layer||^2 with a learned regressor r.

    Single stage (hint and CE together) rather than FitNets' two stages.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 example: Tensor, hint_weight: float, ce_weight: float = 1.0) -> None:
        super().__init__(student, teacher, (student_layer,), (teacher_layer,))
        (s_shape,) = probe_shapes(student, (student_layer,), example)
        (t_shape,) = probe_shapes(self.teacher.model, (teacher_layer,), example)
        self.regressor = HintRegressor(s_shape, t_shape)
        self.hint_weight, self.ce_weight = hint_weight, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, (s,), (t,) = self._run(x)
        return self.ce_weight * losses.hard_cross_entropy(z, y) + \
            self.hint_weight * losses.fitnet_hint_loss(self.regressor(s), t)


class AttentionTransferObjective(_FeatureObjective):
    """CE(y) + beta * sum over layer pairs of attention_transfer_loss (Zagoruyko & Komodakis, beta=1e3)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], beta: float, ce_weight: float = 1.0) -> None:
        if len(student_layers) != len(teacher_layers):
            raise ValueError("AT needs as many student as teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.beta, self.ce_weight = beta, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s_feats, t_feats = self._run(x)
        at = sum(losses.attention_transfer_loss(s, t) for s, t in zip(s_feats, t_feats))
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.beta * at


class FSPObjective(_FeatureObjective):
    """CE(y) + weight * FSP loss between consecutive layer pairs (layers[i], layers[i+1]).

    FSP matrices are C1 x C2, so student layers whose channel count differs from the teacher's are first mapped
    to it by a learned 1x1 conv (as FitNets' regressor); that needs `example` to probe the shapes.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], weight: float, ce_weight: float = 1.0,
                 example: Tensor | None = None) -> None:
        if len(student_layers) != len(teacher_layers) or len(student_layers) < 2:
            raise ValueError("FSP needs the same number (>= 2) of student and teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.weight, self.ce_weight = weight, ce_weight
        self.adapters = nn.ModuleList()
        if example is not None:
            s_shapes = probe_shapes(student, student_layers, example)
            t_shapes = probe_shapes(self.teacher.model, teacher_layers, example)
            self.adapters = nn.ModuleList([nn.Identity() if a[1] == b[1] else nn.Conv2d(a[1], b[1], 1)
                                           for a, b in zip(s_shapes, t_shapes)])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s, t = self._run(x)
        if len(self.adapters):
            s = [a(f) for a, f in zip(self.adapters, s)]
        s_pairs = list(zip(s[:-1], s[1:]))
        t_pairs = list(zip(t[:-1], t[1:]))
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * losses.fsp_loss(s_pairs, t_pairs)


def _resize_to(feature: Tensor, size: tuple[int, ...]) -> Tensor:
    """Average-pool down or bilinearly up a [B, C, H, W] map to `size` (H', W')."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


class VIDRegressor(nn.Module):
    """VID's mean predictor (1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv, or Linear layers for [B, D]
    features) and a per-channel log-scale for the variance, initialised so that the variance starts at
    init_var (RepDistiller's init_pred_var = 5)."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, init_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        cs, ct = student_shape[1], teacher_shape[1]
        mid = max(cs, ct)
        if len(student_shape) == 4 and len(teacher_shape) == 4:
            layer = lambda i, o: nn.Conv2d(i, o, 1)  # noqa: E731
            self.size: tuple[int, ...] | None = tuple(teacher_shape[2:])
        elif len(student_shape) == 2 and len(teacher_shape) == 2:
            layer = lambda i, o: nn.Linear(i, o)  # noqa: E731
            self.size = None
        else:
            raise ValueError(f"VID cannot map {tuple(student_shape)} onto {tuple(teacher_shape)}")
        self.mean = nn.Sequential(layer(cs, mid), nn.ReLU(), layer(mid, mid), nn.ReLU(), layer(mid, ct))
        self.log_scale = nn.Parameter(torch.full((ct,), math.log(math.exp(init_var - eps) - 1.0)))

    def forward(self, s: Tensor) -> Tensor:
        if self.size is not None:
            s = _resize_to(s, self.size)
        return self.mean(s)


class VIDObjective(_FeatureObjective):
    """VID (Ahn et al., CVPR 2019): CE + weight * sum over layer pairs of the teacher feature's Gaussian NLL
    under the student's regressed mean and a learned per-channel variance."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], example: Tensor, weight: float, ce_weight: float = 1.0) -> None:
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError("VID needs the same non-zero number of student and teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        s_shapes = probe_shapes(student, student_layers, example)
        t_shapes = probe_shapes(self.teacher.model, teacher_layers, example)
        self.regressors = nn.ModuleList([VIDRegressor(a, b) for a, b in zip(s_shapes, t_shapes)])
        self.weight, self.ce_weight = weight, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s_feats, t_feats = self._run(x)
        vid = sum(FL.vid_loss(r(s), t, r.log_scale) for r, s, t in zip(self.regressors, s_feats, t_feats))
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * vid


class NSTObjective(_FeatureObjective):
    """NST (Huang & Wang, 2017): CE + weight * sum over layer pairs of the polynomial-kernel MMD between the
    channels' spatial distributions (RepDistiller's weight: 50)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], weight: float, ce_weight: float = 1.0) -> None:
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError("NST needs the same non-zero number of student and teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        self.weight, self.ce_weight = weight, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s_feats, t_feats = self._run(x)
        nst = sum(FL.nst_loss(s, t) for s, t in zip(s_feats, t_feats))
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * nst


class AttentionFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF): reduce the student feature to `mid` channels, fuse it with the
    fused feature coming from the deeper level (upsampled; per-position weights from a 1x1 conv + sigmoid),
    and map the result to the teacher's channels with a 3x3 conv. Returns (output for this level, residual)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.out = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            w = self.attention(torch.cat([x, deeper], dim=1))
            x = x * w[:, :1] + deeper * w[:, 1:]
        return _resize_to(self.out(x), out_size), x


class ReviewKDObjective(_FeatureObjective):
    """ReviewKD (Chen et al., CVPR 2021): student features of several levels (shallow -> deep) are fused from the
    deepest level back ("review"), each fused map is compared with the teacher's map of the same level by the
    hierarchical context loss. CE + weight * sum of HCL. Layers: 4-D maps, ordered shallow to deep."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: tuple[str, ...],
                 teacher_layers: tuple[str, ...], example: Tensor, weight: float, ce_weight: float = 1.0,
                 mid_channels: int | None = None) -> None:
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError("ReviewKD needs the same non-zero number of student and teacher layers")
        super().__init__(student, teacher, student_layers, teacher_layers)
        s_shapes = probe_shapes(student, student_layers, example)
        t_shapes = probe_shapes(self.teacher.model, teacher_layers, example)
        if any(len(sh) != 4 for sh in list(s_shapes) + list(t_shapes)):
            raise ValueError("ReviewKD needs 4-D feature maps [B, C, H, W] on every layer")
        mid = mid_channels or max(sh[1] for sh in t_shapes)
        n = len(s_shapes)
        self.fusions = nn.ModuleList([AttentionFusion(s[1], mid, t[1], fuse=i < n - 1)
                                      for i, (s, t) in enumerate(zip(s_shapes, t_shapes))])
        self.t_sizes = [tuple(t[2:]) for t in t_shapes]
        self.weight, self.ce_weight = weight, ce_weight

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z, s_feats, t_feats = self._run(x)
        deeper, total = None, z.new_zeros(())
        for i in reversed(range(len(s_feats))):
            out, deeper = self.fusions[i](s_feats[i], deeper, self.t_sizes[i])
            total = total + FL.hierarchical_context_loss(out, t_feats[i])
        return self.ce_weight * losses.hard_cross_entropy(z, y) + self.weight * total
