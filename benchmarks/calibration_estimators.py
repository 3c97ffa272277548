"""Which tail estimate of the good scores should set the threshold? Candidate estimators compared by how
close the false-positive rate they realise comes to the one they target:

1. known distributions (normal, log-normal, gamma, Gumbel, Weibull, Student t, uniform, the maximum of
   many exponentials): the true rate at each estimated threshold, averaged over many samples of n;
2. the shared sets' real scores (benchmarks/results/calibration_scores.json, several training seeds):
   - resampling: the held-out and test/good scores of a run pooled (both unseen by its model), split at
     random many times into a fitting part of the size calibration gets (n_val) and a checking part;
     the realised rate is the checking part's share above the threshold;
   - as deployed: fitted on the held-out scores, checked on test/good (20-70 images: coarse).

    .venv/bin/python benchmarks/calibration_estimators.py --out benchmarks/results/calibration_estimators.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report_quality import row_label  # noqa: E402
from stpm.options import CalibrationOptions  # noqa: E402
from stpm.training.calibration import _spread, _target_threshold  # noqa: E402
from stpm.training.tail import fit_tail  # noqa: E402

Estimator = Callable[[np.ndarray, float], float]


def _conformal(s: np.ndarray, a: float) -> float:
    """The ceil((n + 1)(1 - a))-th smallest score (split-conformal); the maximum when n + 1 < 1 / a."""
    k = min(math.ceil((s.size + 1) * (1 - a)), s.size)
    return float(np.sort(s)[k - 1])


@lru_cache(maxsize=4096)
def _fitted(name: str, data: bytes) -> tuple[float, ...]:
    """A scipy MLE fit, cached: the same sample is fitted once for every target rate."""
    return tuple(getattr(stats, name).fit(np.frombuffer(data)))


def _mle(dist: stats.rv_continuous, log: bool = False) -> Estimator:
    def est(s: np.ndarray, a: float) -> float:
        y = np.log(s) if log else s
        try:
            q = float(dist.ppf(1 - a, *_fitted(dist.name, np.ascontiguousarray(y, dtype=np.float64).tobytes())))
        except Exception:  # noqa: BLE001 - a fit that fails falls back to the maximum
            q = float(y.max())
        q = q if np.isfinite(q) else float(y.max())
        return float(np.exp(q)) if log else q
    return est


@lru_cache(maxsize=4096)
def _gpd_fit(excess: bytes) -> tuple[float, ...]:
    return tuple(stats.genpareto.fit(np.frombuffer(excess), floc=0))


def _gpd(s: np.ndarray, a: float, top: float = 0.3) -> float:
    """Peaks over threshold: a generalised Pareto on the top `top` of the scores (at least 4 of them)."""
    k = max(4, round(top * s.size))
    srt = np.sort(s)
    u = srt[-k - 1] if k < s.size else srt[0] - 1e-9
    zeta = k / s.size
    if a >= zeta:
        return float(np.quantile(s, 1 - a))
    try:
        c, _, scale = _gpd_fit(np.ascontiguousarray(srt[-k:] - u).tobytes())
        q = u + float(stats.genpareto.ppf(1 - a / zeta, c, 0, scale))
    except Exception:  # noqa: BLE001
        q = float(srt[-1])
    return q if np.isfinite(q) else float(srt[-1])


def _plugin(family: str, log: bool) -> Estimator:
    dist = stats.norm if family == "normal" else stats.gumbel_r

    def est(s: np.ndarray, a: float) -> float:
        y = np.log(s) if log else s
        m, sd = y.mean(), y.std(ddof=1)
        if family == "gumbel":  # moments: scale = sd * sqrt(6) / pi, loc = mean - 0.5772 * scale
            beta = sd * np.sqrt(6) / np.pi
            q = m - 0.5772 * beta + beta * float(-np.log(-np.log(1 - a)))
        else:
            q = m + float(dist.ppf(1 - a)) * sd
        return float(np.exp(q)) if log else float(q)
    return est


def _predictive(family: str, transform: str) -> Estimator:
    return lambda s, a: fit_tail(s, family, transform).threshold(a)  # type: ignore[arg-type]


def _guarded(family: str, transform: str) -> Estimator:
    """A predictive fit, with a distribution-free bound where the scores contradict it (stpm.training.calibration's
    target_fpr rule, on this family): the conformal bound where the scores are many enough for one at the
    target, else the largest score where it lies improbably far out for the family."""

    def est(s: np.ndarray, a: float) -> float:
        thr, _ = _target_threshold(s, fit_tail(s, family, transform), a)  # type: ignore[arg-type]
        return thr

    return est


ESTIMATORS: dict[str, Estimator] = {
    "max_margin (old default)": lambda s, a: float(s.max()) + CalibrationOptions().margin * _spread(s),
    "empirical quantile": lambda s, a: float(np.quantile(s, 1 - a)),
    "conformal": _conformal,
    "normal plug-in": _plugin("normal", False),
    "log-normal plug-in": _plugin("normal", True),
    "Gumbel plug-in (moments)": _plugin("gumbel", False),
    "Gumbel MLE": _mle(stats.gumbel_r),
    "GEV MLE": _mle(stats.genextreme),
    "GPD on the top 30 %": _gpd,
    "normal predictive": _predictive("normal", "identity"),
    "log-normal predictive": _predictive("normal", "log"),
    "log-normal predictive, guarded where the tail is heavier": _guarded("normal", "log"),
    "Gumbel predictive": _predictive("gumbel", "identity"),
    "log-Gumbel predictive": _predictive("gumbel", "log"),
    "Gumbel predictive, guarded where the tail is heavier (the default)": _guarded("gumbel", "identity"),
}

KNOWN: dict[str, stats.rv_continuous] = {
    "normal(10, 1)": stats.norm(10, 1),
    "log-normal(s=0.2)": stats.lognorm(0.2, scale=10),
    "log-normal(s=0.6)": stats.lognorm(0.6, scale=10),
    "gamma(4)": stats.gamma(4, scale=2.5),
    "Gumbel(10, 1)": stats.gumbel_r(10, 1),
    "Weibull(1.5)": stats.weibull_min(1.5, scale=10),
    "Student t(4) + 20": stats.t(4, loc=20),
    "uniform(5, 10)": stats.uniform(5, 5),
}


def max_of_exponentials() -> stats.rv_continuous:
    """The maximum of 500 exponentials (an image score as the maximum of a map of many patch scores)."""
    return stats.gumbel_r(np.log(500), 1)  # the exact limit; within 0.2 % of the finite maximum's tail


def known_distributions(alphas: tuple[float, ...], ns: tuple[int, ...], reps: int,
                        only: list[str] | None = None) -> list[dict]:
    """Every estimator (or those in `only`) on samples of n from each known distribution: the true rate at
    its threshold."""
    rows = []
    estimators = {k: v for k, v in ESTIMATORS.items() if only is None or k in only}
    dists = {**KNOWN, "max of 500 exponentials": max_of_exponentials()}
    for dname, dist in dists.items():
        for n in ns:
            samples = dist.rvs(size=(reps, n), random_state=np.random.default_rng(n))
            median = float(dist.median())
            for a in alphas:
                for ename, est in estimators.items():
                    thr = np.array([est(s, a) for s in samples])
                    fpr = dist.sf(thr)
                    rows.append({"distribution": dname, "n": n, "alpha": a, "estimator": ename,
                                 "mean_fpr": float(fpr.mean()), "share_above_2x": float(np.mean(fpr > 2 * a)),
                                 "share_below_median": float(np.mean(thr < median))})
    return rows


def _pool(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the good scores calibration saw: held-out, and out of fold where cross-fitted; test/good scores)."""
    good_test = np.array([s for s, d in zip(run["test_scores"], run["test_defects"]) if d == "good"])
    return np.asarray(run["val_good"] + run.get("out_of_fold_good", []), dtype=float), good_test


