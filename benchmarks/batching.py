"""The micro-batcher's (batch size, wait) choice from a `benchmarks/load.py --sweep` result: a pure rule,
shared by the sweep (which records it), benchmarks/report.py (which shows it) and the tests (which check
app.batcher.BATCH_DEFAULTS against it). Torch- and numpy-free.

Rule, per backend: the baseline is batch 1 / wait 0 (no batching). A setting is eligible when its
1-client p50 is at most `max_slowdown` worse than the baseline's. Among the eligible settings, the one
with the most images/s at `clients` concurrent clients wins; settings within `tie` of that best are
treated as equal (a short run cannot tell them apart) and the smallest (batch, wait) among them is
kept, so noise never buys a larger batch or a longer wait.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BASELINE = (1, 0.0)  # batch 1, wait 0 ms: every request infers alone


@dataclass(frozen=True)
class Rule:
    clients: int = 8  # the throughput to maximise: images/s at this many concurrent clients
    max_slowdown: float = 0.10  # 1-client p50 may be at most this much worse than the baseline's
    tie: float = 0.03  # images/s within this fraction of the best count as equal


@dataclass(frozen=True)
class Choice:
    backend: str
    batch: int
    wait_ms: float
    images_per_s: float  # at Rule.clients
    baseline_images_per_s: float
    p50_1_ms: float
    baseline_p50_1_ms: float
    eligible: tuple[tuple[int, float], ...]  # (batch, wait) settings that passed the latency rule

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "batch": self.batch, "wait_ms": self.wait_ms,
                "images_per_s": self.images_per_s, "baseline_images_per_s": self.baseline_images_per_s,
                "p50_1_ms": self.p50_1_ms, "baseline_p50_1_ms": self.baseline_p50_1_ms,
                "eligible": [list(e) for e in self.eligible]}


def merge_rounds(rounds: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One point's runs measured in several rounds -> one run per client count: the median of images/s,
    p50, p99 and mean batch, errors and requests summed, and every round's 1-min load average at the
    start and end of the run (`loadavg_1m`: [[start, end], ...])."""
    out = []
    for k in sorted({r["clients"] for rnd in rounds for r in rnd}):
        rs = [r for rnd in rounds for r in rnd if r["clients"] == k]
        if len(rs) != len(rounds):
            raise ValueError(f"{k} clients: measured in {len(rs)} of {len(rounds)} rounds")
        batches = [r["mean_batch_images"] for r in rs if r.get("mean_batch_images") is not None]
        out.append({"clients": k, "rounds": len(rs),
                    "req_per_s": statistics.median(r["req_per_s"] for r in rs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                    "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                    "mean_batch_images": statistics.median(batches) if batches else None,
                    "requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs),
                    "loadavg_1m": [[r["loadavg_start"][0], r["loadavg_end"][0]] for r in rs]})
    return out


def _run(point: dict[str, Any], clients: int) -> dict[str, Any]:
    for r in point["runs"]:
        if r["clients"] == clients:
            return r
    raise ValueError(f"{point['backend']} batch {point['batch']} wait {point['wait_ms']}: no {clients}-client run")


def choose(points: Sequence[dict[str, Any]], backend: str, rule: Rule = Rule()) -> Choice:
    """The (batch, wait) for `backend` from sweep points ({backend, batch, wait_ms, runs: [{clients,
    req_per_s, p50_ms, errors}]}). A point with errors is never chosen. Raises ValueError when the
    backend has no baseline point or a point lacks the 1-client or `rule.clients` run."""
    mine = [p for p in points if p["backend"] == backend]
    base = next((p for p in mine if (p["batch"], float(p["wait_ms"])) == BASELINE), None)
    if base is None:
        raise ValueError(f"{backend}: the sweep has no batch 1 / wait 0 baseline point")
    base_p50 = _run(base, 1)["p50_ms"]
    eligible = [p for p in mine
                if _run(p, 1)["p50_ms"] <= base_p50 * (1 + rule.max_slowdown)
                and not any(r["errors"] for r in p["runs"])]
    if not eligible:  # the baseline itself failed: nothing is safe to recommend
        raise ValueError(f"{backend}: no sweep point without errors within the latency rule")
    best = max(_run(p, rule.clients)["req_per_s"] for p in eligible)
    near = [p for p in eligible if _run(p, rule.clients)["req_per_s"] >= best * (1 - rule.tie)]
    pick = min(near, key=lambda p: (p["batch"], float(p["wait_ms"])))
    return Choice(backend, int(pick["batch"]), float(pick["wait_ms"]), _run(pick, rule.clients)["req_per_s"],
                  _run(base, rule.clients)["req_per_s"], _run(pick, 1)["p50_ms"], base_p50,
                  tuple(sorted((int(p["batch"]), float(p["wait_ms"])) for p in eligible)))
