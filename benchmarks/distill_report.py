"""Render the reproduction tables of docs/DISTILLATION.md from benchmarks/results/distill_<name>.json.

Each benchmark calls write_sections([name]) when it finishes a seed; this script re-renders them all:
python benchmarks/distill_report.py [names...]
Each table sits between `<!-- BEGIN distill_<name> -->` and `<!-- END distill_<name> -->` in the doc, with
the seeds' numbers beside ours and a verdict computed from the numbers by the criterion it states.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "DISTILLATION.md"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # stpm, and the renderers beside this file

from distill_render import (
    VERDICT,
    all_positive,
    header,
    is_partial,
    mean,
    ms,
    paired,
    per_seed,
    seeds_of,
    vals,
    verdict,
    without_verdicts,
)
from distill_report_hinton import epoch_times, hinton

CLAIMS = ("hinton", "cifar", "cifar_row", "noisy_student", "disjoint", "gpu")  # blocks with verdicts
NAMES = (*CLAIMS, "epoch_times")
NOT_RUN = {"gpu": "Not run yet: no GPU was at hand when this page was last rendered. `python benchmarks/distill_gpu.py` "
                  "on a GPU machine writes benchmarks/results/distill_gpu.json, and this block shows its numbers "
                  "with the GPU, the command and the time."}


def load(name: str) -> dict | None:
    p = RESULTS / f"distill_{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ------------------------------------------------------------------------------------------------ cifar

CIFAR_ROW = ("NOKD", "BLKD", "FitNets", "AT", "FSP", "DML", "DKD", "SP", "CC", "VID", "RKD", "PKT", "NST", "CRD",
             "ReviewKD", "TAKD (TA=4)")
SEED_ROW_RESNET8 = {"NOKD": "86.02", "BLKD": "86.66", "FitNets": "86.73", "AT": "86.86", "FSP": "87.07",
                    "DML": "87.71", "TAKD (TA=4)": "88.01"}


def cifar(r: dict) -> str:
    """TAKD and ESKD (the CPU run at full CIFAR-10 scale)."""
    return "\n".join([header(r), *cifar_takd(r, ""), *cifar_eskd(r, "")])


def cifar_row(r: dict) -> str:
    """The comparison row of the earlier small CPU run."""
    note = [f"Note: {r['note']}."] if r.get("note") else []
    return "\n".join([header(r), *note, *cifar_row_table(r, " (small CPU scale)")])


def cifar_takd(r: dict, tag: str) -> list[str]:
    """The model table and the TAKD verdict; `tag` tells the verdict labels of different blocks apart."""
    acc = lambda k: vals(r, f"{k} | test acc")
    c = r["config"]
    t = "takd10" if c.get("width", 100) == 100 else f"takd10x{c['width']}"
    out = ["| model | ours: CIFAR-10 test accuracy % | per seed | ours: validation accuracy % | seed 002 "
           "(plain CNNs, CIFAR-10) |", "|---|---|---|---|---|"]
    ref = {"teacher takd10": "—", "teacher takd10 early": "—", "TA takd8 (KD from teacher)": "—",
           "TA takd6 (KD from teacher)": "—", "TA takd4 (KD from teacher)": "—", "student takd2 NOKD": "70.16"}
    ref |= {k[: -len(" | test acc")]: "—" for k in r["values"]
            if k.startswith("student takd2 NOKD, half") and k.endswith(" | test acc")}
    ref |= {"student takd2 BLKD": "72.57", "student takd2 TAKD (TA=8)": "72.75", "student takd2 TAKD (TA=6)": "73.15",
            "student takd2 TAKD (TA=4)": "73.51", "student takd2 ESKD (early teacher)": "—"}
    for k, v in ref.items():
        if acc(k):
            label = k.replace("teacher takd10 early", f"early-stopped teacher (epoch {c.get('early_teacher_epoch')})")
            out.append(f"| {label.replace('takd10', t)} | {ms(acc(k))} | {per_seed(r, f'{k} | test acc', 2)} | "
                       f"{ms(vals(r, f'{k} | val acc'))} | {v} |")
    nokd, blkd = acc("student takd2 NOKD"), acc("student takd2 BLKD")
    tas = {ta: acc(f"student takd2 TAKD (TA={ta})") for ta in (8, 6, 4)}
    if nokd and blkd and all(tas.values()):
        m = {k: mean(v) for k, v in {"NOKD": nokd, "BLKD": blkd, **{f"TA{t}": v for t, v in tas.items()}}.items()}
        order = m["NOKD"] < m["BLKD"] < m["TA4"]
        ta_order = m["TA8"] < m["TA6"] < m["TA4"]
        d_kd = paired(r, "student takd2 BLKD | test acc", "student takd2 NOKD | test acc")
        d_ta = paired(r, "student takd2 TAKD (TA=4) | test acc", "student takd2 BLKD | test acc")
        clear = all_positive(d_kd) and all_positive(d_ta)
        outcome = ("reproduced" if order and ta_order and clear else
                   "partly" if (m["BLKD"] > m["NOKD"] and max(m["TA8"], m["TA6"], m["TA4"]) > m["BLKD"]) or order
                   else "not reproduced")
        out += ["", verdict(f"TAKD{tag}", "mean accuracies NOKD < BLKD < TAKD(TA=4) and TA=8 < TA=6 < TA=4 (seed "
                            "002), with BLKD > NOKD and TAKD(TA=4) > BLKD in every seed = reproduced; KD above NOKD "
                            "and some assistant above BLKD on average, or the first ordering alone = partly", outcome,
                            f"Paired per-seed differences: BLKD - NOKD {ms(d_kd)} points, TAKD(TA=4) - BLKD "
                            f"{ms(d_ta)} points; NOKD < BLKD < TAKD(TA=4) in the means: {order}; TA ordering "
                            f"8 < 6 < 4 in the means: {ta_order}; both gains in every seed: {clear}.")]
    return out


def cifar_eskd(r: dict, tag: str) -> list[str]:
    acc = lambda k: vals(r, f"{k} | test acc")
    eskd, full = acc("student takd2 ESKD (early teacher)"), acc("student takd2 BLKD")
    if not (eskd and full):
        return []
    c = r["config"]
    out = ["", "| KD source | teacher test accuracy % | student takd2 test accuracy % |", "|---|---|---|",
           f"| fully trained teacher (epoch {c['teacher_epochs']}) | {ms(acc('teacher takd10'))} | {ms(full)} |",
           f"| early-stopped teacher (epoch {c['early_teacher_epoch']}, a third of the schedule, fixed in advance) | "
           f"{ms(acc('teacher takd10 early'))} | {ms(eskd)} |"]
    d = paired(r, "student takd2 ESKD (early teacher) | test acc", "student takd2 BLKD | test acc")
    outcome = "reproduced" if all_positive(d) else "partly" if d and mean(d) > 0 else "not reproduced"
    return out + ["", verdict(f"ESKD{tag}", "the student of the early-stopped teacher beats the student of the fully "
                              "trained teacher in every seed = reproduced; on average = partly (seed 002, after Cho "
                              "& Hariharan 2019: early stopping the teacher helps)", outcome,
                              f"Paired differences ESKD - KD: {ms(d)} points.")]


def cifar_row_table(r: dict, tag: str) -> list[str]:
    acc = lambda k: vals(r, f"{k} | test acc")
    rows = [(k, acc(f"row {k}")) for k in CIFAR_ROW if acc(f"row {k}")]
    if not rows:
        return []
    out = ["", "| method (student takd2, teacher takd10) | ours: test accuracy % | per seed | minus NOKD (paired) | "
           "seed 002: ResNet8 student, CIFAR-10 |", "|---|---|---|---|---|"]
    for k, v in rows:
        d = paired(r, f"row {k} | test acc", "row NOKD | test acc")
        out.append(f"| {k} | {ms(v)} | {per_seed(r, f'row {k} | test acc', 2)} | "
                   f"{ms(d) if k != 'NOKD' else '—'} | {SEED_ROW_RESNET8.get(k, '—')} |")
    # paired with NOKD over the seeds each method has (the row may have fewer seeds than NOKD)
    better = [k for k, _ in rows if k != "NOKD" and mean(paired(r, f"row {k} | test acc", "row NOKD | test acc")) > 0]
    every = [k for k, _ in rows if k != "NOKD" and all_positive(paired(r, f"row {k} | test acc",
                                                                        "row NOKD | test acc"))]
    n = len(rows) - 1
    outcome = "reproduced" if len(every) == n else ("partly" if better else "not reproduced")
    return out + ["", verdict(f"comparison row{tag}", "every method above NOKD in every seed (as in seed 002's "
                              "ResNet8 row) = reproduced; some above NOKD on average (paired, over the seeds the "
                              "method has) = partly", outcome,
                              f"{len(better)} of {n} methods above NOKD on average ({', '.join(better) or 'none'}); "
                              f"in every seed: {', '.join(every) or 'none'}.")]


def gpu(r: dict) -> str:
    """The GPU run: TAKD, ESKD, the comparison row and Noisy Student at full scale, one block."""
    out = [header(r)]
    parts = r.get("part_seconds", {})
    if parts:
        out += [f"Wall seconds per part: {', '.join(f'{k} {v:.0f}' for k, v in parts.items())}.", ""]
    out += ["**TAKD and ESKD**", "", *cifar_takd(r, " (GPU)"), *cifar_eskd(r, " (GPU)")]
    out += ["", "**Comparison row**", *cifar_row_table(r, " (GPU)")]
    ns = noisy_student_table(r, " (GPU)")
    return "\n".join(out + (["", "**Noisy Student**", "", *ns] if ns else []))


# ------------------------------------------------------------------------------------------------ noisy student

def noisy_student(r: dict) -> str:
    return "\n".join([header(r), *noisy_student_table(r, "")])


def noisy_student_table(r: dict, tag: str) -> list[str]:
    keys = [k[: -len(" | test acc")] for k in ("teacher | test acc", "noisy student iteration 1 | test acc",
                                                "noisy student iteration 2 | test acc",
                                                "student without noise, iteration 1 (ablation) | test acc")
            if k in r["values"]]
    if not keys:
        return []
    out = ["| model | ours: CIFAR-10 test accuracy % | per seed |", "|---|---|---|"]
    out += [f"| {k} | {ms(vals(r, f'{k} | test acc'))} | {per_seed(r, f'{k} | test acc', 2)} |" for k in keys]
    t, s1, s2 = (vals(r, f"{k} | test acc") for k in ("teacher", "noisy student iteration 1",
                                                        "noisy student iteration 2"))
    if t and s1 and s2:
        d1 = paired(r, "noisy student iteration 1 | test acc", "teacher | test acc")
        d2 = paired(r, "noisy student iteration 2 | test acc", "noisy student iteration 1 | test acc")
        ok1, ok2 = mean(d1) > 0, mean(d2) > 0
        outcome = ("reproduced" if all_positive(d1) and all_positive(d2) else
                   "partly" if ok1 or ok2 else "not reproduced")
        out += ["", verdict(f"Noisy Student{tag}", "each noised student beats its teacher in every seed (iteration 1 "
                            "> teacher, iteration 2 > iteration 1; seeds 000/001) = reproduced; either on average = "
                            "partly", outcome, f"Paired differences: iteration 1 - teacher {ms(d1)}, iteration 2 - "
                            f"iteration 1 {ms(d2)} points.")]
    return out


# ------------------------------------------------------------------------------------------------ disjoint

def disjoint(r: dict) -> str:
    out = [header(r)]
    for ds in r["config"]["datasets"]:
        keys = [k[len(ds) + 1: -len(" | acc")] for k in r["values"] if k.startswith(f"{ds} ") and k.endswith(" | acc")]
        if not keys:
            continue
        out += [f"\n**{ds}**\n", "| test images / model | ours: accuracy % | per seed |", "|---|---|---|"]
        out += [f"| {k} | {ms(vals(r, f'{ds} {k} | acc'))} | {per_seed(r, f'{ds} {k} | acc', 2)} |" for k in keys]
        halves = r["config"]["halves"]
        merged = [f"merged student [{w}]" for w in r["config"]["students"]]
        lines = []
        for m in merged:
            gaps = [mean(vals(r, f"{ds} half {h}: {m} within half | acc")) -
                    mean(vals(r, f"{ds} half {h}: teacher | acc")) for h in halves]
            overall = mean(vals(r, f"{ds} all classes: {m} | acc"))
            sup = mean(vals(r, f"{ds} all classes: supervised student | acc"))
            within_ok = all(g >= -1.0 for g in gaps)
            outcome = ("reproduced" if within_ok and overall >= 0.9 * sup else "partly" if within_ok
                       else "not reproduced")
            lines.append(verdict(f"{ds}, {m}", "on each half's test images, restricted to that half's classes, "
                                 "within 1 point of that half's teacher, and over all classes at least 90 % of a "
                                 "student trained with all labels = reproduced; the first alone = partly", outcome,
                                 "Within-half gaps to the teachers: " + ", ".join(f"{g:+.2f}" for g in gaps) +
                                 f" points; all classes {overall:.2f} % vs supervised {sup:.2f} %."))
        d = paired(r, f"{ds} all classes: merged student [energy + latent alignment] | acc",
                   f"{ds} all classes: merged student [energy] | acc")
        if d:
            outcome = "reproduced" if all_positive(d) else "partly" if mean(d) > 0 else "not reproduced"
            lines.append(verdict(f"{ds}, latent alignment (seed 004)", "AE + triplet latent alignment raises "
                                 "the merged student's accuracy over all classes in every seed = reproduced; on "
                                 "average = partly", outcome, f"Paired difference latent - plain merge: {ms(d)} "
                                 "points."))
        out += [""] + ["- " + x for x in lines]
    return "\n".join(out)


RENDER = {"hinton": hinton, "cifar": cifar, "cifar_row": cifar_row, "noisy_student": noisy_student,
          "disjoint": disjoint, "gpu": gpu, "epoch_times": epoch_times}


def render(name: str, r: dict) -> str:
    """The block of one result file; a partial run's block draws no verdict."""
    text = RENDER[name](r)
    return without_verdicts(text) if is_partial(r) else text


