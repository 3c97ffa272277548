"""docs/BENCHMARKS.md's `calibration_estimators` block: the false-positive rate each tail estimator realises
against the rate it targets, on known distributions and on the shared sets' real scores
(benchmarks/calibration_estimators.py). Rendered through benchmarks/report.py. Torch-free.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.report_quality import percent


def _log_error(realised: float, alpha: float) -> float:
    """|log2(realised / alpha)|, realised floored at alpha / 8: how many doublings off the target."""
    return abs(math.log2(max(realised, alpha / 8) / alpha))


def estimators_markdown(res: dict[str, Any]) -> str:
    """benchmarks/calibration_estimators.py: realised vs targeted false-positive rates per tail estimator."""
    known, real = res["known"], res.get("real", [])
    ests = list(dict.fromkeys(r["estimator"] for r in known))
    ns = sorted({r["n"] for r in known})
    a0 = min(r["alpha"] for r in known)
    lines = [f"Command: `.venv/bin/python {res['command']}`.", "",
             f"Known distributions ({len({r['distribution'] for r in known})}), target {percent(a0)}: the true "
             "false-positive rate at the estimated threshold, averaged over samples of n; the median over the "
             "distributions, in brackets the lowest and highest; last column the largest share of samples whose "
             "threshold fell below the true median.", "",
             "| estimator | " + " | ".join(f"n = {n}" for n in ns) + " | below the median |",
             "|---|" + "---|" * (len(ns) + 1)]
    for e in ests:
        cells = []
        for n in ns:
            v = [r["mean_fpr"] for r in known if r["estimator"] == e and r["n"] == n and r["alpha"] == a0]
            cells.append(f"{percent(statistics.median(v), 2)} ({percent(min(v), 2)} – {percent(max(v), 2)})")
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
    head = " | ".join(f"{d} (n = {runs[d]['n_fit']}) @ {percent(a, 0)}" for d in sets for a in alphas)
    counts = ", ".join(f"{d}: {runs[d]['runs']} training run(s)" for d in sets)
    lines = ["", f"Real scores ({counts}; "
             f"scores from {', '.join('benchmarks/results/' + f for f in source.split(', '))}; {machine}): the realised rate on the unseen good images "
             "of random splits (resampled; in brackets: fitted on the held-out images, checked on test/good); last "
             "column the mean number of doublings off the target over these cells (the criterion).", "",
             f"| estimator | {head} | doublings off |", "|---|" + "---|" * (len(sets) * len(alphas) + 1)]
    for e in ests:
        cells, err = [], []
        for d in sets:
            for a in alphas:
                r = next(x for x in real if x["estimator"] == e and x["dataset"] == d and x["alpha"] == a)
                cells.append(f"{percent(r['resampled_fpr'], 2)} ({percent(r['deployed_fpr'], 1)})")
                err.append(_log_error(r["resampled_fpr"], a))
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {statistics.fmean(err):.2f} |")
    return lines
