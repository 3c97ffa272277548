"""The pictures of an evaluation report: ROC curves, best / worst case grids, and the HTML page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from stpm.bundle.calibration import Calibration
from stpm.evaluation import metrics
from stpm.imaging.decode import read_image, resize_rgb
from stpm.training.data import Sample


def _overlay(image: np.ndarray, nmap: np.ndarray) -> np.ndarray:
    import matplotlib

    rgb = matplotlib.colormaps["jet"](nmap)[..., :3]
    return (0.55 * image / 255.0 + 0.45 * rgb).clip(0, 1)


def _roc_figure(out_dir: Path, labels: np.ndarray, scores: np.ndarray, defects: np.ndarray) -> str:
    import matplotlib.pyplot as plt

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
    return "roc.png"


def _case_grid(out_dir: Path, name: str, title: str, idx: np.ndarray, result: dict[str, Any], samples: list[Sample],
               cal: Calibration) -> str:
    """(image | heatmap overlay | ground truth) for each case, at the model's scale (the map's size)."""
    import matplotlib.pyplot as plt

    shown = [resize_rgb(read_image(samples[i].path), (result["plans"][i].h, result["plans"][i].w)) for i in idx]
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
    size = 6 if tall else 7
    for row, i, im in zip(rows, idx, shown):
        raw = result["scores"][i]
        row[0].imshow(im)
        row[0].set_title(f"{samples[i].defect}/{samples[i].path.name}", fontsize=size)
        row[1].imshow(_overlay(im, cal.normalise(result["maps"][i] - result.get("map_offset", 0.0))))
        row[1].set_title(f"score {float(cal.normalise(raw)):.2f}\n(raw {raw:.3g})", fontsize=size)
        row[2].imshow(result["masks"][i], cmap="gray", vmin=0, vmax=1)
        row[2].set_title("ground truth", fontsize=size)
        for a in row:
            a.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    return name


def write_pictures(out_dir: Path, result: dict[str, Any], samples: list[Sample], cal: Calibration,
                   n_cases: int = 4) -> list[str]:
    """ROC curves and grids (image | heatmap overlay | ground truth) of the best and worst cases."""
    import matplotlib

    matplotlib.use("Agg")
    labels, scores = result["labels"], result["scores"]
    files = [_roc_figure(out_dir, labels, scores, np.array([s.defect for s in samples]))]
    anomalous, good = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    cases = [
        ("best: highest-scored defects", "best_highestscored_defects.png",
         anomalous[np.argsort(-scores[anomalous])][:n_cases]),
        ("worst: lowest-scored defects", "worst_lowestscored_defects.png",
         anomalous[np.argsort(scores[anomalous])][:n_cases]),
        ("worst: highest-scored good", "worst_highestscored_good.png", good[np.argsort(-scores[good])][:n_cases]),
    ]
    files += [_case_grid(out_dir, name, title, idx, result, samples, cal) for title, name, idx in cases if len(idx)]
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
    decision = decision_html(report["decision"]) if "decision" in report else ""
    (out_dir / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>STPM evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}</style>"
        f"<h1>{html.escape(report['model'])}</h1><p>data: {html.escape(report['data'])}</p>"
        "<table><tr><th>subset</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th><th>AUPRO@0.3</th>"
        "<th>F1-max</th><th>precision @thr</th><th>recall @thr</th></tr>" + "".join(rows) + "</table>" + decision
        + imgs
    )


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def decision_html(d: dict[str, Any]) -> str:
    """The calibration's promise beside what this test set shows at its threshold."""
    e, r = d["expected"], d["realised"]
    interval = e.get("expected_fpr_interval")
    span = f" ({_pct(interval[0])} – {_pct(interval[1])})" if interval else ""
    target = f", target {_pct(e['target_fpr'])}" if e.get("target_fpr") is not None else ""
    syn = "–" if e.get("synthetic_recall") is None else f"{e['synthetic_recall']:.2f} of {e['n_synthetic_images']}"
    prec = "–" if r.get("precision") is None else f"{r['precision']:.2f}"
    rec = "–" if r.get("recall") is None else f"{r['recall']:.2f}"
    rows = [("rule", html.escape(f"{e['rule']}{target}"), ""),
            ("false-positive rate on good parts", f"{_pct(e.get('expected_fpr'))}{span} from {e['n_good_images']} "
             "held-out good images", f"{_pct(r.get('fpr_on_test_good'))} of {r['n_test_good']} test/good"),
            ("recall", f"{syn} synthetic anomalies", f"{rec} of {r['n_test_anomalous']} test anomalies"),
            ("precision", "", f"{prec}")]
    body = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    return ("<h2>Decisions at the threshold</h2><table><tr><th></th><th>expected (calibration)</th>"
            f"<th>realised (this test set)</th></tr>{body}</table>" + operating_points_html(d.get("operating_points")))


def operating_points_html(points: list[dict[str, Any]] | None) -> str:
    """Other thresholds the recorded scores allow (stpm calibrate MODEL --target-fpr T), each with what the
    calibration expects and what this test set shows."""
    if not points:
        return ""

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    bold = ' style="font-weight:bold"'
    body = "".join(
        f"<tr{bold if p['current'] else ''}><td>{_pct(p['target_fpr'])}</td>"
        f"<td>{p['threshold']:.4g}</td><td>{_pct(p['expected_fpr'])}</td><td>{cell(p['synthetic_recall'])}</td>"
        f"<td>{_pct(p['fpr_on_test_good'])} ({p['n_flagged_good']})</td><td>{cell(p['precision'])}</td>"
        f"<td>{cell(p['recall'])}</td></tr>" for p in points)
    return ("<h2>Other operating points</h2><p>The threshold <code>stpm calibrate MODEL --target-fpr T</code> "
            "would set from the scores this model recorded (no retraining); the model's own row in bold.</p>"
            "<table><tr><th>target FPR T</th><th>threshold</th><th>expected FPR</th><th>synthetic recall</th>"
            "<th>FPR on test/good (flagged)</th><th>precision</th><th>recall</th></tr>" + body + "</table>")


__all__ = ["decision_html", "operating_points_html", "write_html", "write_pictures"]
