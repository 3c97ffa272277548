"""Table helpers shared by the renderers of docs/DISTILLATION.md (distill_report.py, distill_report_hinton.py).

A result file r = {"config", "values": {key: {seed: number}}, "runs": [...]}; a run record with
"finished": false that is the last of its file marks the file partial (a killed or running benchmark): its
block says so and draws no verdict.
"""
from __future__ import annotations

import re
import statistics

from stpm.distill.summary import format_mean_std

VERDICT = re.compile(r"\*\*Verdict \((.+?)\): (reproduced|partly|not reproduced)\.\*\*")


def is_partial(r: dict) -> bool:
    """The file's last run stopped before its end (killed, or still running): its numbers are incomplete."""
    return bool(r.get("runs")) and r["runs"][-1].get("finished") is False


def partial_notice(r: dict) -> str:
    missing = r.get("missing", "whatever its command had still to train (see the seeds and models below)")
    return (f"**Partial run, no verdict.** `{r['runs'][-1]['command']}` stopped before its end (killed, or still "
            f"running when this block was rendered). Missing: {missing}. The numbers below are what it recorded "
            "before it stopped, not a reproduction of the claim.\n\n")


def without_verdicts(text: str) -> str:
    """A partial run's block: every verdict line says that no verdict is drawn (its criterion stays)."""
    return VERDICT.sub(lambda m: f"**No verdict ({m[1]}): partial run.**", text)


def ms(v: list[float], d: int = 2) -> str:
    """Mean ± std; fewer than the protocol's 3 seeds is said in the cell."""
    s = format_mean_std(v, d)
    return f"{s} ({len(v)} seeds)" if len(v) == 2 else s


def seeds_of(r: dict) -> list[str]:
    return sorted({s for per in r["values"].values() for s in per}, key=int)


def vals(r: dict, key: str) -> list[float]:
    per = r["values"].get(key, {})
    return [per[s] for s in seeds_of(r) if s in per]


def per_seed(r: dict, key: str, d: int = 1) -> str:
    per = r["values"].get(key, {})
    return ", ".join(f"{per[s]:.{d}f}" for s in seeds_of(r) if s in per)


def mean(v: list[float]) -> float:
    return statistics.fmean(v) if v else float("nan")


def paired(r: dict, a: str, b: str) -> list[float]:
    """Per-seed differences a - b over the seeds that have both."""
    pa, pb = r["values"].get(a, {}), r["values"].get(b, {})
    return [pa[s] - pb[s] for s in seeds_of(r) if s in pa and s in pb]


def all_positive(d: list[float]) -> bool:
    """A gain seen in every seed (and more than one seed): the minimum for calling a difference clear."""
    return len(d) > 1 and all(x > 0 for x in d)


def header(r: dict) -> str:
    """The runs (command, machine, load, time), data and settings of a result file; a partial one says so."""
    cfg = ", ".join(f"{k} {setting(v)}" for k, v in r["config"].items())
    seeds = "Seeds with numbers" if is_partial(r) else "Seeds completed"
    return ((partial_notice(r) if is_partial(r) else "") + "Runs: " + run_lines(r) +
            f"\n\nData: {r.get('data', '?')}. Settings: {cfg}. {seeds}: {[int(s) for s in seeds_of(r)]}. Per-seed "
            "numbers depend on the machine (BLAS kernels and thread scheduling change the floating-point order); "
            "compare means and spreads, not single seeds.\n")


def run_lines(r: dict) -> str:
    """One clause per run: command, seeds, machine, load average, CPU and wall time."""
    lines = []
    for run in r["runs"]:
        if "wall_seconds" not in run:
            continue
        load_mean = f", mean {run['load_mean']:.1f}" if "load_mean" in run else ""
        gpu = f" · GPU {run['gpu']}" if "gpu" in run else ""
        cpu = run["cpu_seconds"] + run.get("child_cpu_seconds", 0)  # with the per-seed processes of distill_gpu
        lines.append(f"`{run['command']}` · seeds {run['seeds']} · {run['machine']}{gpu} · load average "
                     f"{run['load_at_start']:.1f} at start, {run.get('load_at_end', float('nan')):.1f} at end"
                     f"{load_mean} · CPU {cpu / 60:.0f} min, wall {run['wall_seconds'] / 60:.0f} min")
    return "; ".join(lines)


def setting(v: object) -> str:
    """A config value as prose: dicts as (key value, ...), lists as [a, b] with numbers in short form."""
    if isinstance(v, dict):
        return "(" + ", ".join(f"{k} {setting(x)}" for k, x in v.items()) + ")"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(setting(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def verdict(label: str, criterion: str, outcome: str, numbers: str) -> str:
    return f"**Verdict ({label}): {outcome}.** Criterion: {criterion}. {numbers}"
