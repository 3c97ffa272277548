"""Seed 002 (Hinton et al. 2015) on the full MNIST: soft targets vs hard labels, and the temperature sweep.

Teacher: 2 x 1200 ReLU with dropout (0.2 input, 0.5 hidden) and +-2 px random translations of the training
digits, trained once (teacher seed 0, 30 epochs; saved under benchmarks/work/ and reused) and shared by all
seeds: a regularised teacher needs many epochs, and one long teacher costs what three short ones would. The
seeds vary the students. Students: 2 x 800 ReLU without any regularisation, trained on the untranslated training digits
either on hard labels or on the teacher's soft targets at T = 20 (lambda = 0.1 on the hard-label term),
teacher logits computed once. Sweep: 2 x 300 and 2 x 30 students, hard labels and soft targets at
T in {1, 2.5, 4, 8, 20}; the best temperature is picked on the 5,000 validation digits, never on the test set.
Data: 55,000 training / 5,000 validation (drawn from the official 60,000 with split seed 0) / the official
10,000 test digits. Adam lr 1e-3, batch 128.

python benchmarks/distill_hinton.py [--seeds 0 1 2] [--teacher-epochs 30] [--epochs 8] [--sweep-epochs 6]
"""
from __future__ import annotations

import torch
from distill_common import WORK, Results, errors, parse_args, seed_all, update_doc

from stpm.distill.data import mnist_split
from stpm.distill.methods import CachedKDObjective, CrossEntropyObjective, RunConfig, pack_labels_and_logits, run
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, predict_logits, read_checkpoint, save_checkpoint

TEMPERATURES = (1.0, 2.5, 4.0, 8.0, 20.0)
HARD_WEIGHT = 0.1  # lambda: "a considerably lower weight" on the hard-label term
BIG_T = 20.0  # Hinton's temperature for the 800-unit student
N_VAL = 5000


def main() -> None:
    args = parse_args(__doc__, {"--teacher-epochs": (int, 30, "teacher epochs (one teacher, seed 0)"),
                                "--epochs": (int, 8, "800-unit student epochs"),
                                "--sweep-epochs": (int, 6, "300/30-unit student epochs")})
    config = {"teacher": "mlp1200d + shift2, seed 0, shared by all seeds", "student": "mlp800", "hard_weight": HARD_WEIGHT, "big_t": BIG_T,
              "temperatures": TEMPERATURES, "teacher_epochs": args.teacher_epochs, "epochs": args.epochs,
              "sweep_epochs": args.sweep_epochs, "n_val": N_VAL, "split_seed": 0, "lr": 1e-3,
              "lr_schedule": "cosine", "batch_size": 128}
    res = Results("hinton", args, config)
    data = mnist_split(n_val=N_VAL, split_seed=0)
    res.data["data"] = data.description
    spec = InputSpec(1, 28, 10)
    dev = torch.device("cpu")

    def record(key: str, seed: int, model: torch.nn.Module) -> None:
        res.add(f"{key} | val errors", seed, errors(model, data.x_val, data.y_val))
        res.add(f"{key} | test errors", seed, errors(model, data.x_test, data.y_test))

    cfg = lambda epochs, seed, augment="none": RunConfig(  # noqa: E731
        TrainConfig(epochs=epochs, lr=1e-3, lr_schedule="cosine", augment=augment), batch_size=128, seed=seed)
    teacher = build_model("mlp1200d", spec)
    teacher_path = WORK / f"hinton_teacher_mlp1200d_e{args.teacher_epochs}_seed0.pt"
    if teacher_path.is_file() and read_checkpoint(teacher_path)[1].get("split") == data.fingerprint():
        teacher.load_state_dict(read_checkpoint(teacher_path)[0])
    else:
        seed_all(0)
        teacher = build_model("mlp1200d", spec)
        run(CrossEntropyObjective(teacher), data.x_train, data.y_train, cfg(args.teacher_epochs, 0, "shift2"), dev,
            desc="teacher")
        save_checkpoint(teacher, teacher_path, {"model": "mlp1200d", "split": data.fingerprint(), "classes": None})
    record("teacher 2x1200 dropout+jitter", 0, teacher)  # one teacher, recorded once
    targets = pack_labels_and_logits(data.y_train, predict_logits(teacher, data.x_train, dev))

    for seed in args.seeds:
        for width, epochs, temps in ((800, args.epochs, (BIG_T,)), (300, args.sweep_epochs, TEMPERATURES),
                                     (30, args.sweep_epochs, TEMPERATURES)):
            seed_all(seed)
            hard = build_model(f"mlp{width}", spec)
            run(CrossEntropyObjective(hard), data.x_train, data.y_train, cfg(epochs, seed), dev, desc="hard")
            record(f"2x{width} hard labels", seed, hard)
            for t in temps:
                seed_all(seed)
                student = build_model(f"mlp{width}", spec)
                run(CachedKDObjective(student, t, HARD_WEIGHT), data.x_train, targets, cfg(epochs, seed), dev,
                    desc="soft")
                record(f"2x{width} soft T={t:g}", seed, student)
        update_doc("hinton")


if __name__ == "__main__":
    main()
