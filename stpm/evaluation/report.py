"""Evaluate a model on an MVTec-layout test set: metrics per defect type and overall, plus pictures."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stpm.evaluation import metrics
from stpm.training.calibration import normalize
from stpm.training.data import Sample, load_mask, load_tiled, test_samples
from stpm.imaging.decode import read_image, resize_rgb
from stpm.methods.stpm.model import STPM
from stpm.imaging.geometry import Geometry, from_manifest, predict_maps, score_from_manifest
from stpm.imaging.scores import ImageScore, image_scores
from stpm.methods.maps import STPMMap, tile_fn


def score_samples(
    amap: nn.Module, samples: list[Sample], geometry: Geometry, device: torch.device,
    spec: ImageScore = ImageScore(), batch_size: int = 16, progress: bool = True,
) -> dict[str, Any]:
    """Decode, tile, score (`amap`: a map module, stpm.methods), stitch and load masks. -> maps (list of
    float32 [h_i, w_i], each image at the model's scale), scores [N], masks (list of bool [h_i, w_i],
    nearest-resized), labels [N], plans. progress: a tqdm bar over the tiles (on a terminal)."""
    tiled, _, _ = load_tiled([s.path for s in samples], geometry)
    fn = tile_fn(amap.to(device), device)
    with tqdm(total=len(tiled.tiles), desc="eval", unit="tile", disable=None if progress else True) as bar:
        def counted(batch: np.ndarray) -> np.ndarray:
            out = fn(batch)
            bar.update(len(batch))
            return out

        maps = predict_maps(counted, tiled, batch_size)
    masks = [load_mask(s.mask, (p.h, p.w)) for s, p in zip(samples, tiled.plans)]
    labels = np.array([s.label for s in samples])
    return {"maps": maps, "scores": image_scores(maps, spec), "masks": masks, "labels": labels,
            "plans": tiled.plans}


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray], maps: list[np.ndarray], defects: list[str],
    threshold: float | None,
) -> dict[str, Any]:
    """Overall metrics and one block per defect type (that type against all good images).
    masks / maps: one array per image (any sizes, pairwise equal)."""

    def block(sel: np.ndarray) -> dict[str, Any]:
        idx = np.nonzero(sel)[0]
        y, s = labels[idx], scores[idx]
        ms, mp = [masks[i] for i in idx], [maps[i] for i in idx]
        out: dict[str, Any] = {"n_images": int(idx.size), "n_anomalous": int(y.sum()),
                               "image_auroc": metrics.auroc(y, s)}
        has_masks = any(m.any() for m in ms)
        out["pixel_auroc"] = metrics.auroc(ms, mp) if has_masks else None
        out["aupro_0.3"] = metrics.aupro(ms, mp) if has_masks else None
        if 0 < y.sum() < y.size:
            out["image_f1_max"], out["f1_max_threshold"] = metrics.f1_max(y, s)
        if threshold is not None:
            out["at_calibrated_threshold"] = metrics.at_threshold(y, s, threshold)
        return out

    good = labels == 0
    report = {"overall": block(np.ones_like(labels, dtype=bool)), "per_defect": {}}
    for d in sorted(set(defects) - {"good"}):
        report["per_defect"][d] = block(good | (np.array(defects) == d))
    return report


def _overlay(image: np.ndarray, nmap: np.ndarray) -> np.ndarray:
    import matplotlib

    rgb = matplotlib.colormaps["jet"](nmap)[..., :3]
    return (0.55 * image / 255.0 + 0.45 * rgb).clip(0, 1)


def write_pictures(
    out_dir: Path, result: dict[str, np.ndarray], samples: list[Sample], threshold: float, low: float,
    n_cases: int = 4,
) -> list[str]:
    """ROC curves and a grid (image | heatmap overlay | ground truth) of the best and worst cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    labels, scores = result["labels"], result["scores"]
    defects = np.array([s.defect for s in samples])
    fig, ax = plt.subplots(figsize=(5, 5))
    if labels.min() != labels.max():
        fpr, tpr = metrics.roc_points(labels, scores)
        ax.plot(fpr, tpr, lw=2, label=f"all (AUROC {metrics.auroc(labels, scores):.3f})")
        for d in sorted(set(defects) - {"good"}):
            sel = (labels == 0) | (defects == d)
            f, t = metrics.roc_points(labels[sel], scores[sel])
            ax.plot(f, t, lw=1, label=f"{d} ({metrics.auroc(labels[sel], scores[sel]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image-level ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)
    files.append("roc.png")

    anomalous = np.nonzero(labels == 1)[0]
    good = np.nonzero(labels == 0)[0]
    cases = [
        ("best: highest-scored defects", "best_highestscored_defects.png",
         anomalous[np.argsort(-scores[anomalous])][:n_cases]),
        ("worst: lowest-scored defects", "worst_lowestscored_defects.png",
         anomalous[np.argsort(scores[anomalous])][:n_cases]),
        ("worst: highest-scored good", "worst_highestscored_good.png", good[np.argsort(-scores[good])][:n_cases]),
    ]
    for title, name, idx in cases:
        if len(idx) == 0:
            continue
        shown = []
        for i in idx:  # the image at the model's scale: the size of its map and mask
            p = result["plans"][i]
            shown.append(resize_rgb(read_image(samples[i].path), (p.h, p.w)))
        aspect = max(im.shape[0] / im.shape[1] for im in shown)  # height / width
        tall = aspect > 1.2  # elongated parts: cases side by side, each (image | overlay | truth)
        if tall:
            panel = 1.6
            fig, axes = plt.subplots(1, 3 * len(idx), figsize=(panel * 3 * len(idx), min(panel * aspect + 0.8, 12)),
                                     squeeze=False)
            rows = [axes[0, 3 * r:3 * r + 3] for r in range(len(idx))]
        else:
            fig, axes = plt.subplots(len(idx), 3, figsize=(7.5, max(2.5 * aspect, 1.2) * len(idx)), squeeze=False)
            rows = [axes[r] for r in range(len(idx))]
        for row, i, im in zip(rows, idx, shown):
            nmap = normalize(result["maps"][i], threshold, low)
            row[0].imshow(im)
            row[0].set_title(f"{samples[i].defect}/{samples[i].path.name}", fontsize=6 if tall else 7)
            row[1].imshow(_overlay(im, nmap))
            row[1].set_title(f"score {normalize(scores[i], threshold, low):.2f}\n(raw {scores[i]:.3g})",
                             fontsize=6 if tall else 7)
            row[2].imshow(result["masks"][i], cmap="gray", vmin=0, vmax=1)
            row[2].set_title("ground truth", fontsize=6 if tall else 7)
            for a in row:
                a.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        files.append(name)
    return files


def write_html(out_dir: Path, report: dict[str, Any], pictures: list[str]) -> None:
    rows = []
    for key, blk in [("overall", report["metrics"]["overall"]), *report["metrics"]["per_defect"].items()]:
        cal = blk.get("at_calibrated_threshold", {})

        def f(v):
            return "–" if v is None else f"{v:.3f}"

        rows.append(
            f"<tr><td>{html.escape(key)}</td><td>{blk['n_images']}</td><td>{f(blk['image_auroc'])}</td>"
            f"<td>{f(blk['pixel_auroc'])}</td><td>{f(blk['aupro_0.3'])}</td><td>{f(blk.get('image_f1_max'))}</td>"
            f"<td>{f(cal.get('precision'))}</td><td>{f(cal.get('recall'))}</td></tr>"
        )
    imgs = "".join(f'<h3>{html.escape(p)}</h3><img src="{html.escape(p)}">' for p in pictures)
    (out_dir / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>STPM evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}</style>"
        f"<h1>{html.escape(report['model'])}</h1><p>data: {html.escape(report['data'])}</p>"
        "<table><tr><th>subset</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th><th>AUPRO@0.3</th>"
        "<th>F1-max</th><th>precision @thr</th><th>recall @thr</th></tr>" + "".join(rows) + "</table>" + imgs
    )


