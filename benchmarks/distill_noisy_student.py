"""Claim 5 (seeds 000/001): Noisy Student. A teacher learns from 1,000 labelled images; a noised student
(dropout + random shifts + Gaussian input noise) of the same size learns the 1,000 labelled images plus the
teacher's soft pseudo-labels on the other 7,000 (labels hidden); the student becomes the teacher; twice.
The teacher gets the same noise while learning its 1,000 labels, so the gain is from pseudo-labels.
A student without noise (plain mlp800, no input noise) is the ablation.
Data: MNIST test10k split 8,000 / 2,000 (split seed 0).
python benchmarks/distill_noisy_student.py [--seeds 0 1 2] [--epochs 10]
"""
from __future__ import annotations

import time

import torch
from distill_common import AccuracyLog, fmt, mean_std, parse_args, print_table, seed_all, write_result

from stpm.distill.data import mnist_split
from stpm.distill.methods import NoisyStudentConfig, RunConfig, SoftLabelObjective, noisy_student, run
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig

N_LABELED, MODEL, PLAIN = 1000, "mlp800d", "mlp800"
NOISE = NoisyStudentConfig(iterations=2, soft=True, temperature=1.0, max_shift=2, noise_std=0.3)


def main() -> None:
    args = parse_args(__doc__, default_epochs=10)
    started = time.time()
    data = mnist_split(8000, split_seed=0)
    spec = InputSpec(1, 28, 10)
    dev = torch.device("cpu")
    test = (data.x_test, data.y_test)
    log = AccuracyLog(*test, dev)
    res, add = log.values, log.add

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(data.y_train), generator=g)
        lab, unlab = perm[:N_LABELED], perm[N_LABELED:]
        x_l, y_l, x_u = data.x_train[lab], data.y_train[lab], data.x_train[unlab]
        one_hot = torch.nn.functional.one_hot(y_l, 10).float()
        # the teacher sees 8x fewer images per epoch: give it 8x the epochs (same number of steps)
        t_cfg = RunConfig(TrainConfig(epochs=args.epochs * 8, lr=1e-3), batch_size=128, seed=seed)
        cfg = RunConfig(TrainConfig(epochs=args.epochs, lr=1e-3), batch_size=128, seed=seed)
        seed_all(seed)
        teacher = build_model(MODEL, spec)
        run(SoftLabelObjective(teacher, NOISE.max_shift, NOISE.noise_std), x_l, one_hot, t_cfg, dev, desc="teacher")
        add(f"teacher {MODEL} ({N_LABELED} labels)", teacher)

        def make() -> torch.nn.Module:
            return build_model(MODEL, spec)

        seed_all(seed)
        for i, (student, _) in enumerate(noisy_student(teacher, make, x_l, y_l, x_u, NOISE, cfg, dev), start=1):
            add(f"noisy student iteration {i}", student)
        seed_all(seed)
        plain = NoisyStudentConfig(iterations=1, soft=True, temperature=1.0, max_shift=0, noise_std=0.0)
        ((student, _),) = noisy_student(teacher, lambda: build_model(PLAIN, spec), x_l, y_l, x_u, plain, cfg, dev)
        add("student without noise, iteration 1 (ablation)", student)
        print_table(["model", "test accuracy % (mean ± std)"], [[k, fmt(v)] for k, v in res.items()])
        write_result("noisy_student", args, {
            "completed_seeds": args.seeds[:args.seeds.index(seed) + 1], "data": data.description,
            "labeled": N_LABELED, "model": MODEL, "noise": NOISE.__dict__, "accuracy_percent": res,
            "mean_accuracy_percent": {k: mean_std(v)[0] for k, v in res.items()},
            "seed_reference": "seeds 000/001: each student beats its teacher (ImageNet; no MNIST numbers)",
        }, started)


if __name__ == "__main__":
    main()
