"""docs/BENCHMARKS.md's quality blocks: benchmarks/quality.py's methods and decisions tables (with what model
selection chose and what the ranking allows), the mixed-size and padding tables, and the map ablation. Rendered
through benchmarks/report.py like every generated block. Torch-free (the decisions' oracle line uses
stpm.evaluation.metrics: numpy and scikit-learn).
"""

from __future__ import annotations

import statistics
from typing import Any


def _command_line(res: dict[str, Any]) -> str:
    return f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}."


def _precision_recall(calibrated: dict[str, Any]) -> str:
    """P / R at the calibrated threshold (0 where a row recorded none)."""
    return f"{calibrated.get('precision', 0):.2f} / {calibrated.get('recall', 0):.2f}"


def quality_markdown(res: dict[str, Any]) -> str:
    lines = [_command_line(res), "",
             "| dataset | student | epochs | image AUROC | pixel AUROC | AUPRO@0.3 | F1-max | P/R @ calibrated thr "
             "| s/epoch | train img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["calibrated"] or {}
        lines.append(
            f"| {r['dataset']} | {r['student']} | {r['epochs']} (best {r['best_epoch']}) | {r['image_auroc']:.3f} "
            f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['f1_max']:.3f} | {_precision_recall(c)} "
            f"| {r['train_s_per_epoch']:.0f} | {r['train_images_per_s']:.2f} |")
    return "\n".join(lines)


TARGETS = {"bottle": (0.99, 0.97), "metal_plate": (0.98, 0.97), "kolektorsdd": (0.90, 0.95)}  # issue 12


