"""The generated blocks of docs/BENCHMARKS.md, docs/DISTILLATION.md, docs/DOCKER.md and docs/SCALING.md: each one is the Markdown of one
result file in benchmarks/results/ (or one run's per-seed files), rendered here, and marked in the doc so
nobody types into it. Torch-free.

    <!-- BEGIN generated KEY: ... do not edit -->
    ...
    <!-- END generated KEY -->

A benchmark script writes its own block after a run (`write_block`); `python benchmarks/report.py`
re-renders every block from the result files (`--check`: fail if a block differs, as tests/test_docs.py
does). Text outside the blocks is prose: it explains and reads the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` and `stpm` import from the checkout
    sys.path.insert(0, str(ROOT))
from benchmarks.report_bank import bank_size_markdown, bank_speed_markdown  # noqa: E402  (issue 26's tables)
from benchmarks.report_faults import scale_faults_markdown  # noqa: E402  (docs/SCALING.md's faults table)

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"
DISTILL_DOC = ROOT / "docs" / "DISTILLATION.md"
DOCKER_DOC = ROOT / "docs" / "DOCKER.md"
SCALING_DOC = ROOT / "docs" / "SCALING.md"
DOCS = (DOC, DISTILL_DOC, DOCKER_DOC, SCALING_DOC)
BLOCK = re.compile(r"<!-- BEGIN generated (?P<key>[\w.-]+):[^>]*-->\n(?P<body>.*?)<!-- END generated (?P=key) -->",
                   re.DOTALL)


# ------------------------------------------------------------------------------------ renderers

def quality_markdown(res: dict[str, Any]) -> str:
    lines = [f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}.", "",
             "| dataset | student | epochs | image AUROC | pixel AUROC | AUPRO@0.3 | F1-max | P/R @ calibrated thr "
             "| s/epoch | train img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["calibrated"] or {}
        lines.append(
            f"| {r['dataset']} | {r['student']} | {r['epochs']} (best {r['best_epoch']}) | {r['image_auroc']:.3f} "
            f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['f1_max']:.3f} | {c.get('precision', 0):.2f} / "
            f"{c.get('recall', 0):.2f} | {r['train_s_per_epoch']:.0f} | {r['train_images_per_s']:.2f} |")
    return "\n".join(lines)


TARGETS = {"bottle": (0.99, 0.97), "metal_plate": (0.98, 0.97), "kolektorsdd": (0.90, 0.95)}  # issue 12


def methods_markdown(res: dict[str, Any]) -> str:
    """benchmarks/quality.py --configs: one row per data set and method configuration."""
    lines = [f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}.", "",
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
            f"| {c.get('precision', 0):.2f} / {c.get('recall', 0):.2f} | {r['train_s']:.0f} "
            f"| {r['score_ms_per_image']:.0f} | {target} |")
    return "\n".join(lines)


def both_markdown(res: dict[str, Any]) -> str:
    """A quality.py run shown whole: the methods table, then its decisions (the command line once)."""
    decisions = decisions_markdown(res).split("\n", 2)[2]  # without its command line and the blank after it
    return methods_markdown(res) + "\n\nDecisions at the default threshold and the other rules:\n\n" + decisions


def mixed_scale_markdown(res: dict[str, Any]) -> str:
    """benchmarks/mixed_scale.py: one row per mixed-size set and short-side quantile of the scale rule."""
    lines = [f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}.", "",
             "| dataset | scale = 256 / short side at quantile | scale | image AUROC | pixel AUROC | AUPRO@0.3 "
             "| F1-max | P/R @ calibrated thr | train tiles | test tiles (padded images / all) "
             "| train s (load average at the run's start or end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r["dataset"], r["quantile"])):
        c = r["calibrated"] or {}
        lines.append(
            f"| {r['dataset']} | {r['quantile']:g} | {r['scale']:.3f} | {r['image_auroc']:.3f} "
            f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['f1_max']:.3f} "
            f"| {c.get('precision', 0):.2f} / {c.get('recall', 0):.2f} | {r['n_train_tiles']} "
            f"| {r['test_tiles']} ({r['n_test_padded']} / {r['n_test']}) | {r['train_s']:.0f} "
            f"({_load_of(r)}) |")
    return "\n".join(lines)


def _load_of(row: dict[str, Any]) -> str:
    """The load average a row recorded: at its start, or (rows before that fix) at its end."""
    return f"start {row['load_at_start']:.1f}" if "load_at_start" in row else f"end {row['load_at_end']:.1f}"


def padding_content_markdown(res: dict[str, Any]) -> str:
    """benchmarks/padding_content.py: one row per shared set and padding mode."""
    lines = [f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}.", "",
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


def _pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f} %"


RULE_NAMES = {"held_out_only": "target_fpr, held-out images only (no cross-fitting)"}


def decisions_markdown(res: dict[str, Any]) -> str:
    """benchmarks/quality.py --configs default: the default threshold's decisions per set beside what the
    bundle states, and the former default (max_margin) and synthetic_f1 from the same run's scores."""
    lines = [f"Command: `.venv/bin/python {res['command']}`. Machine: {res['machine']}."
             + (f" The threshold columns: {res['redecided']}." if res.get("redecided") else ""), "",
             "| dataset | rule | threshold | expected FPR (90 % interval), from n good | realised FPR on test/good "
             "| synthetic recall | precision / recall on test | issue 25 target P / R | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for rule, d in (r.get("decisions") or {}).items():
            iv = d.get("expected_fpr_interval")
            span = f" ({_pct(iv[0])} – {_pct(iv[1])})" if iv else ""
            fp = round(d["realised_fpr"] * d["n_test_good"])
            t = DECISION_TARGETS.get(r["dataset"]) if rule == "default" else None
            met = "—"
            if t:
                met = "yes" if d["precision"] >= t[0] and d["recall"] >= t[1] else "**no**"
            syn = "—" if d.get("synthetic_recall") is None else f"{d['synthetic_recall']:.2f} of {d['n_synthetic']}"
            name = "**default** (" + d["rule"] + ")" if rule == "default" else RULE_NAMES.get(rule, rule)
            lines.append(
                f"| {r['dataset']} | {name} | {d['threshold']:.4g} | {_pct(d.get('expected_fpr'))}{span}, "
                f"n = {d['n_good_images']} | {_pct(d['realised_fpr'])} ({fp} of {d['n_test_good']}) | {syn} "
                f"| {d['precision']:.2f} / {d['recall']:.2f} | {f'{t[0]:.2f} / {t[1]:.2f}' if t else '—'} | {met} |")
    lines += ["", "What model selection chose (on synthetic anomalies of the held-out good images):", ""]
    lines += [f"- {r['dataset']}: {_chosen(r)}" for r in res["rows"]]
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
                  "the final model), training images scored out of fold (by the bank without their fold), and "
                  "test/good (unseen):", ""] + spread
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
        return f"- {row['dataset']}: no threshold reaches precision {target_p:.2f} on test"
    pool = [float(v) for v in (s.get("val_good") or []) + (s.get("out_of_fold_good") or [])]
    share = f"; {_pct(sum(v >= best[2] for v in pool) / len(pool))} of the {len(pool)} calibration scores" if pool else ""
    default = (row.get("decisions") or {}).get("default")
    now = f" (the default threshold: {default['recall']:.2f})" if default else ""
    return (f"- {row['dataset']}: recall {best[0]:.2f} at precision {best[1]:.2f} (>= {target_p:.2f}){now}, "
            f"threshold {best[2]:.4g}{share}")


