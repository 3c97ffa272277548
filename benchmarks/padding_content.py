"""What should fill the padding around an image smaller than a tile? The padding never scores (the map is
cropped to the image) and trains nothing (masked), but the features of the image's own pixels near its
border see it through their receptive field. The padding that keeps those features sane is the one under
which a good small crop scores like the same pixels in their full image.

Per shared set: PatchCore with the defaults fitted on full-size good training images (no padding), then
small random crops (0.15-0.6 of a tile at the model's scale, so every one is padded) of the good test
images, and crops around a defect pixel of the defective ones, scored with each numpy padding mode
(torch maps, stitched and cropped as the runtime does). Reported per mode: the good crops' normalised
scores (0.5 = the bundle's threshold) against the same pixels' scores inside their full image, the share
of good crops over the threshold (false alarms caused by the padding), and the crops' image AUROC.

    .venv/bin/python benchmarks/padding_content.py --out benchmarks/results/padding_content.json

Prints its Markdown table and, with the default --out, writes its block of docs/BENCHMARKS.md
(benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import DATA, machine_line  # noqa: E402
from stpm.imaging import geometry  # noqa: E402
from stpm.imaging.decode import read_image  # noqa: E402
from stpm.imaging.geometry import Geometry, predict_maps, tile_images  # noqa: E402
from stpm.imaging.scores import image_scores  # noqa: E402
from stpm.methods.loading import load_map  # noqa: E402
from stpm.methods.maps import tile_fn  # noqa: E402
from stpm.options import TrainingOptions, TrainOptions  # noqa: E402
from stpm.training.data import list_images, test_samples  # noqa: E402
from stpm.training.mixed import crop_box  # noqa: E402
from stpm.training.pipeline import run_training  # noqa: E402

SOURCES = {
    "bottle": DATA / "mvtec_ad_bottle_512" / "bottle",
    "metal_plate": DATA / "mpdd_metal_plate_512" / "metal_plate",
    "kolektorsdd": DATA / "kolektorsdd_half" / "kolektorsdd",
}
MODES = ("reflect", "symmetric", "edge", "constant", "mean")
CROPS_PER_GOOD = 3
LOW, HIGH = 0.15, 0.6  # crop side / (tile / scale): always smaller than a tile


def crops(data: Path, g: Geometry, seed: int) -> tuple[list[np.ndarray], list[int], list[tuple]]:
    """Small crops of every test image -> (crops, labels, (image index, box) for the in-context score)."""
    rng = np.random.default_rng(seed)
    native = int(g.tile / g.scale)
    out, labels, where = [], [], []
    for i, s in enumerate(test_samples(data)):
        image = read_image(s.path)
        anchor = None
        if s.mask is not None:
            ys, xs = np.nonzero(np.asarray(read_image(s.mask))[:, :, 0] > 127)
            k = int(rng.integers(0, ys.size))
            anchor = (int(ys[k]), int(xs[k]))
        for _ in range(CROPS_PER_GOOD if s.label == 0 else 1):
            top, left, h, w = crop_box(image.shape[:2], rng, anchor, LOW, HIGH, reference=(native, native))
            out.append(image[top:top + h, left:left + w].copy())
            labels.append(s.label)
            where.append((i, top, left, h, w))
    return out, labels, where


def in_context(amap, manifest, data: Path, where: list[tuple]) -> np.ndarray:
    """Each crop's pixels scored inside their full image (unpadded tiles): the reference."""
    samples = test_samples(data)
    g, spec = manifest.geometry, manifest.image_score
    full = predict_maps(tile_fn(amap, torch.device("cpu")), tile_images([read_image(s.path) for s in samples], g))
    scores = []
    for i, top, left, h, w in where:
        m, (H, W) = full[i], read_image(samples[i].path).shape[:2]
        sy, sx = m.shape[0] / H, m.shape[1] / W
        scores.append(image_scores([m[int(top * sy):max(int((top + h) * sy), int(top * sy) + 1),
                                     int(left * sx):max(int((left + w) * sx), int(left * sx) + 1)]], spec)[0])
    return np.array(scores)


def per_mode(amap, manifest, images, labels, reference) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    cal, g, spec = manifest.calibration, manifest.geometry, manifest.image_score
    pad = Geometry(**{**g.to_dict(), "small_images": "pad"})
    y, ref = np.array(labels), cal.normalise(reference)
    rows = []
    for mode in MODES:
        geometry.PAD_MODE = mode
        tiled = tile_images(images, pad)
        assert all(p.padded for p in tiled.plans)
        score = cal.normalise(image_scores(predict_maps(tile_fn(amap, torch.device("cpu")), tiled), spec))
        good = y == 0
        rows.append({"mode": mode, "good_median_score": float(np.median(score[good])),
                     "good_median_in_context": float(np.median(ref[good])),
                     "good_median_abs_change": float(np.median(np.abs(score[good] - ref[good]))),
                     "good_over_threshold": float(np.mean(score[good] >= 0.5)),
                     "good_over_threshold_in_context": float(np.mean(ref[good] >= 0.5)),
                     "crop_auroc": float(roc_auc_score(y, score)), "crop_auroc_in_context": float(roc_auc_score(y, ref)),
                     "n_good": int(good.sum()), "n_defective": int((~good).sum())})
    geometry.PAD_MODE = "reflect"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(SOURCES))
    ap.add_argument("--train-images", type=int, default=80, help="full-size good images the bank is fitted on")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "padding_content.json"))
    a = ap.parse_args()
    res = {"command": "benchmarks/padding_content.py " + " ".join(sys.argv[1:]), "machine": machine_line(), "rows": []}
    work = Path(tempfile.mkdtemp(prefix="stpm-padding-"))
    for name in a.datasets.split(","):
        t0 = time.monotonic()
        good = list_images(SOURCES[name] / "train" / "good")[:a.train_images]
        out = run_training(good, name, work, TrainingOptions(train=TrainOptions(device="cpu")), export=False,
                           show_bar=False)
        amap, manifest = load_map(out.path)
        images, labels, where = crops(SOURCES[name], manifest.geometry, seed=0)
        reference = in_context(amap, manifest, SOURCES[name], where)
        for row in per_mode(amap, manifest, images, labels, reference):
            res["rows"].append({"dataset": name, **row, "seconds": time.monotonic() - t0})
            print(json.dumps(res["rows"][-1]), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    from benchmarks import report
    from benchmarks.report_quality import padding_content_markdown

    print(padding_content_markdown(res))
    report.publish(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