def evaluate(
    model: nn.Module, manifest: dict[str, Any], data: str | Path, device: torch.device, out_dir: str | Path | None,
    progress: bool = True,
) -> dict[str, Any]:
    """Full evaluation of a bundle's model on `data` (MVTec layout); writes report.json + pictures (into
    out_dir, never into the bundle). `model`: its map module (stpm.weights.load_map), or an STPM (fused
    with the manifest's settings). progress: a tqdm bar (on a terminal)."""
    cfg = manifest["model"]
    amap = STPMMap(model, cfg.get("combine", "product"), cfg.get("sigma") or 0.0) if isinstance(model, STPM) else model
    cal = manifest["calibration"]
    geometry, spec = from_manifest(manifest), score_from_manifest(manifest)
    samples = test_samples(data)
    result = score_samples(amap, samples, geometry, device, spec, progress=progress)
    m = compute_metrics(result["labels"], result["scores"], result["masks"], result["maps"],
                        [s.defect for s in samples], cal["threshold"])
    report: dict[str, Any] = {
        "model": f"{manifest['name']}/{manifest['version']}", "data": str(data), "image_size": cfg["image_size"],
        "tiling": geometry.to_dict(), "image_score": spec.method, "threshold": cal["threshold"], "metrics": m,
        "per_image": [{"file": str(s.path), "defect": s.defect, "raw_score": float(sc),
                       "score": float(normalize(sc, cal["threshold"], cal["low"])), "tiles": p.n_tiles,
                       "scaled_size": [p.h, p.w]}
                      for s, sc, p in zip(samples, result["scores"], result["plans"])],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["pictures"] = write_pictures(out, result, samples, cal["threshold"], cal["low"])
        (out / "report.json").write_text(json.dumps(report, indent=2))
        write_html(out, report, report["pictures"])
    return report