def _good_medians(row: dict[str, Any]) -> str:
    s = row["scores"]
    test_good = [v for v, d in zip(s["test_scores"], s["test_defects"]) if d == "good"]

    def q(v: list[float]) -> str:
        p90 = statistics.quantiles(v, n=10, method="inclusive")[-1] if len(v) > 1 else v[0]
        return f"{statistics.median(v):.4g} / {p90:.4g} (n = {len(v)})"

    return (f"- {row['dataset']}: held-out {q(s['val_good'])}; out of fold {q(s['out_of_fold_good'])}; "
            f"test/good {q(test_good)}")


def _chosen(row: dict[str, Any]) -> str:
    """One quality row's choice: resolution and layers (stpm.training.settings), sigma and image score."""
    tail = f"sigma {row['sigma']:g}, image score {row['image_score']}"
    st = row.get("settings")
    if not st:
        return f"default resolution and layers (no --search-settings), {tail}"
    tried = "; ".join(f"x{c['scale_factor']:g} {','.join(c['layers'])}: {c['synthetic_image_auroc']:.3f}"
                      for c in st["candidates"])
    c = st["chosen"]
    return (f"scale x{c['scale_factor']:g} of the default, layers {','.join(c['layers'])}, {tail} "
            f"(synthetic image AUROC per candidate: {tried}; search {st.get('search_s', 0):.0f} s)")


DECISION_TARGETS = {"bottle": (0.95, 0.95), "metal_plate": (0.95, 0.95), "kolektorsdd": (0.90, 0.80)}  # issue 25


def _log_error(realised: float, alpha: float) -> float:
    """|log2(realised / alpha)|, realised floored at alpha / 8: how many doublings off the target."""
    import math

    return abs(math.log2(max(realised, alpha / 8) / alpha))


def estimators_markdown(res: dict[str, Any]) -> str:
    """benchmarks/calibration_estimators.py: realised vs targeted false-positive rates per tail estimator."""
    known, real = res["known"], res.get("real", [])
    ests = list(dict.fromkeys(r["estimator"] for r in known))
    ns = sorted({r["n"] for r in known})
    a0 = min(r["alpha"] for r in known)
    lines = [f"Command: `.venv/bin/python {res['command']}`.", "",
             f"Known distributions ({len({r['distribution'] for r in known})}), target {_pct(a0)}: the true "
             "false-positive rate at the estimated threshold, averaged over samples of n; the median over the "
             "distributions, in brackets the lowest and highest; last column the largest share of samples whose "
             "threshold fell below the true median.", "",
             "| estimator | " + " | ".join(f"n = {n}" for n in ns) + " | below the median |",
             "|---|" + "---|" * (len(ns) + 1)]
    for e in ests:
        cells = []
        for n in ns:
            v = [r["mean_fpr"] for r in known if r["estimator"] == e and r["n"] == n and r["alpha"] == a0]
            cells.append(f"{_pct(statistics.median(v), 2)} ({_pct(min(v), 2)} – {_pct(max(v), 2)})")
        below = max(r["share_below_median"] for r in known if r["estimator"] == e)
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {below:.3f} |")
    if res.get("known_command"):
        lines[0] = f"Command: `.venv/bin/python {res['command']}` (known distributions: `{res['known_command']}`)."
    if real:
        lines += _real_estimators(real, ests, res.get("scores_machine", ""),
                                  res.get("scores_file", "calibration_scores.json"))
    return "\n".join(lines)


