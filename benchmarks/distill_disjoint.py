"""Claim 4 (seed 003): teachers with disjoint label sets merged into one student without labels.

Teacher A learns digits 0-4 (5 outputs), teacher B digits 5-9 (5 outputs), each from its own labelled
images. One 10-way student learns from all 8,000 training images with no labels, by matching
merged soft targets (losses.merge_disjoint_probs), with the teachers weighted per image by
their max probability ("confidence") or by logsumexp of their logits ("energy", i.e. a softmax over
the concatenated logits). Reported per half of the test set:
each teacher's 5-way accuracy, the student's 10-way accuracy and its accuracy restricted to that half.
Data: MNIST test10k split 8,000 / 2,000 (split seed 0).
python benchmarks/distill_disjoint.py [--seeds 0 1 2] [--epochs 10]
"""
from __future__ import annotations

import time

import torch
from distill_common import fmt, mean_std, parse_args, print_table, seed_all, write_result

from stpm.distill.data import UNLABELED, mnist_split
from stpm.distill.methods import DisjointMergeKD, RunConfig, run, train_classifier
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, predict_logits

MODEL, T = "mlp300", 2.0
WEIGHTINGS = ("confidence", "energy")  # max-probability weights vs softmax over concatenated logits
HALVES = {"A (0-4)": list(range(0, 5)), "B (5-9)": list(range(5, 10))}


def main() -> None:
    args = parse_args(__doc__, default_epochs=10)
    started = time.time()
    data = mnist_split(8000, split_seed=0)
    dev = torch.device("cpu")
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)
        print(f"  {key}: {value:.2f}", flush=True)

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        cfg = RunConfig(TrainConfig(epochs=args.epochs, lr=1e-3), batch_size=128, seed=seed)
        teachers = []
        for name, classes in HALVES.items():
            keep = (data.y_train >= classes[0]) & (data.y_train <= classes[-1])
            seed_all(seed)
            t = build_model(MODEL, InputSpec(1, 28, 5))
            train_classifier(t, data.x_train[keep], data.y_train[keep] - classes[0], cfg, dev)
            teachers.append(t)
        no_labels = torch.full_like(data.y_train, UNLABELED)
        merged = {}
        for weighting in WEIGHTINGS:
            seed_all(seed)
            merged[weighting] = build_model(MODEL, InputSpec(1, 28, 10))
            run(DisjointMergeKD(merged[weighting], teachers, list(HALVES.values()), 10, T, weighting),
                data.x_train, no_labels, cfg, dev, desc="merge")
        seed_all(seed)
        supervised = build_model(MODEL, InputSpec(1, 28, 10))
        train_classifier(supervised, data.x_train, data.y_train, cfg, dev)
        s_logits = {w: predict_logits(m, data.x_test, dev) for w, m in merged.items()}
        sup_logits = predict_logits(supervised, data.x_test, dev)
        for (name, classes), teacher in zip(HALVES.items(), teachers):
            mask = (data.y_test >= classes[0]) & (data.y_test <= classes[-1])
            y = data.y_test[mask]
            t_pred = predict_logits(teacher, data.x_test[mask], dev).argmax(-1) + classes[0]
            add(f"half {name}: teacher {name[0]} (5-way)", 100.0 * float((t_pred == y).float().mean()))
            for w, logits in s_logits.items():
                add(f"half {name}: merged student [{w}] (10-way)",
                    100.0 * float((logits[mask].argmax(-1) == y).float().mean()))
                within = logits[mask][:, classes].argmax(-1) + classes[0]
                add(f"half {name}: merged student [{w}] within half", 100.0 * float((within == y).float().mean()))
            add(f"half {name}: supervised student (10-way, all labels)",
                100.0 * float((sup_logits[mask].argmax(-1) == y).float().mean()))
        for w, logits in s_logits.items():
            add(f"all 10 digits: merged student [{w}]", 100.0 * float((logits.argmax(-1) == data.y_test).float().mean()))
        add("all 10 digits: supervised student", 100.0 * float((sup_logits.argmax(-1) == data.y_test).float().mean()))
        print_table(["test subset / model", "accuracy % (mean ± std)"], [[k, fmt(v)] for k, v in res.items()])
        write_result("disjoint", args, {
            "completed_seeds": args.seeds[:args.seeds.index(seed) + 1], "data": data.description,
            "model": MODEL, "temperature": T, "accuracy_percent": res,
            "mean_accuracy_percent": {k: mean_std(v)[0] for k, v in res.items()},
            "seed_reference": "seed 003 describes the use case (cats/dogs + apples/bananas -> one model), no numbers",
        }, started)


if __name__ == "__main__":
    main()
