"""The Hinton blocks of docs/DISTILLATION.md: soft targets vs hard labels and the temperature sweep
(results/distill_hinton.json), and the measured epochs with the plan sized from them
(results/distill_epoch_times.json)."""
from __future__ import annotations

from distill_render import header, is_partial, mean, ms, paired, per_seed, run_lines, seeds_of, vals, verdict


JITTERED = ", jittered digits"  # the key suffix of distill_hinton.py --jittered's students


def soft_key(width: int, t: float, lam: float) -> str:
    return f"2x{width} soft T={t:g} lambda={lam:g}"


def hinton_big_t(r: dict) -> float | None:
    """The 2 x 800 temperature chosen on seed select_seed's validation errors (None until all candidates ran)."""
    c, s = r["config"], str(r["config"]["select_seed"])
    val = {t: r["values"].get(f"{soft_key(800, t, c['hard_weight'])} | val errors", {}).get(s) for t in c["big_ts"]}
    if any(v is None for v in val.values()):
        return None
    return min(sorted(val, reverse=True), key=val.get)


def hinton(r: dict) -> str:
    c = r["config"]
    big_t = hinton_big_t(r)
    soft800 = soft_key(800, big_t, c["hard_weight"]) if big_t is not None else None
    out = [header(r), ("| model | ours: test errors / 10,000 | per seed | val errors / 5,000 | training errors / "
                       "55,000 | seed 002: test errors / 10,000 |"), "|---|---|---|---|---|---|"]
    rows = [("teacher 2x1200", "teacher 2 x 1200, dropout + max-norm + jitter", "67"),
            ("2x800 hard labels", "2 x 800 hard labels", "146")]
    if soft800:
        rows.append((soft800, f"2 x 800 soft targets, T = {big_t:g}, lambda = {c['hard_weight']:g}", "74 (T = 20)"))
        rows += [("2x800 hard labels" + JITTERED, "2 x 800 hard labels, on translated digits (--jittered)", "—"),
                 (soft800 + JITTERED, f"2 x 800 soft targets, T = {big_t:g}, on translated digits (--jittered)", "—")]
    for key, label, ref in rows:
        if vals(r, f"{key} | test errors"):
            train = per_seed(r, f"{key} | train errors", 0) or "—"
            out.append(f"| {label} | {ms(vals(r, f'{key} | test errors'), 1)} | {per_seed(r, f'{key} | test errors', 0)}"
                       f" | {per_seed(r, f'{key} | val errors', 0)} | {train} | {ref} |")
    picks = [(t, r["values"].get(f"{soft_key(800, t, c['hard_weight'])} | val errors", {}).get(str(c["select_seed"])))
             for t in c["big_ts"]]
    if any(v is not None for _, v in picks):
        out += ["", f"Temperature of the 2 x 800 student, chosen on the validation errors of seed {c['select_seed']} "
                f"(lambda {c['hard_weight']:g}): " + ", ".join(f"T = {t:g}: {v}" for t, v in picks if v is not None)
                + (f" → **T = {big_t:g}**." if big_t is not None else " (not all candidates run yet).")]
    hard, soft = "2x800 hard labels | test errors", f"{soft800} | test errors"
    if soft800 and vals(r, hard) and vals(r, soft):
        d = paired(r, soft, hard)
        ratios = [r["values"][soft][s] / r["values"][hard][s] for s in seeds_of(r)
                  if s in r["values"][soft] and s in r["values"][hard]]
        ratio = mean(vals(r, soft)) / mean(vals(r, hard))
        every = len(d) > 1 and all(x < 0 for x in d)
        outcome = "reproduced" if ratio <= 0.6 else ("partly" if ratio < 1 and every else "not reproduced")
        out += ["", verdict("soft targets vs hard labels", "mean soft-target errors <= 0.6 x hard-label errors "
                            "(seed: 74/146 = 0.51) = reproduced; fewer errors in every seed = partly", outcome,
                            f"Ours: {mean(vals(r, soft)):.1f} / {mean(vals(r, hard)):.1f} = **{ratio:.2f}**; per "
                            f"seed {', '.join(f'{x:.2f}' for x in ratios)}; paired differences soft - hard "
                            f"{ms(d, 1)} errors ({', '.join(f'{x:+.0f}' for x in d)}); soft better in every seed: "
                            f"{every}.")]
    if soft800:
        out += lambda_reading(r, big_t) + jittered_reading(r, soft800)
    out += hinton_sweep(r)
    return "\n".join(out)


