"""Claim 1 (seed 002, Hinton et al.): soft targets beat hard labels for a small MLP on MNIST; the best
temperature is high (>= 8) for a 300-unit student and low (2.5-4) for a 30-unit student.

Data: the 10,000 MNIST test digits split 8,000 train / 2,000 test (split seed 0).
python benchmarks/distill_hinton.py [--seeds 0 1 2] [--epochs 15] [--no-sweep: only the 800-unit hard/soft pair]
"""
from __future__ import annotations

import time

import torch
from distill_common import fmt, mean_std, parse_args, print_table, seed_all, write_result

from stpm.distill.data import mnist_split
from stpm.distill.methods import (CachedKDObjective, RunConfig, pack_labels_and_logits, run, train_classifier)
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, count_errors, predict_logits

TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0)
HARD_WEIGHT = 0.1  # lambda: "a considerably lower weight" on the hard-label term
BIG_T = 20.0  # Hinton's temperature for the 800-unit student


def main() -> None:
    args = parse_args(__doc__, default_epochs=15, flags=("--no-sweep",))
    started = time.time()
    data = mnist_split(8000, split_seed=0)
    spec = InputSpec(1, 28, 10)
    dev = torch.device("cpu")
    test = (data.x_test, data.y_test)
    n_test = len(data.y_test)
    res: dict[str, list[float]] = {}

    def add(key: str, errors: int) -> None:
        res.setdefault(key, []).append(100.0 * errors / n_test)
        print(f"  {key}: {errors} errors / {n_test}", flush=True)

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        cfg = RunConfig(TrainConfig(epochs=args.epochs, lr=1e-3), batch_size=128, seed=seed)
        seed_all(seed)
        teacher = build_model("mlp1200d", spec)
        train_classifier(teacher, data.x_train, data.y_train,
                         RunConfig(TrainConfig(epochs=2 * args.epochs, lr=1e-3), 128, seed), dev)
        add("teacher mlp1200d", count_errors(teacher, *test, dev))
        targets = pack_labels_and_logits(data.y_train, predict_logits(teacher, data.x_train, dev))
        for width in ((800,) if args.no_sweep else (800, 300, 30)):
            seed_all(seed)
            hard = build_model(f"mlp{width}", spec)
            train_classifier(hard, data.x_train, data.y_train, cfg, dev)
            add(f"mlp{width} hard", count_errors(hard, *test, dev))
            temps = (BIG_T,) if width == 800 else TEMPERATURES
            for t in temps:
                seed_all(seed)
                student = build_model(f"mlp{width}", spec)
                run(CachedKDObjective(student, t, HARD_WEIGHT), data.x_train, targets, cfg, dev, desc="kd")
                add(f"mlp{width} soft T={t:g}", count_errors(student, *test, dev))
        rows = [[k, fmt(v), f"{mean_std(v)[0] * n_test / 100:.1f}"] for k, v in res.items()]
        print_table(["model", "test error % (mean ± std)", "errors / 2000"], rows)
        best = {}
        for width in (() if args.no_sweep else (300, 30)):
            means = {t: mean_std(res[f"mlp{width} soft T={t:g}"])[0] for t in TEMPERATURES}
            best[f"mlp{width}"] = min(means, key=means.get)
            print(f"best T for mlp{width}: {best[f'mlp{width}']:g}")
        write_result("hinton", args, {
            "completed_seeds": args.seeds[:args.seeds.index(seed) + 1],
            "data": data.description, "hard_weight": HARD_WEIGHT, "temperatures": TEMPERATURES,
            "test_error_percent": res, "best_temperature": best,
            "seed_reference": {"teacher 1200 (errors/10k)": 67, "800 hard": 146, "800 soft": 74,
                               "best T 300 units": ">= 8", "best T 30 units": "2.5-4"},
        }, started)



if __name__ == "__main__":
    main()
