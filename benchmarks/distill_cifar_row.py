"""The comparison row of seed 002 at the earlier small CPU scale (before issue 27), kept because the row has not
been re-run larger on CPU (the GPU script benchmarks/distill_gpu.py runs it at full scale). This is the former
benchmarks/distill_cifar.py unchanged but for its result file (results/distill_cifar_row.json) and block; its
TAKD/ESKD numbers are superseded by benchmarks/distill_cifar.py at full scale, and the doc shows only its row.

Seed 002 on CIFAR-10 with the TAKD paper's plain CNNs: TAKD (teacher 10 convs, assistants 8/6/4, student 2),
the early-stopped teacher (ESKD) vs the fully trained teacher as a KD source, and the comparison row (FitNets,
AT, FSP, DML, DKD, SP, CC, VID, RKD, PKT, NST, CRD, ReviewKD) for the same student and teacher.

Models: takd<D>x<P> = the TAKD paper's CIFAR plain CNN with D conv layers at P % of its channel widths (CPU
budget): teacher takd10x50, assistants takd8x50 / takd6x50 / takd4x50, student takd2x25 (deliberately weak,
for a large teacher-student gap).
Per seed: the teacher learns the training subset with hard labels and crop-flip augmentation (a snapshot is
kept after a third of its epochs: the early-stopped teacher); each assistant learns from the teacher by Hinton
KD; students learn with no KD (NOKD), KD from the teacher (BLKD), KD from each assistant (TAKD), KD from the
early-stopped teacher (ESKD). Assistants and students see the training images without augmentation, so the
teacher's logits are computed once; NOKD with crop-flip is shown as a reference. KD: T = 4, lambda = 0.5 on
the hard-label term (chosen over lambda = 0.1 on validation accuracy in a pilot run). Row: CE + each
method's term with RepDistiller's weights (stpm.distill.cli), live teacher, no augmentation; DML trains the
student with a second takd2x25 peer. Adam lr 1e-3, batch 128. No choice is made on the test set; validation
accuracy is recorded beside test accuracy. The teacher of each seed is saved under benchmarks/work/ so that
the row (--row-only) can run later without retraining it.
Data: CIFAR-10 (JPEG q75 copy), a training subset drawn with split seed 0, 5,000 validation images, the
official 10,000 test images.

python benchmarks/distill_cifar_row.py [--seeds 0 1 2] [--no-row | --row-only]
"""
from __future__ import annotations

import torch
from distill_common import CIFAR_CACHE, WORK, Results, accuracy, parse_args, seed_all, update_doc

from stpm.distill.cli import KDSettings, make_objective
from stpm.distill.data import cifar10_split
from stpm.distill.methods import (CachedKDObjective, CrossEntropyObjective, MutualObjective, RunConfig,
                                  pack_labels_and_logits, run)
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, predict_logits, read_checkpoint, save_checkpoint

TEACHER, ASSISTANTS, STUDENT = "takd10x50", (8, 6, 4), "takd2x25"
T, HARD_WEIGHT, N_VAL = 4.0, 0.5, 5000
ROW = {"FitNets": "fitnets", "AT": "at", "FSP": "fsp", "DKD": "dkd", "SP": "sp", "CC": "cc", "VID": "vid",
       "RKD": "rkd", "PKT": "pkt", "NST": "nst", "CRD": "crd", "ReviewKD": "reviewkd"}