def _real_estimators(real: list[dict[str, Any]], ests: list[str], machine: str, source: str) -> list[str]:
    sets = list(dict.fromkeys(r["dataset"] for r in real))
    alphas = sorted({r["alpha"] for r in real})
    runs = {d: next(r for r in real if r["dataset"] == d) for d in sets}
    head = " | ".join(f"{d} (n = {runs[d]['n_fit']}) @ {_pct(a, 0)}" for d in sets for a in alphas)
    counts = ", ".join(f"{d}: {runs[d]['runs']} training run(s)" for d in sets)
    lines = ["", f"Real scores ({counts}; "
             f"scores from benchmarks/results/{source}, {machine}): the realised rate on the unseen good images "
             "of random splits (resampled; in brackets: fitted on the held-out images, checked on test/good); last "
             "column the mean number of doublings off the target over these cells (the criterion).", "",
             f"| estimator | {head} | doublings off |", "|---|" + "---|" * (len(sets) * len(alphas) + 1)]
    for e in ests:
        cells, err = [], []
        for d in sets:
            for a in alphas:
                r = next(x for x in real if x["estimator"] == e and x["dataset"] == d and x["alpha"] == a)
                cells.append(f"{_pct(r['resampled_fpr'], 2)} ({_pct(r['deployed_fpr'], 1)})")
                err.append(_log_error(r["resampled_fpr"], a))
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {statistics.fmean(err):.2f} |")
    return lines


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


SPEED_TARGETS = (  # (ratio key, limit, what) from issue 4
    ("ort_over_torch_b1", 0.75, "bare ONNX Runtime session vs torch eager, batch 1"),
    ("full_over_ort_b1", 1.2, "full path (bytes -> decode -> score -> overlay PNG at input size) vs bare session, batch 1"),
    ("full_model_overlay_over_ort_b1", 1.2, "full path with the overlay at the model's size vs bare session, batch 1"),
    ("best_ort_fp32_over_bound", 1.4, "best fp32 ONNX Runtime ms/image vs the fp32 bound"),
)


def speed_target_lines(res: dict[str, Any]) -> str:
    out = []
    for key, limit, what in SPEED_TARGETS:
        if key in res["ratios"]:
            v = res["ratios"][key]
            out.append(f"- {what}: **{v:.3f}** (target <= {limit}: {'met' if v <= limit else 'not met'})")
    for key, r in res["results"].items():
        bd = r.get("breakdown_ms_per_image")
        if bd and r["batch"] == 1:
            out.append(f"- {key}: decode + resize and render add **{100 * (bd['decode_ms'] + bd['render_ms']) / bd['infer_ms']:.0f} %** "
                       f"to the inference ({bd['decode_ms']:.1f} + {bd['render_ms']:.1f} ms on {bd['infer_ms']:.1f} ms)")
    if "int8" in res:
        q = res["int8"]
        verdict = 'shipped as precision="int8"' if q["shipped"] else "NOT shipped (parity does not hold)"
        out.append(f"- INT8 ({q.get('method', 'static')}; calibrated on {q['n_calibration_images']} good images): "
                   f"decision agreement {q['decision_agreement']:.3f} on {q['n_check_images']} test images, image "
                   f"AUROC {q['auroc_fp32']:.3f} -> {q['auroc_int8']:.3f} ({q['auroc_change']:+.3f}); {verdict}")
    return "\n".join(out)


def speed_markdown(res: dict[str, Any]) -> str:
    """One speed run: command, machine, table, targets."""
    from stpm.evaluation.speed import format_table  # torch-free at import

    m = res["machine"]
    return (
        f"Run `{res['bundle']}` ({res['model']['backbone']}, {res['model']['image_size']} px). "
        f"Command: `{res['command']}`.\n"
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} threads; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}; load average {m['load_avg_at_start'][0]:.1f} at start, "
        f"{m['load_avg_at_end'][0]:.1f} at end (contenders run interleaved in rounds so load hits them alike). "
        f"Images: {res['images']['n']} files of {res['images']['source_size'][0]} px.\n\n"
        + format_table(res) + "\n\nAgainst the targets:\n\n" + speed_target_lines(res)
    )


