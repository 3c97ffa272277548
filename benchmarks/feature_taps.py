"""Which EfficientNet-Lite activations, and which map smoothing and image score, rank a shared set's test images best
under PatchCore? (Issue 25: are the teacher's features, or the image score, what limits KolektorSDD?)

The default taps, blocks.2 + blocks.4, are linear bottlenecks: 40 + 112 channels. The candidates are richer
activations of the same frozen ImageNet Lite1 at the same strides (8 and 16): the first block's expansion of
the next stage (ReLU6, 6x the channels), the last block's depthwise output, and one more stage (blocks.3, or
the stride-32 blocks.5), and a grid 4x finer (blocks.1 added, stride 4). Each variant fits a memory bank as `stpm train` does (PatchCore's 3 x 3 neighbourhood
average, the finest tap's grid, a greedy coreset of 1 % of the patches, at least 2048 rows, seed 0) and scores
every test image: image AUROC (the smoothed map's max and its top-1 % mean) and pixel AUROC. The mirror
variants (MIRRORS) keep the default taps and add mirror images: to the bank (`flips`: each training image's
left-right, top-bottom and both mirrors), to the test map (`mirror-*`: the mean of the image's map and its
mirrors' maps, each mirrored back), or to both (`flips+mirror-average`, what `stpm train --mirrors hv` does,
and its one-mirror forms); `shift-average` averages the maps of the image shifted by half the grid's stride
instead, to tell the mirrors apart from a change of the grid's phase.

This is not the pipeline: each image is scaled whole to a 256 px short side (the bundle scale on these sets)
and reflect-padded to a multiple of 32, instead of tiled, and nothing is cross-fitted or calibrated. Compare
variants against the `default` row of the same run, not against the quality tables. For the default taps it
also scores every map smoothing (sigma 2 / 4 / 8) with the max and the top 0.1 / 1 / 5 % mean.

    .venv/bin/python benchmarks/feature_taps.py --out benchmarks/results/feature_taps.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import report  # noqa: E402
from benchmarks.quality import DATASETS, machine_line  # noqa: E402
from stpm.evaluation.metrics import auroc  # noqa: E402
from stpm.methods.backbones import build_teacher  # noqa: E402
from stpm.methods.patchcore.anomaly_map import nearest_distance  # noqa: E402
from stpm.methods.patchcore.coreset import bank_rows, fit_bank  # noqa: E402
from stpm.methods.patchcore.features import PatchFeatures  # noqa: E402
from stpm.methods.patchcore.mirrors import MIRRORS as PATCHCORE_MIRRORS  # noqa: E402
from stpm.methods.patchcore.mirrors import mirror_tiles  # noqa: E402
from stpm.options import ModelOptions  # noqa: E402
from stpm.options.sections import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from stpm.training.data import good_train_dir, list_images, test_samples  # noqa: E402

BACKBONE = "efficientnet_lite1"
DEFAULTS = ModelOptions()  # the bank rule and the neighbourhood of `stpm train`
SHORT_SIDE = 256
VARIANTS = {  # name -> (module paths inside timm's EfficientNet features, random projection dims or 0)
    "default": (("blocks.2", "blocks.4"), 0),
    "expansion": (("blocks.3.0.bn1", "blocks.5.0.bn1"), 0),
    "expansion-152": (("blocks.3.0.bn1", "blocks.5.0.bn1"), 152),
    "depthwise": (("blocks.2.2.bn2", "blocks.4.3.bn2"), 0),
    "three-stages": (("blocks.2", "blocks.3", "blocks.4"), 0),
    "stride-32": (("blocks.2", "blocks.4", "blocks.5"), 0),
    "stride-4": (("blocks.1", "blocks.2", "blocks.4"), 0),  # a 4x finer grid: 4x the patches and queries
    "shift-average": (("blocks.2", "blocks.4"), 0),  # the default bank; a test map is averaged over half-stride shifts
}
# Mirror variants (the default taps): (bank mirrors, test mirrors), each mirror as stpm's mirrors module flips. The bank
# is fitted on every training image and its bank mirrors; a test map is the mean of the image's map and its test
# mirrors' maps, each mirrored back onto the image first.
H, V, HV = PATCHCORE_MIRRORS["h"][0], PATCHCORE_MIRRORS["v"][0], PATCHCORE_MIRRORS["hv"][-1]
MIRRORS = {
    "flips": ((H, V, HV), ()),
    "mirror-average": ((), (H, V, HV)),
    "mirror-h": ((), (H,)),
    "mirror-v": ((), (V,)),
    "flips+mirror-average": ((H, V, HV), (H, V, HV)),
    "flips-h+mirror-h": ((H,), (H,)),
    "flips-v+mirror-v": ((V,), (V,)),
}
VARIANTS.update({name: (("blocks.2", "blocks.4"), 0) for name in MIRRORS})
SHIFT_AVERAGED = {"shift-average"}  # ... the mean of the maps of the image shifted by (0 | 4, 0 | 4) px
SIGMAS = (2, 4, 8)
TOPK = (0.001, 0.01, 0.05)


def load(path: Path, mask: bool = False) -> np.ndarray:
    with Image.open(path) as im:
        w, h = im.size
        s = SHORT_SIDE / min(w, h)
        size = (round(w * s), round(h * s))
        if mask:
            return np.asarray(im.convert("L").resize(size, Image.NEAREST)) > 127
        return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))


def _mirror(a: np.ndarray, flips: tuple[int, ...]) -> np.ndarray:
    """An image [H, W, 3] or a map [H, W] mirrored as stpm mirrors a tile (a view)."""
    return mirror_tiles(a[None], flips)[0]


class _Hooked(nn.Module):
    """timm's EfficientNet features with forward hooks on `paths`: an input -> those activations, in order."""

    def __init__(self, net: nn.Module, paths: tuple[str, ...]):
        super().__init__()
        self.net, self.paths, self.caught = net, paths, {}
        for p in paths:
            net.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: self.caught.__setitem__(p, o))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.caught.clear()
        self.net(x)
        return [self.caught[p] for p in self.paths]