def methods_markdown(res: dict[str, Any]) -> str:
    """benchmarks/quality.py --configs: one row per data set and method configuration."""
    lines = [_command_line(res), "",
             "| dataset | config | method (teacher) | sigma / image score | image AUROC | pixel AUROC | AUPRO@0.3 "
             "| F1-max | P/R @ calibrated thr | train s | score ms/img | issue 12 target img / px |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["calibrated"] or {}
        t = TARGETS.get(r["dataset"])
        target = "—"
        if t and r["config"] == "default":
            ok = r["image_auroc"] >= t[0] and r["pixel_auroc"] >= t[1] and r["train_s"] <= 900
            target = f"{t[0]:.2f} / {t[1]:.2f}, 15 min: {'met' if ok else 'missed'}"
        method = r["method"] + (f", {r['epochs']} epochs" if r.get("epochs") else "")
        teacher = r["teacher"] + (f" -> {r['student']}" if r.get("student") else "")
        lines.append(
            f"| {r['dataset']} | {r['config']} | {method} ({teacher}) | {r['sigma']:g} / {r['image_score']} "
            f"| {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['f1_max']:.3f} "
            f"| {_precision_recall(c)} | {r['train_s']:.0f} "
            f"| {r['score_ms_per_image']:.0f} | {target} |")
    return "\n".join(lines)


def both_markdown(res: dict[str, Any]) -> str:
    """A quality.py run shown whole: the methods table, then its decisions (the command line once)."""
    decisions = decisions_markdown(res).split("\n", 2)[2]  # without its command line and the blank after it
    again = (f" ({res['redecided']}, with the calibration code of that command; the P/R column above is at the "
             "threshold each bundle was published with)") if res.get("redecided") else ""
    return methods_markdown(res) + f"\n\nDecisions at the default threshold and the other rules{again}:\n\n" + decisions


def mixed_scale_markdown(res: dict[str, Any]) -> str:
    """benchmarks/mixed_scale.py: one row per mixed-size set and short-side quantile of the scale rule."""
    lines = [_command_line(res), "",
             "| dataset | scale = 256 / short side at quantile | scale | image AUROC | pixel AUROC | AUPRO@0.3 "
             "| F1-max | P/R @ calibrated thr | train tiles | test tiles (padded images / all) "
             "| train s (load average at the run's start or end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r["dataset"], r["quantile"])):
        c = r["calibrated"] or {}
        lines.append(
            f"| {r['dataset']} | {r['quantile']:g} | {r['scale']:.3f} | {r['image_auroc']:.3f} "
            f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['f1_max']:.3f} "
            f"| {_precision_recall(c)} | {r['n_train_tiles']} "
            f"| {r['test_tiles']} ({r['n_test_padded']} / {r['n_test']}) | {r['train_s']:.0f} "
            f"({_load_of(r)}) |")
    return "\n".join(lines)


def mixed_defects_markdown(res: dict[str, Any]) -> str:
    """benchmarks/mixed_defects.py: how much of its defect each mixed set's defective crops keep."""
    lines = [f"Command: `.venv/bin/python {res['command']}` (mixed sets of seed {res['seed']}; no model).", "",
             "| dataset | defective crops | share of the defect's pixels kept: median | crops keeping < 10 % "
             "| crops keeping < 25 % | defect pixels: median in the crop / in the full image |",
             "|---|---|---|---|---|---|"]
    for name, s in res["sets"].items():
        lines.append(f"| {name} | {s['n_defective']} | {percent(s['median_share_kept'], 0)} "
                     f"| {percent(s['share_below_10pct'], 0)} | {percent(s['share_below_25pct'], 0)} "
                     f"| {s['median_crop_px']:.0f} / {s['median_source_px']:.0f} |")
    return "\n".join(lines)


def _load_of(row: dict[str, Any]) -> str:
    """The load average a row recorded: at its start, or (rows before that fix) at its end."""
    return f"start {row['load_at_start']:.1f}" if "load_at_start" in row else f"end {row['load_at_end']:.1f}"


def feature_taps_markdown(res: dict[str, Any]) -> str:
    """benchmarks/feature_taps.py: PatchCore on other Lite activations, and the default's map smoothing and
    image score, one run per set (whole images, not the pipeline: compare within a set)."""
    machines = list(dict.fromkeys(r["machine"] for r in res["rows"]))
    lines = ["Commands: " + "; ".join(f"`.venv/bin/python {c}`" for c in res["commands"]) + ".",
             "Machine: " + "; ".join(machines) + ".", "",
             "| dataset | variant | taps (dims) | bank rows | image AUROC: max / top 1 % mean (sigma 4) "
             "| pixel AUROC (sigma 4) | fit / score CPU s |",
             "|---|---|---|---:|---|---:|---|"]
    for r in res["rows"]:
        img = r["image_auroc"]
        taps = " + ".join(r["taps"]) + (f", projected to {r['projection']}" if r["projection"] else "")
        lines.append(f"| {r['dataset']} | {r['variant']} | {taps} ({r['dims']}) | {r['bank_rows']:,} "
                     f"| {img['sigma 4, max']:.3f} / {img['sigma 4, top 0.01 mean']:.3f} "
                     f"| {r['pixel_auroc']['sigma 4']:.3f} | {r['fit_cpu_s']:.0f} / {r['score_cpu_s']:.0f} |")
    grid = [r for r in res["rows"] if r["variant"] == "default" and "sigma 2" in r["pixel_auroc"]]
    if grid:
        lines += ["", "The default taps under every map smoothing and image score (image AUROC; pixel AUROC last):", "",
                  "| dataset | sigma | max | top 0.1 % mean | top 1 % mean | top 5 % mean | pixel AUROC |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in grid:
            for sigma in (2, 4, 8):
                img = r["image_auroc"]
                cells = " | ".join(f"{img[f'sigma {sigma}, {k}']:.3f}"
                                   for k in ("max", "top 0.001 mean", "top 0.01 mean", "top 0.05 mean"))
                lines.append(f"| {r['dataset']} | {sigma} | {cells} | {r['pixel_auroc'][f'sigma {sigma}']:.3f} |")
    return "\n".join(lines)


def padding_content_markdown(res: dict[str, Any]) -> str:
    """benchmarks/padding_content.py: one row per shared set and padding mode."""
    lines = [_command_line(res), "",
             "| dataset | padding | good crops: median score (in context) | median change vs in context "
             "| good crops over the threshold (in context) | crop image AUROC (in context) | crops good / defective |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['dataset']} | {r['mode']} | {r['good_median_score']:.3f} ({r['good_median_in_context']:.3f}) "
            f"| {r['good_median_abs_change']:.3f} | {r['good_over_threshold']:.2f} "
            f"({r['good_over_threshold_in_context']:.2f}) | {r['crop_auroc']:.3f} ({r['crop_auroc_in_context']:.3f}) "
            f"| {r['n_good']} / {r['n_defective']} |")
    return "\n".join(lines)


def percent(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f} %"


DECISION_TARGETS = {"bottle": (0.95, 0.95), "metal_plate": (0.95, 0.95), "kolektorsdd": (0.90, 0.80)}  # issue 25


RULE_NAMES = {"held_out_only": "target_fpr, held-out images only (no cross-fitting)"}


def row_label(row: dict[str, Any]) -> str:
    """A quality row's name in the decision lines: its data set, and its config where that is not the default
    (a run of several configs has one row per set and config)."""
    config = row.get("config", "default")
    return row["dataset"] if config == "default" else f"{row['dataset']} ({config})"


def decisions_markdown(res: dict[str, Any]) -> str:
    """benchmarks/quality.py --configs default: the default threshold's decisions per set beside what the
    bundle states, and the former default (max_margin) and synthetic_f1 from the same run's scores."""
    lines = [_command_line(res)
             + (f" The threshold columns: {res['redecided']}." if res.get("redecided") else ""), "",
             "| dataset | rule | threshold | expected FPR (90 % interval), from n good | realised FPR on test/good "
             "| synthetic recall | precision / recall on test | issue 25 target P / R | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for rule, d in (r.get("decisions") or {}).items():
            iv = d.get("expected_fpr_interval")
            span = f" ({percent(iv[0])} – {percent(iv[1])})" if iv else ""
            fp = round(d["realised_fpr"] * d["n_test_good"])
            t = DECISION_TARGETS.get(r["dataset"]) if rule == "default" else None
            met = "—"
            if t:
                met = "yes" if d["precision"] >= t[0] and d["recall"] >= t[1] else "**no**"
            syn = "—" if d.get("synthetic_recall") is None else f"{d['synthetic_recall']:.2f} of {d['n_synthetic']}"
            name = "**default** (" + d["rule"] + ")" if rule == "default" else RULE_NAMES.get(rule, rule)
            lines.append(
                f"| {row_label(r)} | {name} | {d['threshold']:.4g} | {percent(d.get('expected_fpr'))}{span}, "
                f"n = {d['n_good_images']} | {percent(d['realised_fpr'])} ({fp} of {d['n_test_good']}) | {syn} "
                f"| {d['precision']:.2f} / {d['recall']:.2f} | {f'{t[0]:.2f} / {t[1]:.2f}' if t else '—'} | {met} |")
    lines += ["", "What model selection chose (on synthetic anomalies of the held-out good images):", ""]
    lines += [f"- {row_label(r)}: {_chosen(r)}" for r in res["rows"]]
    ceilings = [_ceiling(r) for r in res["rows"] if (r.get("scores") or {}).get("test_scores")]
    if ceilings:
        lines += ["", "What the ranking allows: the highest recall on test at the target precision over *every* "
                  "threshold (an oracle that reads the test labels: no rule without them can do better), the "
                  "highest threshold that gives it, and the share of the good calibration scores (held out and out of "
                  "fold) at or above it, the false-positive rate that threshold would be expected to have:", ""]
        lines += ceilings
    spread = [_good_medians(r) for r in res["rows"] if (r.get("scores") or {}).get("out_of_fold_good")]
    if spread:
        lines += ["", "The good images' scores by source (median, and the 90th percentile): held-out images (scored by "
                  "the final model), training images scored out of fold (by the model fitted without their fold: "
                  "PatchCore's bank of the other folds, or an STPM student of their own), and test/good (unseen):",
                  ""] + spread
    return "\n".join(lines)


def _ceiling(row: dict[str, Any]) -> str:
    """The best test recall at the issue's target precision over every threshold, for one quality row."""
    from stpm.evaluation.metrics import at_threshold  # numpy / scikit-learn only

    s = row["scores"]
    bad = [d != "good" for d in s["test_defects"]]
    target_p = DECISION_TARGETS.get(row["dataset"], (0.90, 0.0))[0]
    best = None  # (recall, precision, threshold): of equal recalls the highest threshold (fewest false alarms)
    for thr in sorted(set(s["test_scores"]), reverse=True):
        m = at_threshold(bad, s["test_scores"], thr)
        if m["tp"] and m["precision"] >= target_p and (best is None or m["recall"] > best[0]):
            best = (m["recall"], m["precision"], thr)
    if best is None:
        return f"- {row_label(row)}: no threshold reaches precision {target_p:.2f} on test"
    pool = [float(v) for v in (s.get("val_good") or []) + (s.get("out_of_fold_good") or [])]
    share = f"; {percent(sum(v >= best[2] for v in pool) / len(pool))} of the {len(pool)} calibration scores" if pool else ""
    default = (row.get("decisions") or {}).get("default")
    now = f" (the default threshold: {default['recall']:.2f})" if default else ""
    return (f"- {row_label(row)}: recall {best[0]:.2f} at precision {best[1]:.2f} (>= {target_p:.2f}){now}, "
            f"threshold {best[2]:.4g}{share}")


def _good_medians(row: dict[str, Any]) -> str:
    s = row["scores"]
    test_good = [v for v, d in zip(s["test_scores"], s["test_defects"]) if d == "good"]

    def q(v: list[float]) -> str:
        p90 = statistics.quantiles(v, n=10, method="inclusive")[-1] if len(v) > 1 else v[0]
        return f"{statistics.median(v):.4g} / {p90:.4g} (n = {len(v)})"

    return (f"- {row_label(row)}: held-out {q(s['val_good'])}; out of fold {q(s['out_of_fold_good'])}; "
            f"test/good {q(test_good)}")


def _prior(row: dict[str, Any]) -> str:
    """The position prior's choice (stpm.training.position_prior), where the run recorded one."""
    pr = (row.get("selection") or {}).get("position_prior")
    if not pr:
        return ""
    if "synthetic_image_auroc_with" not in pr:
        return f"; no position prior ({pr['reason']})"
    verdict = "kept" if pr["chosen"] else "not kept"
    return (f"; position prior {verdict} ({pr['mode']}: synthetic image AUROC {pr['synthetic_image_auroc_without']:.4f}"
            f" without, {pr['synthetic_image_auroc_with']:.4f} with, from {pr['n_images']} out-of-fold maps on a "
            f"{pr['grid'][0]} x {pr['grid'][1]} grid)")


def _chosen(row: dict[str, Any]) -> str:
    """One quality row's choice: resolution and layers (stpm.training.settings), sigma and image score, and the
    position prior."""
    tail = f"sigma {row['sigma']:g}, image score {row['image_score']}{_prior(row)}"
    st = row.get("settings")
    if not st:
        fixed = "default" if row.get("config", "default") == "default" else f"the {row['config']} config's"
        return f"{fixed} resolution and layers (no settings search), {tail}"
    tried = "; ".join(f"x{c['scale_factor']:g} {','.join(c['layers'])}: {c['synthetic_image_auroc']:.3f}"
                      for c in st["candidates"])
    out = "".join(f"; left out: x{c['scale_factor']:g} {','.join(c['layers'])}"
                  + (f" ({c['synthetic_image_auroc']:.3f})" if "synthetic_image_auroc" in c else "") + f", {c['why']}"
                  for c in st.get("left_out", []))
    kind = "search (auto)" if st.get("mode") == "auto" else "search"
    c = st["chosen"]
    return (f"scale x{c['scale_factor']:g} of the default, layers {','.join(c['layers'])}, {tail} "
            f"(synthetic image AUROC per candidate: {tried}{out}; {kind} {st.get('search_s', 0):.0f} s)")


def ensemble_markdown(res: dict[str, Any]) -> str:
    """benchmarks/ensemble_maps.py: two bundles' maps alone and fused, on one test set."""
    bundles = "; ".join(f"{b['method']} ({b['teacher']}{' -> ' + b['student'] if b.get('student') else ''}, image "
                        f"score {b['image_score']}): `{b['bundle']}`" for b in res["bundles"])
    lines = [f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}. Bundles: {bundles}. "
             f"{res['n_test']} test images.", "",
             "| maps | image AUROC (max) | image AUROC (top-1 % mean) | image AUROC (the bundle's own score) "
             "| pixel AUROC | AUPRO@0.3 |", "|---|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    for r in res["rows"]:
        if "pixel_auroc" not in r:
            continue
        own = f(r.get("image_auroc_as_bundle"))
        lines.append(f"| {r['name']} | {f(r['image_auroc_max'])} | {f(r['image_auroc_topk_mean'])} | {own} "
                     f"| {f(r['pixel_auroc'])} | {f(r['aupro'])} |")
    for r in res["rows"]:
        if "image_auroc_as_bundles" in r:
            lines += ["", f"The mean of the two bundles' own image scores, each on its threshold's scale: image AUROC "
                          f"{f(r['image_auroc_as_bundles'])}."]
    return "\n".join(lines)


def map_ablation_markdown(res: dict[str, Any]) -> str:
    lines = [f"Bundle: `{res['bundle']}` (a temporary bundle of the 128 px bottle run, not kept: rerunning needs a "
             "new bundle), data `" + res["data"] + "`.", "",
             "| fusion | sigma | image AUROC | pixel AUROC | AUPRO@0.3 |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['combine']} | {r['sigma']:g} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                     f"{r['aupro']:.3f} |")
    spread = max(r["pixel_auroc"] for r in res["rows"]) - min(r["pixel_auroc"] for r in res["rows"])
    lines += ["", f"Pixel AUROC spread over these settings: {spread:.3f}."]
    return "\n".join(lines)
