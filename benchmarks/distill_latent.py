"""Claim 6 (seed 004): heterogeneous teachers (an MLP and a CNN, each trained on a different half of the
training images) aligned in one latent space by an autoencoder with a triplet loss; a small MLP student
matches the shared latent code on top of averaged soft targets. Compared with plain multi-teacher
averaging and with no distillation.
Data: MNIST test10k split 8,000 / 2,000 (split seed 0).
python benchmarks/distill_latent.py [--seeds 0 1 2] [--epochs 8]
"""
from __future__ import annotations

import time

import torch
from distill_common import AccuracyLog, fmt, mean_std, parse_args, print_table, seed_all, write_result

from stpm.distill.data import mnist_split
from stpm.distill.methods import (AlignerObjective, CrossEntropyObjective, LatentAligner, LatentKDObjective,
                                  MultiTeacherKD, RunConfig, run)
from stpm.distill.methods.feature_kd import probe_shapes
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig

TEACHERS = (("mlp1200", "body"), ("cnn4x8", "stage2"))
STUDENT, STUDENT_DIM = "mlp30", 30
T, HARD_WEIGHT, LATENT_DIM, MARGIN, LATENT_WEIGHT = 4.0, 0.5, 32, 0.5, 1.0


def main() -> None:
    args = parse_args(__doc__, default_epochs=8)
    started = time.time()
    data = mnist_split(8000, split_seed=0)
    spec = InputSpec(1, 28, 10)
    dev = torch.device("cpu")
    xtr, ytr, test = data.x_train, data.y_train, (data.x_test, data.y_test)
    log = AccuracyLog(*test, dev)
    res, add = log.values, log.add

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        cfg = RunConfig(TrainConfig(epochs=args.epochs, lr=1e-3), batch_size=128, seed=seed)
        halves = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed)).chunk(2)
        teachers = []
        for (name, _), idx in zip(TEACHERS, halves):
            seed_all(seed)
            t = build_model(name, spec)
            run(CrossEntropyObjective(t), xtr[idx], ytr[idx], cfg, dev, desc=name)
            add(f"teacher {name} (half the images)", t)
            teachers.append(t)
        layers = tuple(layer for _, layer in TEACHERS)
        dims = tuple(int(torch.tensor(s[1:]).prod()) for s in
                     (probe_shapes(t, (layer,), xtr[:2])[0] for t, layer in zip(teachers, layers)))
        seed_all(seed)
        aligner = LatentAligner(dims, LATENT_DIM, hidden=256)
        run(AlignerObjective(aligner, teachers, layers, MARGIN, 1.0), xtr, ytr, cfg, dev, desc="aligner")

        seed_all(seed)
        s = build_model(STUDENT, spec)
        run(CrossEntropyObjective(s), xtr, ytr, cfg, dev, desc="nokd")
        add(f"student {STUDENT} no KD", s)
        seed_all(seed)
        s = build_model(STUDENT, spec)
        run(MultiTeacherKD(s, teachers, T, HARD_WEIGHT), xtr, ytr, cfg, dev, desc="avg")
        add(f"student {STUDENT} multi-teacher averaging", s)
        seed_all(seed)
        s = build_model(STUDENT, spec)
        run(LatentKDObjective(s, "body", STUDENT_DIM, teachers, layers, aligner, LATENT_DIM, T, HARD_WEIGHT,
                              LATENT_WEIGHT), xtr, ytr, cfg, dev, desc="latent")
        add(f"student {STUDENT} averaging + latent alignment (AE + triplet)", s)
        print_table(["model", "test accuracy % (mean ± std)"], [[k, fmt(v)] for k, v in res.items()])
        write_result("latent", args, {
            "completed_seeds": args.seeds[:args.seeds.index(seed) + 1], "data": data.description,
            "teachers": TEACHERS, "student": STUDENT, "temperature": T, "hard_weight": HARD_WEIGHT,
            "latent_dim": LATENT_DIM, "margin": MARGIN, "latent_weight": LATENT_WEIGHT, "accuracy_percent": res,
            "mean_accuracy_percent": {k: mean_std(v)[0] for k, v in res.items()},
            "seed_reference": "seed 004 proposes the method (CIFAR-10), reports no numbers",
        }, started)


if __name__ == "__main__":
    main()