def summary() -> str:
    """One row per verdict of every rendered block, with the seeds behind it."""
    out = ["| claim | verdict | seeds completed | section |", "|---|---|---|---|"]
    for name in CLAIMS:
        r = load(name)
        if not r or is_partial(r):
            state = "partial run, no verdict" if r else "not run yet"
            out.append(f"| distill_{name} | {state} | — | distill_{name} |")
            continue
        for label, outcome in VERDICT.findall(render(name, r)):
            n = len(seeds_of(r))
            if label.startswith("comparison row"):  # its methods may have fewer seeds than the TAKD runs
                n = min(len(v) for v in (vals(r, f"row {k} | test acc") for k in CIFAR_ROW) if v)
            out.append(f"| {label} | **{outcome}** | {n} | distill_{name} |")
    return "\n".join(out)


def write_sections(names: list[str] | tuple[str, ...] = NAMES, doc: Path = DOC) -> None:
    """Replace each named block of the doc with the table rendered from its JSON (blocks must exist)."""
    text = doc.read_text()
    for name in [*names, "summary"]:
        r = load(name) if name != "summary" else None
        script = "distill_report" if name == "summary" else f"distill_{name}"
        begin = f"<!-- BEGIN distill_{name} (written by benchmarks/{script}.py; do not edit) -->"
        end = f"<!-- END distill_{name} -->"
        if begin not in text or end not in text:
            print(f"{doc}: no block for {name}; add the lines\n{begin}\n{end}")
            continue
        body = (summary() if name == "summary" else render(name, r) if r else
                NOT_RUN.get(name, f"(no results/distill_{name}.json yet)"))
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    doc.write_text(text)


if __name__ == "__main__":
    write_sections(sys.argv[1:] or NAMES)