class Taps:
    """The frozen teacher's activations at `paths` (finest first) as PatchCore features (stpm's PatchFeatures:
    the input norm, the neighbourhood average, the finest tap's grid); an image -> features
    [h / stride, w / stride, D] and that stride."""

    def __init__(self, paths: tuple[str, ...], proj: int, seed: int = 0):
        teacher, self.source = build_teacher(BACKBONE, ("blocks.2", "blocks.4", "blocks.6"))
        self.features = PatchFeatures(_Hooked(teacher.net, paths), IMAGENET_MEAN, IMAGENET_STD, DEFAULTS.neighbourhood)
        self.proj_dims, self.proj, self.g = proj, None, torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, img: np.ndarray) -> tuple[torch.Tensor, int]:
        h, w = img.shape[:2]
        H, W = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        f = self.features(F.pad(x, (0, W - w, 0, H - h), mode="reflect"))
        stride = H // f.shape[-2]
        f = f[0].permute(1, 2, 0)[:math.ceil(h / stride), :math.ceil(w / stride)]
        if self.proj_dims:
            if self.proj is None:
                self.proj = torch.randn(f.shape[-1], self.proj_dims, generator=self.g) / math.sqrt(self.proj_dims)
            f = f @ self.proj
        return f, stride


def run_variant(data: Path, label: str, score_grid: bool) -> dict:
    paths, proj = VARIANTS[label]
    taps = Taps(paths, proj)
    t0 = time.process_time()
    bank_mirrors, test_mirrors = MIRRORS.get(label, ((), ()))
    train = torch.cat([(f := taps(v)[0]).reshape(-1, f.shape[-1])
                       for p in list_images(good_train_dir(data)) for img in [load(p)]
                       for v in [img] + [_mirror(img, m) for m in bank_mirrors]])
    bank, _ = fit_bank(train, bank_rows(len(train), DEFAULTS.coreset_ratio, DEFAULTS.bank_size), seed=0)
    center = bank.mean(0)
    bc = bank - center
    bsq = (bc * bc).sum(1)
    fit_s = time.process_time() - t0
    labels, scores, px_labels = [], {}, []
    px_scores = {s: [] for s in SIGMAS}
    t0 = time.process_time()

    def raw_map(img: np.ndarray) -> np.ndarray:
        f, stride = taps(img)
        gh, gw, d = f.shape
        dist = nearest_distance(f.reshape(-1, d) - center, bc, bsq).reshape(1, 1, gh, gw)
        return F.interpolate(dist, size=(gh * stride, gw * stride), mode="bilinear",
                             align_corners=False)[0, 0, :img.shape[0], :img.shape[1]].numpy()

    for s in test_samples(data):
        img = load(s.path)
        if test_mirrors:  # each mirror's map is mirrored back onto the image before the mean
            raw = (raw_map(img) + sum(_mirror(raw_map(_mirror(img, m)), m) for m in test_mirrors)) / (1 + len(test_mirrors))
        elif label in SHIFT_AVERAGED:  # reflect-pad top / left by the shift, then crop the map back onto the image
            raw = sum(raw_map(np.pad(img, ((dy, 0), (dx, 0), (0, 0)), mode="reflect"))[dy:, dx:]
                      for dy in (0, 4) for dx in (0, 4)) / 4
        else:
            raw = raw_map(img)
        gt = load(s.mask, mask=True) if s.mask is not None else np.zeros(raw.shape, bool)
        labels.append(s.label)
        px_labels.append(gt[::2, ::2].ravel())
        for sigma in SIGMAS if score_grid else (4,):
            m = gaussian_filter(raw, sigma)
            top = np.sort(m.ravel())
            scores.setdefault(f"sigma {sigma}, max", []).append(float(top[-1]))
            for q in TOPK if score_grid else (0.01,):
                scores.setdefault(f"sigma {sigma}, top {q:g} mean", []).append(float(top[-max(1, int(q * m.size)):].mean()))
            px_scores[sigma].append(m[::2, ::2].ravel())
    y, gt = np.array(labels), np.concatenate(px_labels)
    return {"variant": label, "taps": list(paths), "projection": proj, "dims": int(bank.shape[1]), "bank_rows": len(bank),
            "patches": len(train), "image_auroc": {k: auroc(y, np.array(v)) for k, v in scores.items()},
            "pixel_auroc": {f"sigma {s}": auroc(gt, np.concatenate(v)) for s, v in px_scores.items() if v},
            "fit_cpu_s": round(fit_s, 1), "score_cpu_s": round(time.process_time() - t0, 1), "teacher": taps.source}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="bottle,metal_plate,kolektorsdd")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"a comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feature_taps.json"))
    a = ap.parse_args()
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    command, machine = "benchmarks/feature_taps.py " + " ".join(sys.argv[1:]), machine_line()
    for name in a.datasets.split(","):
        for label in variants:
            row = {"dataset": name, "machine": machine,
                   **run_variant(DATASETS[name], label, score_grid=label == "default")}
            print(json.dumps(row), flush=True)
            res = merge_row(out, row, command)
    report.publish(out, res)
    return 0


def merge_row(out: Path, row: dict, command: str) -> dict:
    """Write `row` into the result file (replacing the same dataset and variant) under a lock, re-reading the
    file first: runs of other sets in parallel processes keep each other's rows."""
    with open(Path(tempfile.gettempdir()) / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = json.loads(out.read_text()) if out.exists() else {"rows": []}
        commands = res.get("commands", [])
        res.update(backbone=BACKBONE, commands=commands + [command] * (command not in commands))
        key = (row["dataset"], row["variant"])
        res["rows"] = [r for r in res["rows"] if (r["dataset"], r["variant"]) != key] + [row]
        order = {v: i for i, v in enumerate(VARIANTS)}
        res["rows"].sort(key=lambda r: (r["dataset"], order.get(r["variant"], len(order))))
        out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    raise SystemExit(main())