def lambda_reading(r: dict, big_t: float) -> list[str]:
    """distill_hinton.py --big-lambdas: the 2 x 800 soft students at other lambdas (a reading, not a verdict)."""
    c, hard = r["config"], "2x800 hard labels | test errors"
    out = []
    for key in sorted(k for k in r["values"] if k.startswith(f"2x800 soft T={big_t:g} lambda=")
                      and k.endswith(" | test errors") and JITTERED not in k):
        lam = float(key.split("lambda=")[1].split(" ")[0])
        if lam == c["hard_weight"] or not vals(r, hard):
            continue
        d = paired(r, key, hard)
        out.append(f"lambda = {lam:g}: {mean(vals(r, key)):.1f} test errors ({per_seed(r, key, 0)}; validation "
                   f"{per_seed(r, key.replace('test errors', 'val errors'), 0)}), soft / hard = "
                   f"**{mean(vals(r, key)) / mean(vals(r, hard)):.2f}**, paired {ms(d, 1)}")
    if not out:
        return []
    return ["", f"Other lambdas at T = {big_t:g} (`--big-lambdas`, every seed; the main arm's lambda is "
                f"{c['hard_weight']:g}): " + "; ".join(out) + "."]


def jittered_reading(r: dict, soft800: str) -> list[str]:
    """distill_hinton.py --jittered: the same comparison with both arms on translated digits (not a verdict)."""
    hard, soft = f"2x800 hard labels{JITTERED} | test errors", f"{soft800}{JITTERED} | test errors"
    if not (vals(r, hard) and vals(r, soft)):
        return []
    d = paired(r, soft, hard)
    ratio = mean(vals(r, soft)) / mean(vals(r, hard))
    return ["", (f"On translated digits (`--jittered`: both arms see the teacher's +-2 px translations, a new one "
                 f"per batch, the soft targets computed on the same translated digits): soft / hard = "
                 f"{mean(vals(r, soft)):.1f} / {mean(vals(r, hard)):.1f} = **{ratio:.2f}**; paired differences soft "
                 f"- hard {ms(d, 1)} errors ({', '.join(f'{x:+.0f}' for x in d)}); seeds: {len(d)}. This reading "
                 "asks whether the transfer set explains the gap to the seed; the verdict above stays the seed's "
                 "setting (untranslated digits for the students).")]


def hinton_sweep(r: dict) -> list[str]:
    """The temperature table (each T at the lambda with fewer mean validation errors) and its verdict."""
    c = r["config"]
    out = ["", ("| T | 2x300: lambda | 2x300: val errors / 5,000 | 2x300: test errors / 10,000 | 2x30: lambda | "
                "2x30: val errors / 5,000 | 2x30: test errors / 10,000 |"), "|---|---|---|---|---|---|---|"]
    cell = lambda key: [ms(vals(r, f"{key} | {s} errors"), 1) if vals(r, f"{key} | {s} errors") else "—"
                        for s in ("val", "test")]
    out.append("| hard labels | — | " + " | — | ".join(" | ".join(cell(f"2x{w} hard labels")) for w in (300, 30)) + " |")
    best: dict[int, dict[float, tuple[float, float]]] = {300: {}, 30: {}}  # width -> T -> (mean val, lambda)
    for t in c["temperatures"]:
        cells = []
        for w in (300, 30):
            lams = {lam: mean(vals(r, f"{soft_key(w, t, lam)} | val errors")) for lam in c["hard_weights"]
                    if vals(r, f"{soft_key(w, t, lam)} | val errors")}
            if not lams:
                cells += ["—", "—", "—"]
                continue
            lam = min(lams, key=lams.get)
            best[w][t] = (lams[lam], lam)
            cells += [f"{lam:g}", *cell(soft_key(w, t, lam))]
        out.append(f"| {t:g} | " + " | ".join(cells) + " |")
    n_full = {w: min((len(vals(r, f"{soft_key(w, t, lam)} | val errors")) for t in c["temperatures"]
                      for lam in c["hard_weights"]), default=0) for w in (300, 30)}
    if all(len(best[w]) == len(c["temperatures"]) and n_full[w] > 0 for w in (300, 30)):
        pick = {w: min(best[w], key=lambda t: best[w][t][0]) for w in (300, 30)}
        ok300, ok30 = pick[300] >= 8, 2.5 <= pick[30] <= 4
        outcome = "reproduced" if ok300 and ok30 else ("partly" if ok300 or ok30 else "not reproduced")
        out += ["", verdict("temperature", "best T by mean validation errors (each T at its better lambda) >= 8 "
                            "for 300 units and within 2.5-4 for 30 units (seed 002) = reproduced; one of the two = "
                            "partly", outcome, f"Ours: 300 units **T = {pick[300]:g}** (lambda "
                            f"{best[300][pick[300]][1]:g}), 30 units **T = {pick[30]:g}** (lambda "
                            f"{best[30][pick[30]][1]:g}); seeds per cell: {n_full[300]} (300 units), {n_full[30]} "
                            "(30 units).")]
    return out