def resampled(runs: list[dict], alphas: tuple[float, ...], splits: int) -> list[dict]:
    """Per data set and estimator: the realised rate on the checking part of random splits of each run's
    pooled unseen good scores (fitting part: n_val scores), averaged over splits and runs."""
    rows = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == ds]
        for a in alphas:
            for ename, est in ESTIMATORS.items():
                realised, deployed = [], []
                for run in mine:
                    val, test_good = _pool(run)
                    pool, n_fit = np.r_[val, test_good], val.size
                    rng = np.random.default_rng(run["seed"])
                    for _ in range(splits):
                        perm = rng.permutation(pool.size)
                        thr = est(pool[perm[:n_fit]], a)
                        realised.append(float(np.mean(pool[perm[n_fit:]] >= thr)))
                    deployed.append(float(np.mean(test_good >= est(val, a))))
                rows.append({"dataset": ds, "alpha": a, "estimator": ename, "runs": len(mine),
                             "n_fit": int(np.mean([_pool(r)[0].size for r in mine])),
                             "resampled_fpr": float(np.mean(realised)),
                             "resampled_share_above_2x": float(np.mean(np.array(realised) > 2 * a)),
                             "deployed_fpr": float(np.mean(deployed))})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", nargs="+", default=[str(ROOT / "benchmarks" / "results" / "calibration_scores.json")],
                    help="result files with the scores; with --scores-from-quality a row whose config is not the "
                         "default is its own data set, 'dataset (config)'")
    ap.add_argument("--alphas", default="0.01,0.05")
    ap.add_argument("--ns", default="5,10,20,40,80")
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--known-from", default=None, help="reuse the known-distribution rows of an earlier result")
    ap.add_argument("--scores-from-quality", action="store_true",
                    help="--scores is a benchmarks/quality.py result whose rows carry their scores")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_estimators.json"))
    a = ap.parse_args()
    alphas = tuple(float(x) for x in a.alphas.split(","))
    ns = tuple(int(x) for x in a.ns.split(","))
    earlier = json.loads(Path(a.known_from).read_text()) if a.known_from else None
    res = {"command": " ".join(["benchmarks/calibration_estimators.py", *sys.argv[1:]]),
           "known": earlier["known"] if earlier else known_distributions(alphas, ns, a.reps)}
    if earlier:  # the known-distribution rows came from this earlier command; estimators it lacks are added
        res["known_command"] = earlier.get("known_command", earlier["command"])
        have = {r["estimator"] for r in res["known"]}
        missing = [e for e in ESTIMATORS if e not in have]
        if missing:
            res["known"] = [r for r in res["known"] if r["estimator"] in ESTIMATORS] + known_distributions(
                tuple(sorted({r["alpha"] for r in res["known"]})), tuple(sorted({r["n"] for r in res["known"]})),
                a.reps, missing)
            res["known_command"] += f" (rows of {', '.join(missing)}: {res['command']})"
    files = [Path(f) for f in a.scores if Path(f).is_file()]
    if files:
        runs, machines = [], []
        for f in files:
            scores = json.loads(f.read_text())
            machines.append(f"{f.name}: {scores['machine']}")
            if not a.scores_from_quality:
                runs += scores["runs"]
                continue
            runs += [{**r["scores"], "dataset": row_label(r)} for r in scores["rows"]]
        res.update(scores_machine="; ".join(machines), scores_file=", ".join(f.name for f in files),
                   real=resampled(runs, alphas, a.splits))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    from benchmarks import report
    from benchmarks.report_calibration import estimators_markdown

    print(estimators_markdown(res))
    report.publish(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
