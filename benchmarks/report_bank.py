"""docs/BENCHMARKS.md's `bank_size` and `bank_speed` blocks (issue 26): PatchCore's memory-bank size against
quality on the shared sets (benchmarks/results/bank_size.json, written by benchmarks/bank_size.py) and against
the fp32 scorer's speed (bank_speed.json, benchmarks/bank_speed.py). Rendered through benchmarks/report.py
like every generated block. Torch-free.
"""

from __future__ import annotations

from typing import Any

TODAY = "cap 16384 (today)"
SHOWN = {TODAY: "cap 16384 (the default before issue 26)",
         "ratio 0.01 (paper)": "ratio 0.01, the paper's (the default since issue 26)"}
TOLERANCE = 0.005  # issue 26: image and pixel AUROC within this of the former default bank (16384 rows) on every shared set


def _flags(cpu: dict[str, Any]) -> str:
    keep = [f for f in cpu["simd_flags"] if "amx" in f or "vnni" in f or "bf16" in f]
    return f"{cpu['model']}, {cpu['cores']} cores (flags: {', '.join(keep) or 'no bf16 / VNNI / AMX'})"


def _delta(v: float, ref: float) -> str:
    return f"{v:.4f} ({v - ref:+.4f})"


def within(res: dict[str, Any], label: str) -> bool | None:
    """Bank `label` is within TOLERANCE image and pixel AUROC of the former default's on every set (None: some
    set did not measure it and it misses on none that did)."""
    measured = [s for s in res["sets"].values() if label in s["banks"]]
    for s in measured:
        b, ref = s["banks"][label], s["banks"][TODAY]
        if ref["image_auroc"] - b["image_auroc"] > TOLERANCE or ref["pixel_auroc"] - b["pixel_auroc"] > TOLERANCE:
            return False
    return True if len(measured) == len(res["sets"]) else None


def bank_size_markdown(res: dict[str, Any]) -> str:
    lines = [f"Command: `{res['command']}` (each with `nice -n 19 .venv/bin/python`). CPU: {_flags(res['cpu'])}; torch "
             f"{res['torch']}; load average up to {res['load_average_start'][0]:.1f} at a run's start, up to "
             f"{res['load_average_end'][0]:.1f} at its end, after each bank in the last column.", "",
             "| set (training patches) | bank | rows | coreset s | image AUROC (vs 16384) | pixel AUROC (vs 16384) "
             "| AUPRO | recall / FPR on test good at its threshold | load |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, s in res["sets"].items():
        ref = s["banks"][TODAY]
        for label, b in s["banks"].items():
            same = f" (= {SHOWN.get(b['same_bank_as'], b['same_bank_as'])})" if "same_bank_as" in b else ""
            lines.append(f"| {name} ({s['n_patches']:,} x {s['feature_dim']}) | {SHOWN.get(label, label)}{same} | {b['bank_rows']:,} | "
                         f"{b['coreset_s']:.1f} | {_delta(b['image_auroc'], ref['image_auroc'])} | "
                         f"{_delta(b['pixel_auroc'], ref['pixel_auroc'])} | {b['aupro']:.4f} | "
                         f"{b['recall']:.3f} / {b['fpr_test_good']:.3f} | {b['load_average']:.1f} |")
    labels = [k for k in dict.fromkeys(k for s in res["sets"].values() for k in s["banks"]) if k != TODAY]
    verdict = {True: "within on every set", False: "**not** within on some set", None: "within where measured, "
               "not measured on every set"}
    lines += ["", f"Image and pixel AUROC within {TOLERANCE} of the 16384-row bank: "
              + "; ".join(f"{SHOWN.get(k, k)}: {verdict[within(res, k)]}" for k in labels) + "."]
    return "\n".join(lines)


def _bank_of(key: str) -> str:
    return key.split("/")[0].removeprefix("bottle-bank")


def _speed_header(res: dict[str, Any]) -> str:
    """The command, CPU and load line of a bank_speed.py result."""
    loads = res["load_average_per_round"]
    return (f"Command: `.venv/bin/python {res['command']}`. CPU: {_flags(res['cpu'])}; load average per round "
            f"{min(loads):.1f}-{max(loads):.1f}, {res['load_average_end'][0]:.1f} at the end. Inputs: {res['images']}.")


def bank_speed_markdown(res: dict[str, Any]) -> str:
    lines = [_speed_header(res), "", "| bank rows | runs on | full path PNG p50 / p95 ms | full path JPEG p50 / p95 ms | bare `infer` "
             "p50 / p95 ms | bare CPU p50 ms | bare p50 / the largest bank's |", "|---:|---|---:|---:|---:|---:|---:|"]
    rows = res["rows"]
    groups = dict.fromkeys(k.rsplit("/", 1)[0] for k in rows)
    biggest = max(int(_bank_of(g)) for g in groups)
    for g in groups:
        backend = g.split("/")[1]
        png, jpeg, bare = (rows[f"{g}/{p}"] for p in ("full_png", "full_jpeg", "bare_infer"))
        largest = rows[f"bottle-bank{biggest}/{backend}/bare_infer"]["p50_ms"]
        lines.append(f"| {bare['info']['bank_rows']:,} | {backend} / {bare['info']['precision']} | {png['p50_ms']:.1f} / "
                     f"{png['p95_ms']:.1f} | {jpeg['p50_ms']:.1f} / {jpeg['p95_ms']:.1f} | {bare['p50_ms']:.1f} / "
                     f"{bare['p95_ms']:.1f} | {bare['cpu_p50_ms']:.1f} | {bare['p50_ms'] / largest:.2f} |")
    return "\n".join(lines)


def bundles_speed_markdown(res: dict[str, Any]) -> str:
    """bank_speed.py --pattern over bundles that differ in more than the bank (e.g. the default and --mirrors hv):
    a row per bundle and backend, the bare path against the first bundle's on the same backend."""
    lines = [_speed_header(res), "", "| bundle | mirrors | bank rows | runs on | full path PNG p50 / p95 ms | full path JPEG p50 / p95 ms | "
             "bare `infer` p50 / p95 ms | bare CPU p50 ms | bare p50 / the first bundle's |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    rows = res["rows"]
    groups = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in rows))
    first = {g.split("/")[1]: rows[f"{g}/bare_infer"]["p50_ms"] for g in reversed(groups)}
    for g in groups:
        name, backend = g.split("/")
        png, jpeg, bare = (rows[f"{g}/{p}"] for p in ("full_png", "full_jpeg", "bare_infer"))
        info = bare["info"]
        lines.append(f"| {name} | {info.get('mirrors', 'none')} | {info['bank_rows']:,} | {backend} / {info['precision']} | "
                     f"{png['p50_ms']:.1f} / {png['p95_ms']:.1f} | {jpeg['p50_ms']:.1f} / {jpeg['p95_ms']:.1f} | "
                     f"{bare['p50_ms']:.1f} / {bare['p95_ms']:.1f} | {bare['cpu_p50_ms']:.1f} | "
                     f"{bare['p50_ms'] / first[backend]:.2f} |")
    return "\n".join(lines)


__all__ = ["bank_size_markdown", "bank_speed_markdown", "bundles_speed_markdown", "within"]