# ------------------------------------------------------------------------------------------------ epoch times

TWO_PROCESS_SPLIT = (("student 2x800 hard labels", "student 2x800 soft targets", "student 2x30 soft targets"),
                     ("student 2x300 soft targets",))  # distill_hinton.py --widths 800,30 | --widths 300


def epoch_times(r: dict) -> str:
    """Measured epochs of the Hinton models, and distill_hinton.py's default schedule priced from them."""
    sched, notes = r["config"]["schedule"], r.get("epochs", {})
    out = [("**Partial run.** " if is_partial(r) else "") + "Runs: " + run_lines(r), "",
           (f"Data: {r.get('data', '?')}. Median of {r['config']['epochs_timed']} single epochs per model; bf16 "
            f"autocast for the 2x1200 and 2x800 nets: {r['config']['bf16_autocast']}."), "",
           ("| model (55,000 digits, batch 128, validation after each epoch) | CPU s per epoch | wall s per epoch | "
            "load average then | epochs in distill_hinton.py's plan | CPU min in the plan |"),
           "|---|---|---|---|---|---|"]
    minutes: dict[str, float] = {}
    for label, epochs in sched.items():
        cpu, wall = (r["values"].get(f"{label} | {k} s per epoch", {}).get("0") for k in ("CPU", "wall"))
        if cpu is None or wall is None:
            out.append(f"| {label} | — | — | — | {epochs} | — |")
            continue
        minutes[label] = cpu * epochs / 60
        load = notes.get(label, {}).get("load", float("nan"))
        out.append(f"| {label} | {cpu:.1f} | {wall:.1f} | {load:.1f} | {epochs} | {minutes[label]:.0f} |")
    if len(minutes) == len(sched):
        out += ["", quiet_machine_minutes(minutes)]
    return "\n".join(out)


def quiet_machine_minutes(minutes: dict[str, float]) -> str:
    """The plan's CPU minutes as the wall minutes of a quiet machine: one process, or two after the teacher."""
    teacher = minutes["teacher 2x1200 (dropout, max-norm, jitter)"]
    split = max(sum(minutes[k] for k in part) for part in TWO_PROCESS_SPLIT)
    return (f"**What a quiet machine needs:** {sum(minutes.values()):.0f} minutes of one core for the whole claim "
            "in one process (the CPU minutes above: one torch thread runs at one core's pace when nothing else "
            f"runs), or {teacher + split:.0f} minutes on two quiet cores: the teacher ({teacher:.0f} min), then the "
            f"students in two processes (`--widths 800,30` and `--widths 300`, {split:.0f} min for the longer). "
            "CPU seconds measured under load (see the load column) may differ from a quiet core's either way (shared "
            "caches and memory bandwidth, two epochs per model), so this is an estimate to check against a quiet "
            "run's own block; wall time under load is longer (the wall column).")