def main() -> None:
    args = parse_args(__doc__, {"--n-train": (int, 10000, "training images"),
                                "--teacher-epochs": (int, 12, "teacher epochs"),
                                "--epochs": (int, 8, "assistant and student epochs"),
                                "--no-row": (bool, False, "skip the comparison row"),
                                "--row-only": (bool, False, "only the comparison row (reuses the saved teachers)")})
    early = max(1, args.teacher_epochs // 3)
    config = {"teacher": TEACHER, "assistants": [f"takd{a}x50" for a in ASSISTANTS], "student": STUDENT,
              "n_train": args.n_train, "n_val": N_VAL, "teacher_epochs": args.teacher_epochs,
              "early_teacher_epoch": early, "epochs": args.epochs, "temperature": T, "hard_weight": HARD_WEIGHT,
              "lr": 1e-3, "lr_schedule": "cosine", "batch_size": 128, "teacher_augment": "crop-flip",
              "student_augment": "none"}
    res = Results("cifar_row", args, config)
    data = cifar10_split(args.n_train, N_VAL, 0, cache=CIFAR_CACHE)
    res.data["data"] = data.description
    spec = InputSpec(3, 32, 10)
    dev = torch.device("cpu")
    xtr, ytr = data.x_train, data.y_train

    def record(key: str, seed: int, model: torch.nn.Module) -> None:
        res.add(f"{key} | val acc", seed, accuracy(model, data.x_val, data.y_val), " %")
        res.add(f"{key} | test acc", seed, accuracy(model, data.x_test, data.y_test), " %")

    for seed in args.seeds:
        cfg = lambda epochs, augment="none": RunConfig(  # noqa: E731
            TrainConfig(epochs=epochs, lr=1e-3, lr_schedule="cosine", augment=augment), batch_size=128, seed=seed)
        fresh = lambda name: (seed_all(seed), build_model(name, spec))[1]  # noqa: E731
        teacher_path = WORK / f"cifar_teacher_{TEACHER}_e{args.teacher_epochs}_n{args.n_train}_seed{seed}.pt"
        if args.row_only:
            teacher = fresh(TEACHER)
            state, meta = read_checkpoint(teacher_path)
            if meta.get("split") != data.fingerprint():
                raise SystemExit(f"{teacher_path} was trained on another split; run without --row-only first")
            teacher.load_state_dict(state)
            row(args, res, seed, teacher, fresh, cfg, record, xtr, ytr)
            continue

        teacher = fresh(TEACHER)
        hist = run(CrossEntropyObjective(teacher), xtr, ytr, cfg(args.teacher_epochs, "crop-flip"), dev,
                   snapshot_epochs=(early,), desc="teacher")
        save_checkpoint(teacher, teacher_path, {"model": TEACHER, "split": data.fingerprint(), "classes": None})
        record("teacher takd10", seed, teacher)
        early_teacher = fresh(TEACHER)
        early_teacher.load_state_dict(hist.snapshots[early])
        record("teacher takd10 early", seed, early_teacher)
        targets = pack_labels_and_logits(ytr, predict_logits(teacher, xtr, dev))

        assistant_targets = {}
        for depth in ASSISTANTS:
            ta = fresh(f"takd{depth}x50")
            run(CachedKDObjective(ta, T, HARD_WEIGHT), xtr, targets, cfg(args.epochs), dev, desc=f"TA{depth}")
            record(f"TA takd{depth} (KD from teacher)", seed, ta)
            assistant_targets[depth] = pack_labels_and_logits(ytr, predict_logits(ta, xtr, dev))

        def student(key: str, objective_for, y: torch.Tensor, augment: str = "none") -> torch.nn.Module:
            s = fresh(STUDENT)
            run(objective_for(s), xtr, y, cfg(args.epochs, augment), dev, desc=key)
            record(f"student takd2 {key}", seed, s)
            return s

        student("NOKD", CrossEntropyObjective, ytr)
        student("NOKD + crop-flip (reference)", CrossEntropyObjective, ytr, "crop-flip")
        student("BLKD", lambda s: CachedKDObjective(s, T, HARD_WEIGHT), targets)
        for depth in ASSISTANTS:
            student(f"TAKD (TA={depth})", lambda s: CachedKDObjective(s, T, HARD_WEIGHT), assistant_targets[depth])
        early_targets = pack_labels_and_logits(ytr, predict_logits(early_teacher, xtr, dev))
        student("ESKD (early teacher)", lambda s: CachedKDObjective(s, T, HARD_WEIGHT), early_targets)
        for row_key, key in (("NOKD", "NOKD"), ("BLKD", "BLKD"), ("TAKD (TA=4)", "TAKD (TA=4)")):
            for split in ("val", "test"):
                res.add(f"row {row_key} | {split} acc", seed,
                        res.data["values"][f"student takd2 {key} | {split} acc"][str(seed)])
        update_doc("cifar_row")
        if not args.no_row:
            row(args, res, seed, teacher, fresh, cfg, record, xtr, ytr)
    res.finish()


def row(args, res, seed, teacher, fresh, cfg, record, xtr, ytr) -> None:
    """The comparison row for one seed: every feature/relation method, DKD and DML, live teacher."""
    dev = torch.device("cpu")
    example = xtr[:8]
    for name, method in ROW.items():
        s = fresh(STUDENT)
        run(make_objective(KDSettings(method=method), s, teacher, example), xtr, ytr, cfg(args.epochs), dev,
            desc=name)
        record(f"row {name}", seed, s)
    s = fresh(STUDENT)
    seed_all(seed + 1000)  # the peer starts from another initialisation
    peer = build_model(STUDENT, InputSpec(3, 32, 10))
    run(MutualObjective([s, peer], temperature=1.0), xtr, ytr, cfg(args.epochs), dev, desc="DML")
    record("row DML", seed, s)
    update_doc("cifar_row")



if __name__ == "__main__":
    main()
