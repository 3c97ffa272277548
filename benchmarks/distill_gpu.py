"""TAKD, ESKD, the comparison row (seed 002) and Noisy Student (seeds 000/001) at the papers' scale, on one GPU.

Data: the full CIFAR-10 (JPEG q75 copy): 45,000 training / 5,000 validation images (split seed 0), the
official 10,000 test images, all moved to the GPU once (mini-batches are cut there by index).
Models: the TAKD paper's plain CNNs at their full published widths: teacher takd10, assistants takd8 /
takd6 / takd4, student takd2 (2 conv layers).
Per seed (3 seeds, each with its own teacher and assistants):
- TAKD / ESKD (distill_takd.py): teacher with crop-flip (snapshot after a third of its epochs = the early-
  stopped teacher), assistants by KD from it, students NOKD, BLKD, TAKD (TA = 8, 6, 4), ESKD and NOKD at
  half the epochs; students and assistants without augmentation, teacher logits computed once.
- the comparison row: the same student with FitNets, AT, FSP, DKD, SP, CC, VID, RKD, PKT, NST, CRD, ReviewKD
  (live teacher, RepDistiller's loss weights, stpm.distill.cli.make_objective) and DML (two takd2 peers);
  NOKD, BLKD and TAKD (TA = 4) come from the TAKD part.
- Noisy Student: a takd6 teacher learns 4,000 labelled images (crop-flip); the other 41,000 lose their
  labels; two iterations of a noised takd6 student (crop-flip + Gaussian input noise 0.1, soft pseudo-labels
  at T = 1) on labelled + pseudo-labelled images, each student the next teacher; ablation: iteration 1
  without noise.
Schedule: SGD with Nesterov momentum 0.9, weight decay 5e-4, lr 0.05 with a cosine decay to 0, batch 128,
bfloat16 autocast, channels-last: the TAKD paper's optimiser (SGD, momentum 0.9, batch 128), but a cosine
decay over 30 teacher / 15 assistant and student epochs (Noisy Student: teacher 150 epochs of its 4,000
images, students 15) instead of a constant lr 0.01 over 200 epochs: the closest that fits 10 minutes.
KD: T = 4, lambda = 0.5.

Plan (estimated, not measured: no GPU was at hand when this was written). These models are so small that a
step is bound by kernel launches and Python, not by the GPU: ~2-4 ms per batch of 128 on an H100, ~1 s per
epoch of 45,000 images. Per seed: teacher ~35 s, assistants ~35 s, 7 students ~60 s, the 13-method row with
its live teacher ~250 s, Noisy Student ~50 s, ~7 min sequentially; the three seeds run as three processes
sharing the GPU (--jobs 3, the default on CUDA; the JPEGs are decoded once, ~40 s, before they start),
expected 8-11 min in all. The result file records the wall time of every part. A run cut short resumes
where it stopped when the same command runs again (benchmarks/work/ keeps the per-seed files, teachers and
assistants); `--epochs-scale 0.7` shortens every schedule if the GPU turns out slower than this plan.

python benchmarks/distill_gpu.py [--seeds 0 1 2] [--jobs 3] [--parts takd,row,noisy] [--epochs-scale 1.0]
python benchmarks/distill_gpu.py --quick    # CPU smoke run: tiny data, quarter widths, 1-2 epochs (< 1 min);
                                            # writes benchmarks/work/distill_gpu_quick.json, never the doc
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from distill_common import CIFAR_CACHE, WORK, Results, accuracy, parse_args, seed_all
from distill_takd import SPEC, Pipeline, Scale

from stpm.distill.cli import KDSettings, make_objective
from stpm.distill.data import cifar10_split, load_cifar10
from stpm.distill.methods import (CrossEntropyObjective, MutualObjective, NoisyStudentConfig, noisy_student,
                                  run)
from stpm.distill.models import build_model

ROW = {"FitNets": "fitnets", "AT": "at", "FSP": "fsp", "DKD": "dkd", "SP": "sp", "CC": "cc", "VID": "vid",
       "RKD": "rkd", "PKT": "pkt", "NST": "nst", "CRD": "crd", "ReviewKD": "reviewkd"}
NOISE = NoisyStudentConfig(iterations=2, soft=True, temperature=1.0, max_shift=0, noise_std=0.1)
PARTS = ("takd", "row", "noisy")


def scales(args) -> tuple[Scale, dict]:
    """The TAKD scale and the Noisy Student settings (full, or --quick's tiny CPU version)."""
    if args.quick:
        return (Scale(width=25, teacher_epochs=1, assistant_epochs=1, student_epochs=2, shared_teachers=False,
                      precision="fp32"),
                {"model": "takd6x25", "n_labeled": 100, "teacher_epochs": 1, "epochs": 1})
    f = args.epochs_scale
    e = lambda n: max(1, round(n * f))  # noqa: E731
    return (Scale(width=100, teacher_epochs=e(30), assistant_epochs=e(15), student_epochs=e(15),
                  shared_teachers=False, precision="bf16"),
            {"model": "takd6", "n_labeled": 4000, "teacher_epochs": e(150), "epochs": e(15)})


def load_data(args):
    if args.quick:
        return cifar10_split(600, 200, 0, per_class=80)
    return cifar10_split(None, 5000, 0, cache=CIFAR_CACHE)


def row(pipe: Pipeline, seed: int) -> None:
    """The comparison row for one seed: each method with the seed's live teacher; DML with a second peer."""
    res, s = pipe.res, pipe.scale
    for key in ("NOKD", "BLKD", "TAKD (TA=4)"):
        for split in ("val", "test"):
            if res.has(f"student takd2 {key} | {split} acc", seed):
                res.add(f"row {key} | {split} acc", seed, res.get(f"student takd2 {key} | {split} acc", seed))
    saved = pipe.cached("teacher", seed, 10)
    if saved is None:
        raise SystemExit(f"seed {seed}: no saved teacher for the comparison row; run the takd part first")
    teacher = saved[0].to(pipe.device)
    for name, method in [*ROW.items(), ("DML", "dml")]:
        if res.has(f"row {name} | test acc", seed):
            continue
        student = pipe.fresh(2, seed)
        if method == "dml":
            seed_all(seed + 1000)  # the peer starts from another initialisation
            objective = MutualObjective([student, build_model(s.name(2), SPEC)], temperature=1.0)
        else:
            objective = make_objective(KDSettings(method=method), student, teacher, pipe.xtr[:8].cpu())
        hist = run(objective, pipe.xtr, pipe.ytr, s.run_config(s.student_epochs, seed), pipe.device,
                   eval_data=pipe.val, desc=name)
        pipe.record(f"row {name}", seed, student, hist.test_errors)


def noisy(pipe: Pipeline, seed: int, ns: dict) -> None:
    """Noisy Student for one seed: teacher on the labelled subset, two noised iterations, the ablation."""
    res, s, dev = pipe.res, pipe.scale, pipe.device
    if res.has("student without noise, iteration 1 (ablation) | test acc", seed):
        return
    perm = torch.randperm(len(pipe.ytr), generator=torch.Generator().manual_seed(seed)).to(dev)
    lab, unlab = perm[:ns["n_labeled"]], perm[ns["n_labeled"]:]
    x_l, y_l, x_u = pipe.xtr[lab], pipe.ytr[lab], pipe.xtr[unlab]
    make = lambda: build_model(ns["model"], SPEC)  # noqa: E731
    seed_all(seed)
    teacher = make()
    run(CrossEntropyObjective(teacher), x_l, y_l, s.run_config(ns["teacher_epochs"], seed, "crop-flip"), dev,
        desc="NS teacher")
    res.add("teacher | test acc", seed, accuracy(teacher, *pipe.test, dev), " %")
    seed_all(seed)
    for i, (student, _) in enumerate(noisy_student(teacher, make, x_l, y_l, x_u, NOISE,
                                                   s.run_config(ns["epochs"], seed, "crop-flip"), dev), 1):
        res.add(f"noisy student iteration {i} | test acc", seed, accuracy(student, *pipe.test, dev), " %")
    seed_all(seed)
    plain = NoisyStudentConfig(iterations=1, soft=True, temperature=1.0, max_shift=0, noise_std=0.0)
    ((student, _),) = noisy_student(teacher, make, x_l, y_l, x_u, plain, s.run_config(ns["epochs"], seed), dev)
    res.add("student without noise, iteration 1 (ablation) | test acc", seed, accuracy(student, *pipe.test, dev),
            " %")


def one_process(args, res: Results) -> None:
    """Every part for the seeds of this process, on the GPU (or the CPU with --quick)."""
    scale, ns = scales(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    torch.backends.cudnn.benchmark = True
    data = load_data(args)
    res.data["data"] = data.description
    pipe = Pipeline(res, data, scale, device, tag="gpu_quick" if args.quick else "gpu")
    for seed in args.seeds:
        for part in args.parts:
            started = time.time()
            if part == "takd":
                pipe.seed_run(seed)
            elif part == "row":
                row(pipe, seed)
            else:
                noisy(pipe, seed, ns)
            res.note("part_seconds", f"seed {seed} {part}", round(time.time() - started, 1))


def merge(res: Results, paths: list[Path]) -> None:
    """Values, curves and part timings of the per-seed processes' files into the main result file."""
    for p in paths:
        child = json.loads(p.read_text())
        for key, per in child["values"].items():
            res.data["values"].setdefault(key, {}).update(per)
        for section in ("curves", "part_seconds"):
            res.data.setdefault(section, {}).update(child.get(section, {}))
        res.run.setdefault("child_cpu_seconds", 0)
        res.run["child_cpu_seconds"] += child["runs"][-1].get("cpu_seconds", 0)
        res.data["data"] = child.get("data", res.data.get("data"))
    res.save()


def main() -> None:
    args = parse_args(__doc__, {"--quick": (bool, False, "CPU smoke run: tiny data, quarter widths, 1-2 epochs"),
                                "--jobs": (int, 0, "processes, one per seed (0: 3 on CUDA, 1 otherwise)"),
                                "--parts": (str, ",".join(PARTS), "comma-separated subset of takd,row,noisy"),
                                "--epochs-scale": (float, 1.0, "multiply every schedule (a slower GPU)")})
    args.parts = [p for p in args.parts.split(",") if p]
    if not set(args.parts) <= set(PARTS):
        raise SystemExit(f"--parts must be a subset of {PARTS}, got {args.parts}")
    if args.quick and args.out is None:
        args.out = WORK / "distill_gpu_quick.json"
    scale, ns = scales(args)
    config = scale.config() | {"noisy_student": ns | {"noise": NOISE.__dict__, "augment": "crop-flip"},
                               "row_methods": [*ROW, "DML"], "quick": args.quick}
    res = Results("gpu", args, config)
    if torch.cuda.is_available() and not args.quick:
        res.run["gpu"] = torch.cuda.get_device_name(0)
    jobs = args.jobs or (3 if torch.cuda.is_available() and not args.quick else 1)
    if jobs <= 1 or len(args.seeds) <= 1:
        one_process(args, res)
    else:
        load_cifar10(cache=CIFAR_CACHE)  # decode once here; the processes read the cache
        paths, procs = [], []
        for seed in args.seeds:
            paths.append(WORK / f"distill_gpu{'_quick' if args.quick else ''}_seed{seed}.json")
            cmd = [sys.executable, __file__, "--seeds", str(seed), "--jobs", "1", "--parts", ",".join(args.parts),
                   "--epochs-scale", str(args.epochs_scale), "--out", str(paths[-1])] + ["--quick"] * args.quick
            procs.append(subprocess.Popen(cmd))
        failed = [p.args for p in procs if p.wait() != 0]
        merge(res, [p for p in paths if p.is_file()])
        if failed:
            raise SystemExit(f"seed processes failed: {failed}")
    res.finish()


if __name__ == "__main__":
    main()
