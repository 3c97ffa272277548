"""Print the markdown tables of docs/DISTILLATION.md from benchmarks/results/distill_*.json.

python benchmarks/distill_report.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parents[1]))

from stpm.distill.summary import format_mean_std  # noqa: E402


def ms(v: list[float], d: int = 2) -> str:
    return format_mean_std(v, d)


def load(name: str) -> dict | None:
    p = RESULTS / f"distill_{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def merge_seed_files(name: str) -> dict | None:
    """Merge distill_<name>_seed<N>.json files (one seed per process, run in parallel) into one result."""
    files = sorted(RESULTS.glob(f"distill_{name}_seed*.json"))
    if not files:
        return None
    parts = [json.loads(f.read_text()) for f in files]
    merged = dict(parts[0])
    key = next(k for k in ("test_error_percent", "accuracy_percent", "test_accuracy_percent") if k in merged)
    merged[key] = {k: [x for p in parts for x in p[key].get(k, [])] for k in parts[0][key]}
    merged["completed_seeds"] = [s for p in parts for s in p.get("completed_seeds", p["seeds"])]
    merged["command"] = " ; ".join(p["command"] for p in parts) + " (one process per seed, in parallel)"
    merged["wall_seconds"] = max(p["wall_seconds"] for p in parts)
    if name == "hinton":
        e = merged[key]
        merged["best_temperature"] = {
            f"mlp{w}": min(merged["temperatures"], key=lambda t: statistics.fmean(e[f"mlp{w} soft T={t:g}"]))
            for w in (300, 30)}
    return merged


def header(r: dict) -> str:
    seeds = r.get("completed_seeds", r["seeds"])
    return (f"Command: `{r['command']}` · seeds {seeds} · epochs {r['epochs']} · {r['data']} · "
            f"machine: {r['machine']} · wall {r['wall_seconds'] / 60:.0f} min\n")


def hinton(r: dict) -> str:
    e = r["test_error_percent"]
    out = [header(r), "| model | ours: test error % (2,000 test digits) | seed 002 (10,000 test digits) |",
           "|---|---|---|"]
    ref = {"teacher mlp1200d": "67 errors (0.67 %)", "mlp800 hard": "146 errors (1.46 %)",
           "mlp800 soft T=20": "74 errors (0.74 %)"}
    for k, v in ref.items():
        if k in e:
            out.append(f"| {k} | {ms(e[k])} | {v} |")
    out += ["", "| T | mlp300 soft: error % | mlp30 soft: error % |", "|---|---|---|"]
    out.append(f"| hard labels only | {ms(e['mlp300 hard'])} | {ms(e['mlp30 hard'])} |")
    for t in r["temperatures"]:
        k3, k30 = f"mlp300 soft T={t:g}", f"mlp30 soft T={t:g}"
        if k3 in e and k30 in e:
            out.append(f"| {t:g} | {ms(e[k3])} | {ms(e[k30])} |")
    b = r["best_temperature"]
    out.append(f"\nBest T (lowest mean error): 300 units **{b['mlp300']:g}** (seed: 8 and above), "
               f"30 units **{b['mlp30']:g}** (seed: 2.5-4).")
    return "\n".join(out)


def hinton800(r: dict) -> str:
    e = r["test_error_percent"]
    out = [header(r), "| model | ours: test error % | ours: errors / 2,000 | seed 002: errors / 10,000 |",
           "|---|---|---|---|"]
    ref = {"teacher mlp1200d": "67", "mlp800 hard": "146", "mlp800 soft T=20": "74"}
    for k, v in ref.items():
        if k in e:
            n = statistics.fmean(e[k]) * 20
            out.append(f"| {k} | {ms(e[k])} | {n:.1f} | {v} |")
    return "\n".join(out)


def cnn(r: dict) -> str:
    a = r["test_accuracy_percent"]
    s = r["student"]
    takd_ref = r["seed_reference"]["TAKD CNN CIFAR-10 (S=2, TA=4, T=10)"]
    row_ref = r["seed_reference"]["ResNet8 CIFAR-10"]
    out = [header(r), "Teachers: " + ", ".join(f"{k} {ms(v)} %" for k, v in a.items() if not k.startswith("student")),
           "", f"| method ({s}) | ours: MNIST accuracy % | seed 002: plain CNN S=2, CIFAR-10 |", "|---|---|---|"]
    for m in ("NOKD", "BLKD", "TAKD"):
        out.append(f"| {m} | {ms(a[f'student {s} {m}'])} | {takd_ref[m]} |")
    out += ["", f"| method ({s}) | ours: MNIST accuracy % | seed 002: ResNet8, CIFAR-10 |", "|---|---|---|"]
    for m in ("NOKD", "BLKD", "FitNets", "AT", "FSP", "Mutual", "TAKD", "DKD"):
        k = f"student {s} {m}"
        if k in a:
            out.append(f"| {m} | {ms(a[k])} | {row_ref.get(m, '—')} |")
    return "\n".join(out)


def simple(r: dict, key: str, col: str) -> str:
    out = [header(r), f"| model | {col} |", "|---|---|"]
    out += [f"| {k} | {ms(v)} |" for k, v in r[key].items()]
    return "\n".join(out)


def main() -> None:
    for name, fn in (("hinton", hinton), ("hinton800", hinton800), ("cnn", cnn),
                     ("disjoint", lambda r: simple(r, "accuracy_percent", "test accuracy %")),
                     ("noisy_student", lambda r: simple(r, "accuracy_percent", "test accuracy %")),
                     ("latent", lambda r: simple(r, "accuracy_percent", "test accuracy %"))):
        r = merge_seed_files(name) or load(name)
        print(f"\n<!-- {name} -->\n" + (fn(r) if r else f"(no results/distill_{name}.json yet)"))


if __name__ == "__main__":
    main()