def png_encode_markdown(res: dict[str, Any]) -> str:
    m, im = res["machine"], res["images"]
    ours = res["rows"][0]
    lines = [f"Command: `{res['command'].strip()}`. Machine: {m['cpu']}, {m['cpus']} CPUs, load average "
             f"{m['load_avg_at_start']:.1f} at start, {m['load_avg_at_end']:.1f} at end; Pillow {m['pillow']}. "
             f"{im['n']} overlays of {im['shape'][1]}x{im['shape'][0]} RGB ({im['source']}), median of "
             f"{res['repeats']} passes.", "",
             "| encoder | ms/image | kB/image | time vs ours |", "|---|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['encoder']} | {r['ms_per_image']:.1f} | {r['kb_per_image']:.0f} | "
                     f"{r['ms_per_image'] / ours['ms_per_image']:.2f}x |")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def load_markdown(res: dict[str, Any]) -> str:
    """benchmarks/load.py: the service under K concurrent clients vs the bare scorer."""
    m, bare, rss = res["machine"], res["bare_scorer"], res["server_rss_mb"]
    threads = res["intra_op_threads"] or "default"
    lines = [f"Machine: {m['cpus']} CPUs ({m['platform']}), load average {m['loadavg_1m_at_end']:.1f} at the end; "
             f"ORT intra-op threads: {threads}; model `{res['model']}`, image `{res['image']}` "
             f"({res['image_bytes'] / 1000:.0f} kB), heatmap={res['heatmap']}.", "",
             "| clients | req/s | p50 ms | p99 ms | errors | server RSS MB |", "|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        lines.append(f"| {r['clients']} | {r['req_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                     f"{r['server_rss_mb']:.0f} |")
    errors = sum(r["errors"] for r in res["runs"])
    ov = res["http_overhead_batch1"]
    peak = max([rss["after"]] + [r["server_rss_mb"] for r in res["runs"]])
    overhead = ("not measured (no 1-client run)" if ov is None
                else f"**{100 * ov:+.1f} %** (target <= 25 %: {_verdict(ov <= 0.25)})")
    batch = res["mean_batch_images"]
    lines += ["", f"Bare scorer (batch 1, decode + infer, mean of before and after the load): p50 "
              f"{bare['p50_ms']:.0f} ms. HTTP overhead at batch 1 (p50): {overhead}. Server RSS {rss['before']:.0f} "
              f"MB idle with the model loaded, {rss['after']:.0f} MB after the runs (target <= 400 MB: "
              f"{_verdict(peak <= 400)}). Errors: {errors} (target 0: {_verdict(errors == 0)}). Mean images per "
              f"inference batch: {'not recorded' if batch is None else f'{batch:.2f}'}."]
    return "\n".join(lines)


SWEEP_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # the result file keeps every flag


def sweep_markdown(res: dict[str, Any]) -> str:
    """benchmarks/load.py --sweep: the batcher's (batch, wait) per backend, and the choice it supports."""
    from benchmarks.batching import Rule, choose

    m, rule = res["machine"], res["rule"]
    clients = [r["clients"] for r in res["points"][0]["runs"]]
    head = " | ".join(f"{k} cl. img/s | p50 / p99 ms" for k in clients)
    lines = [f"Command: `flock /work/scratch/bench.lock .venv/bin/python {res['command']}` ({res['when']}). "
             f"Machine: {m['cpu']}, {m['cpus']} CPUs (flags include "
             f"{', '.join(f for f in SWEEP_FLAGS if f in m['flags']) or 'none of ' + ', '.join(SWEEP_FLAGS)}), "
             f"load average (1 min) {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end. "
             f"Model `{res['model']}` ({res['method']}), image `{res['image']}` ({res['image_bytes'] / 1000:.0f} kB), "
             f"heatmap={res['heatmap']}, {res['duration_s']:g} s per client count, a fresh server per setting and round, "
             f"{res['repeats']} rounds over the grid (every other one backwards), each cell the median of the rounds; "
             f"ORT/OpenVINO threads {res['intra_op_threads']}; backend and precision as the server's /readyz reports "
             "them.", "",
             f"| backend / precision | batch | wait ms | {head} | mean batch at {clients[-1]} cl. | 1-min load, "
             f"{clients[-1]} cl. runs |",
             "|---|---:|---:|" + "---:|---:|" * len(clients) + "---:|---:|"]
    for p in sorted(res["points"], key=lambda p: (p["backend"], p["batch"], p["wait_ms"])):
        cells = " | ".join(f"{r['req_per_s']:.2f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f}" for r in p["runs"])
        last = p["runs"][-1]
        mb = "—" if last.get("mean_batch_images") is None else f"{last['mean_batch_images']:.2f}"
        errors = sum(r["errors"] for r in p["runs"])
        lines.append(f"| {p['served']['backend']} / {p['served']['precision']} | {p['batch']} | {p['wait_ms']:g} | "
                     f"{cells} | {mb} | {', '.join(f'{a:.1f}->{b:.1f}' for a, b in last['loadavg_1m'])} |"
                     + (f" **{errors} errors**" if errors else ""))
    r = Rule(clients=rule["clients"], max_slowdown=rule["max_slowdown"], tie=rule["tie"])
    lines += ["", f"Choice (benchmarks/batching.py: most images/s at {r.clients} clients among settings whose 1-client "
              f"p50 is at most {100 * r.max_slowdown:.0f} % above batch 1 / wait 0; within {100 * r.tie:.0f} % of the "
              "best counts as a tie, won by the smaller batch and wait):", ""]
    for b in sorted(res["choice"]):
        c = choose(res["points"], b, r)
        gain = c.images_per_s / c.baseline_images_per_s - 1
        lines.append(f"- **{b}: batch {c.batch}, wait {c.wait_ms:g} ms**: {c.images_per_s:.2f} images/s at {r.clients} "
                     f"clients vs {c.baseline_images_per_s:.2f} unbatched ({100 * gain:+.1f} %); 1-client p50 "
                     f"{c.p50_1_ms:.0f} ms vs {c.baseline_p50_1_ms:.0f} ms.")
    return "\n".join(lines)


def memory_markdown(res: dict[str, Any]) -> str:
    """benchmarks/memory.py: peak and resident memory of the server per request shape."""
    m, st = res["machine"], res["settings"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_avg_1_5_15'][0]:.1f} (1 min) at the end. "
             f"Budget `STPM_MAX_REQUEST_PIXELS` {st['max_request_pixels']}, {st['intra_op_threads']} ORT thread(s), "
             f"model at {st['model_image_size']} px. Server idle RSS with the model loaded: {res['idle_rss_mb']} MB.", "",
             "| request | status | sent MB | answer MB | s | peak RSS MB | RSS after MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["cases"]:
        lines.append(f"| {r['case']} | {r['status']} | {r['request_mb']} | {r['response_mb']} | {r['seconds']} | "
                     f"{r['peak_rss_mb']} | {r['rss_after_mb']} |")
    lines += ["", f"Worst accepted request: peak RSS **{res['worst_accepted_peak_rss_mb']} MB**."]
    return "\n".join(lines)


def scale_markdown(res: dict[str, Any]) -> str:
    """benchmarks/scale.py: scoring vs API replicas, training jobs vs workers."""
    out = [f"Command: `.venv/bin/python benchmarks/{res['command']}` ({res['when']}); machine: {res['machine']['cpus']} "
           f"CPUs, {res['machine']['platform']}.", ""]
    if res.get("scoring"):
        out += ["| API replicas x ORT threads | req/s | p50 ms | p99 ms | errors | load avg before |",
                "|---|---|---|---|---|---|"]
        for r in res["scoring"]:
            out.append(f"| {r['replicas']} x {r['intra_op_threads']} | {r['req_per_s']:.2f} | {r['p50_ms']:.0f} | "
                       f"{r['p99_ms']:.0f} | {r['errors']} | {r['load_avg_before']:.1f} |")
        out.append("")
    if res.get("jobs"):
        out += ["| workers | jobs | wall s | jobs/min | mean job s | Redis cmds/job | PG commits/job | PG rows "
                "written/job | idle Redis cmds/s | idle PG commits/s | load avg before |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["jobs"]:
            p, i = r["per_job_during_batch"], r["idle_per_s"]
            out.append(f"| {r['workers']} | {r['jobs']} | {r['wall_s']} | {r['jobs_per_min']} | {r['mean_job_s']} | "
                       f"{p['redis_commands']} | {p['pg_commits']} | {p['pg_rows_inserted'] + p['pg_rows_updated']} | "
                       f"{i['redis_commands']} | {i['pg_commits']} | {r['load_avg_before']:.1f} |")
        walls = {r["workers"]: r["wall_s"] for r in res["jobs"]}
        if 1 in walls and 2 in walls:
            out += ["", f"2 workers finish the batch **{walls[1] / walls[2]:.2f}x** faster than 1."]
    return "\n".join(out).strip()


# ------------------------------------------------------------------------------------ the registry

def precision_markdown(res: dict[str, Any]) -> str:
    lines = [f"Command: `.venv/bin/python {res['command']}`. CPU: {res['cpu']} (flags: {', '.join(res['cpu_flags'])}); "
             f"load average {res['load_avg_at_start'][0]:.1f} at start.", "",
             "| data | precision | backend, mode | decision agreement | flips | AUROC fp32 -> low | max score move | "
             "target (>= 0.995, <= 0.005) |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for ds, r in res["bundles"].items():
        for key in [k for k in r if k == "bf16" or k.startswith("int8")]:
            q = r[key]
            p = q.get("parity", q)
            if "decision_agreement" not in p:
                lines.append(f"| {ds} | {key} | {q.get('backend')} | - | - | - | - | not measured ({q.get('reason')}) |")
                continue
            low = p.get("auroc", p.get("auroc_int8", float("nan")))
            flips = p.get("decision_flips", round((1 - p["decision_agreement"]) * p["n_check_images"]))
            ok = p["decision_agreement"] >= 0.995 and abs(low - p["auroc_fp32"]) <= 0.005
            lines.append(f"| {ds} ({p['n_check_images']} test images) | {key} | {q.get('method', q.get('backend'))} | "
                         f"{p['decision_agreement']:.3f} | {flips} | {p['auroc_fp32']:.4f} -> {low:.4f} | "
                         f"{p['max_abs_score_vs_fp32']:.3f} | {_verdict(ok)} |")
    return "\n".join(lines)


def bf16_split_markdown(res: dict[str, Any]) -> str:
    lines = [f"Command: `.venv/bin/python {res['command']}`. CPU: {res['cpu']} (flags: {', '.join(res['cpu_flags'])}); "
             f"load average {res['load_avg_at_start'][0]:.1f} at start, {res['load_avg_at_end'][0]:.1f} at the end.", "",
             "| data | mode | max / median image-score change vs f32 | flips at the threshold | image AUROC | tile ms (p50) |",
             "|---|---|---|---:|---:|---:|"]
    names = {"f32": "OpenVINO f32", "bf16_whole": "bf16, whole graph", "bf16_split": "bf16 search, f32 features (shipped)"}
    for ds, r in res["bundles"].items():
        for m, v in r["modes"].items():
            lines.append(f"| {ds} ({r['n_test']} test images) | {names.get(m, m)} | {100 * v['max_rel_score_change']:.2f} % / "
                         f"{100 * v['median_rel_score_change']:.2f} % | {v['decision_flips']} | {v['auroc']:.4f} | "
                         f"{v['tile_ms_median']:.1f} |")
    return "\n".join(lines)


PEER_LABELS = {
    "peer_ov_default": "anomalib STFPM, OpenVINO default", "peer_ov_f32": "anomalib STFPM, OpenVINO forced f32",
    "peer_pc_ov": "anomalib Patchcore, OpenVINO default", "peer_pc_torch": "anomalib Patchcore, TorchInferencer",
    "ours_full_png": "ours ResNet18 STPM, overlay PNG", "ours_full_jpeg": "ours ResNet18 STPM, overlay JPEG",
    "ours_bare_session": "ours ResNet18 STPM, bare session", "quality_full_png": "ours defaults (PatchCore), overlay PNG",
    "quality_full_jpeg": "ours defaults (PatchCore), overlay JPEG", "quality_bare_session": "ours defaults, bare session",
}


def _peer_runs_on(info: dict[str, Any]) -> str:
    if "backend" in info:
        return f"{info['backend']} / {info['precision']}"
    if info.get("runtime") == "torch":
        return f"torch {info['dtype']}, {info['threads']} threads"
    m = re.search(r"'(\w+)'", str(info.get("inference_precision", "")))  # "<Type: 'bfloat16'>"
    return f"OpenVINO {m[1] if m else info.get('inference_precision', '?')}"


def _peer_patchcore_build(b: dict[str, Any]) -> str:
    """The peer Patchcore's build record (benchmarks/peer_patchcore.py) in one paragraph."""
    grid = "x".join(map(str, b["feature_grid"])) if b.get("feature_grid") else "?"
    return (f"Peer Patchcore: `Patchcore()` defaults ({b['backbone']}, {' + '.join(b['layers'])}, "
            f"{'x'.join(map(str, b['image_size']))} px input, coreset_sampling_ratio {b['coreset_sampling_ratio']}); "
            f"feature grid {grid}, {b['dims']} dims: {b['images']} training images x {b['patches_per_image']} patches = "
            f"{b['patches']} rows; bank **{b['bank_rows']} rows** ({b['bank']}). Fit (anomalib's feature pass, no "
            f"coreset): **{b['fit_seconds']:.1f} s** on {b['cpu']} with {b['torch_threads']} torch threads, load average "
            f"{b['load_average_start']:.1f} -> {b['load_average_end']:.1f}; exports (OpenVINO input "
            f"{b['openvino_input_shape']}, torch) {b['export_seconds']:.1f} s.")


def peer_markdown(res: dict[str, Any]) -> str:
    loads = res["load_average_per_round"]
    pc = res.get("vs_peer_pc_ov_p50", {})
    lines = [f"Command: `.venv/bin/{res['command']}`. CPU: {res['cpu']['model']}, {res['cpu']['cores']} cores "
             f"(flags: {', '.join(f for f in res['cpu']['simd_flags'] if 'amx' in f or 'vnni' in f or 'bf16' in f)}); "
             f"load average per round {min(loads):.1f}-{max(loads):.1f}, {res['load_average_end'][0]:.1f} at the end. "
             f"Inputs: {res['images']}.", "",
             "| contender | runs on | p50 ms | p95 ms | CPU p50 ms | p50 / peer default |"
             + (" p50 / Patchcore OpenVINO |" if pc else ""), "|---|---|---:|---:|---:|---:|" + ("---:|" if pc else "")]
    ratio = res.get("vs_peer_ov_default_p50", {})
    for k, r in res["rows"].items():
        lines.append(f"| {PEER_LABELS.get(k, k)} | {_peer_runs_on(r['info'])} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['cpu_p50_ms']:.1f} | {ratio.get(k, float('nan')):.2f} |" + (f" {pc[k]:.3f} |" if pc else ""))
    lines.append("")
    if "peer_patchcore_build" in res:
        lines += [_peer_patchcore_build(res["peer_patchcore_build"]), ""]
    for k in ("ours_full_png", "ours_full_jpeg", "quality_full_png", "quality_full_jpeg"):
        if k in ratio:
            lines.append(f"- {PEER_LABELS[k]}: p50 **{ratio[k]:.2f}x** the peer's OpenVINO default (target <= 0.8: "
                         f"{_verdict(ratio[k] <= 0.8)})")
    for k in ("quality_full_png", "quality_full_jpeg"):
        if k in pc:
            lines.append(f"- {PEER_LABELS[k]}: p50 **{pc[k]:.3f}x** anomalib Patchcore's OpenVINO default "
                         f"(target <= 0.1: {_verdict(pc[k] <= 0.1)})")
    for k, share in res.get("decode_render_share_of_bare", {}).items():
        lines.append(f"- {PEER_LABELS[k]}: decode + render add **{100 * share['wall']:.0f} %** wall / "
                     f"{100 * share['cpu']:.0f} % CPU to the bare session (target <= 15 %: {_verdict(share['cpu'] <= 0.15)})")
    return "\n".join(lines)


IMAGE_ROLES = {"serve": "scoring, no torch", "serve-gpu": "scoring on CUDA, no torch", "train": "training worker",
               "train-gpu": "training worker, CUDA", "cpu": "all-in-one: `train` serving",
               "gpu": "all-in-one: `train-gpu` serving"}


def docker_images_markdown(res: dict[str, Any]) -> str:
    """benchmarks/docker_images.py: the images' sizes by role and the scoring container's memory."""
    m, ld, b = res["machine"], res["load"], res["base"]
    lines = [f"Command: `.venv/bin/python {res['command']}` ({res['when']}). Machine: {m['cpu']}, {m['cores']} cores, "
             f"load average {m['load_avg_1_5_15'][0]:.1f} at the start and {m['load_avg_end'][0]:.1f} at the end; "
             f"Docker {m['docker']} ({m['storage_driver']}), base `{b['tag']}` ({b['size_bytes'] / 1e6:.0f} MB).", "",
             "| image | target (role) | size | venv | largest in the venv, MB |", "|---|---|---:|---:|---|"]
    for role, i in res["images"].items():
        big = ", ".join(f"{p['path']} {p['mb']}" for p in i["largest"][:6])
        lines.append(f"| `{i['tag']}` | `{role}` ({IMAGE_ROLES.get(role, role)}) | **{i['size_gb']:.2f} GB** "
                     f"| {i['venv_mb'] / 1000:.2f} GB | {big} |")
    pinned = ", ".join(f"{k}={v}" for k, v in ld["pinned"].items())
    lines += ["", f"`stpm serve` in each container: {ld['model']} ({pinned}). Idle: all its processes, model loaded "
              f"and warm. Peak: the server process's VmHWM while {ld['clients']} clients sent "
              f"{ld['request']} for {ld['seconds']:.0f} s.", "",
              "| image | idle RSS | peak RSS while scoring | RSS after | requests (req/s, errors) | torch in the process |",
              "|---|---:|---:|---:|---|---|"]
    for role, r in res["memory"].items():
        lines.append(f"| `{r['image']}` ({role}) | **{r['idle_rss_mb']} MB** | **{r['peak_rss_mb']} MB** "
                     f"| {r['rss_after_mb']} MB | {r['requests']} ({r['req_per_s']:.2f}/s, {r['errors']} errors) "
                     f"| {'mapped' if r['torch_mapped'] else 'no'} |")
    return "\n".join(lines)


SMOKE_RUNS = ("cold", "warm")  # benchmarks/results/docker_smoke_<run>.json, written by scripts/docker-smoke.sh
SMOKE_PHASES = {"all-in-one": "all-in-one container: healthy, train a model (1 job), score, restart, score",
                "serve": "scoring image on that volume: healthy, no torch, score, restart, score",
                "compose": "all-in-one through Compose v2: the same as the all-in-one container"}


def load_docker_smoke() -> dict[str, Any]:
    return {run: json.loads((RESULTS / f"docker_smoke_{run}.json").read_text()) for run in SMOKE_RUNS}


def _smoke_rows(run: dict[str, Any]) -> dict[str, float]:
    """Step -> seconds, the container phases ("serve: ...") summed into one row each."""
    rows: dict[str, float] = {}
    for step in run["steps"]:
        phase, sep, _ = step["name"].partition(": ")
        key = SMOKE_PHASES.get(phase, step["name"]) if sep else step["name"]
        rows[key] = rows.get(key, 0.0) + step["seconds"]
    return rows


def _smoke_conditions(run: dict[str, Any]) -> str:
    c, m = run["conditions"], run["machine"]
    have = [f"installed {' + '.join(c['installed_packages'])}" if c["installed_packages"] else "docker.io there",
            "built the base image" if c["base_built"] else "base image there",
            f"build cache {c['build_cache_at_start'] or 'empty'} at the start" + (", --no-cache" if c["no_cache"] else "")]
    return (f"{', '.join(have)}; load average {m['load_avg_start'].split()[0]} -> {m['load_avg_end'].split()[0]}; "
            f"commit {run['commit']}, {run['when']}")


def docker_smoke_markdown(res: dict[str, Any]) -> str:
    """scripts/docker-smoke.sh with STPM_SMOKE_RESULT: a run from a cold Docker cache and one from a warm one."""
    runs = [res[r] for r in SMOKE_RUNS]
    m = runs[0]["machine"]
    lines = [f"`{runs[0]['command']}`, machine: {m['cpu']}, {m['cores']} cores, Docker {m['docker']}.", ""]
    lines += [f"- **{name}**: {_smoke_conditions(run)}" for name, run in zip(SMOKE_RUNS, runs)]
    per_run = [_smoke_rows(r) for r in runs]
    lines += ["", "| step | " + " | ".join(f"{r} s" for r in SMOKE_RUNS) + " |", "|---|" + "---:|" * len(runs)]
    for key in per_run[0]:
        lines.append(f"| {key} | " + " | ".join(f"{p.get(key, 0):.0f}" for p in per_run) + " |")
    lines.append("| **total** | " + " | ".join(f"**{r['total_s']}** ({r['total_s'] / 60:.1f} min)" for r in runs) + " |")
    sizes = ", ".join(f"`{tag}` {size / 1e9:.2f} GB" for tag, size in runs[0]["images"].items())
    lines += ["", f"Checks passed: {' / '.join(str(r['checks_passed']) for r in runs)}. Images: {sizes}."]
    return "\n".join(lines)


@dataclass(frozen=True)
class Block:
    script: str  # the benchmark that writes the result file (and this block after a run)
    result: str  # file name in benchmarks/results/
    render: Callable[[dict[str, Any]], str]
    command: str | None = None  # for result files written before the script recorded its command
    doc: Path = DOC
    load: Callable[[], dict[str, Any]] | None = None  # instead of reading `result` (e.g. merged seed files)


BLOCKS: dict[str, Block] = {
    "quality_methods": Block("benchmarks/quality.py", "quality_methods.json", methods_markdown),
    "quality_decisions": Block("benchmarks/quality.py", "quality_decisions.json", decisions_markdown),
    "quality_mixed": Block("benchmarks/quality.py", "quality_mixed.json", both_markdown),
    "quality_search": Block("benchmarks/quality.py", "quality_search.json", both_markdown),
    "quality_x2": Block("benchmarks/quality.py", "quality_x2.json", both_markdown),
    "quality_lite2": Block("benchmarks/quality.py", "quality_lite2.json", both_markdown),
    "calibration_estimators": Block("benchmarks/calibration_estimators.py", "calibration_estimators.json",
                                    estimators_markdown),
    "quality_128px": Block("benchmarks/quality.py", "quality_128px.json", quality_markdown),
    "quality_256px": Block("benchmarks/quality.py", "quality_256px.json", quality_markdown),
    "map_ablation_bottle": Block("benchmarks/map_ablation.py", "map_ablation_bottle.json", map_ablation_markdown),
    "speed-resnet18-quiet": Block(
        "benchmarks/speed.py", "speed-resnet18-quiet.json", speed_markdown,
        ".venv/bin/python benchmarks/speed.py --seconds 6 --out benchmarks/results/speed-resnet18-quiet.json"),
    "speed-bottle-lite0-t1": Block(
        "benchmarks/speed.py", "speed-bottle-lite0-t1.json", speed_markdown,
        ".venv/bin/python benchmarks/speed.py --bundle <trained EfficientNet-Lite0 bottle bundle, 128 px> --threads 1 "
        "--int8-data ../shared/data/mvtec_ad_bottle_512/bottle --out benchmarks/results/speed-bottle-lite0-t1.json"),
    "png_encode": Block("benchmarks/png_encode.py", "png_encode.json", png_encode_markdown),
    "load_default": Block("benchmarks/load.py", "load_default.json", load_markdown),
    "load_intra1": Block("benchmarks/load.py", "load_intra1.json", load_markdown),
    "load_sweep": Block("benchmarks/load.py", "load_sweep.json", sweep_markdown),
    "memory": Block("benchmarks/memory.py", "memory.json", memory_markdown),
    "memory_before": Block("benchmarks/memory.py", "memory_before.json", memory_markdown),
    "scale": Block("benchmarks/scale.py", "scale.json", scale_markdown),
    "scale-jobs": Block("benchmarks/scale.py", "scale-jobs.json", scale_markdown),
    "peer": Block("benchmarks/peer.py", "peer.json", peer_markdown),
    "bank_size": Block("benchmarks/bank_size.py", "bank_size.json", bank_size_markdown),
    "bank_speed": Block("benchmarks/bank_speed.py", "bank_speed.json", bank_speed_markdown),
    "bf16_split": Block("benchmarks/bf16_split.py", "bf16_split.json", bf16_split_markdown),
    "precision": Block("benchmarks/precision.py", "precision.json", precision_markdown),
    "docker_images": Block("benchmarks/docker_images.py", "docker_images.json", docker_images_markdown,
                           doc=DOCKER_DOC),
    "docker_smoke": Block("scripts/docker-smoke.sh", "docker_smoke_*.json", docker_smoke_markdown, doc=DOCKER_DOC,
                          load=load_docker_smoke),
    "mixed_scale": Block("benchmarks/mixed_scale.py", "mixed_scale.json", mixed_scale_markdown),
    "scale_faults": Block("benchmarks/scale_faults.py", "scale_faults.json", scale_faults_markdown, doc=SCALING_DOC),
}


# docs/DISTILLATION.md's tables are written by benchmarks/distill_report.py (its own `distill_*` blocks,
# checked by tests/test_docs.py through distill_report.render_all).


def render(key: str) -> str:
    b = BLOCKS[key]
    res = b.load() if b.load else json.loads((RESULTS / b.result).read_text())
    if b.command and "command" not in res:
        res["command"] = b.command
    return b.render(res).strip() + "\n"


def begin_marker(key: str) -> str:
    b = BLOCKS[key]
    return (f"<!-- BEGIN generated {key}: written by {b.script} from benchmarks/results/{b.result}; do not edit, "
            "rerun benchmarks/report.py -->")


def replace_block(text: str, key: str, body: str) -> str:
    """`text` with block `key`'s body replaced; raises KeyError when the doc has no such block."""
    if key not in BLOCKS:
        raise KeyError(f"generated block {key!r} is not registered in benchmarks/report.py BLOCKS")
    found = False

    def sub(m: re.Match[str]) -> str:
        nonlocal found
        if m["key"] != key:
            return m[0]
        found = True
        return f"{begin_marker(key)}\n{body.strip()}\n<!-- END generated {key} -->"

    out = BLOCK.sub(sub, text)
    if not found:
        raise KeyError(f"no generated block {key!r} in the doc: add its BEGIN/END markers where it belongs")
    return out


def write_block(doc: Path, key: str, body: str) -> None:
    doc.write_text(replace_block(doc.read_text(), key, body))


def blocks_in(text: str) -> dict[str, str]:
    return {m["key"]: m["body"] for m in BLOCK.finditer(text)}


def rendered(text: str) -> str:
    """`text` with every generated block re-rendered from its result file."""
    for key in blocks_in(text):
        text = replace_block(text, key, render(key))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description="re-render the docs' generated blocks from benchmarks/results/")
    ap.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1)")
    a = ap.parse_args()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = rendered(text)
        stale += [k for k, v in blocks_in(text).items() if v != blocks_in(new)[k]]
        if not a.check:
            doc.write_text(new)
    if a.check:
        print("stale blocks: " + ", ".join(stale) if stale else "all generated blocks match their result files")
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
