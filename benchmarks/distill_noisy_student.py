"""Seeds 000/001: Noisy Student self-training on CIFAR-10, two iterations.

A teacher learns N_LABELED labelled training images; the rest of the training subset loses its labels.
Each iteration the current teacher (eval mode, no noise) gives soft pseudo-labels (T = 1) on the unlabelled
images, and a noised student of the same size learns the labelled images (one-hot) and the pseudo-labelled
ones together; the student becomes the next teacher. Noise: per-image random translations of up to 4 px and
horizontal flips (the CIFAR "crop-flip") plus Gaussian input noise. The first teacher is trained with the same
crop-flip augmentation on its labelled images (for 5x the epochs of a student: about as many steps), so any
gain comes from the pseudo-labelled images, not from augmentation the teacher lacked. Ablation: the same
student without noise (no augmentation) in iteration 1.
Data: CIFAR-10 training subset (split seed 0), the official 10,000 test images.

python benchmarks/distill_noisy_student.py [--seeds 0 1 2]
"""
from __future__ import annotations

import torch
from distill_common import CIFAR_CACHE, Results, accuracy, parse_args, seed_all, update_doc

from stpm.distill.data import cifar10_split
from stpm.distill.methods import CrossEntropyObjective, NoisyStudentConfig, RunConfig, noisy_student, run
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig

MODEL, N_TRAIN, N_LABELED = "takd6x50", 12000, 2000
EPOCHS, TEACHER_EPOCHS = 8, 40
NOISE = NoisyStudentConfig(iterations=2, soft=True, temperature=1.0, max_shift=0, noise_std=0.1)


def main() -> None:
    args = parse_args(__doc__, {})
    config = {"model": MODEL, "n_train": N_TRAIN, "n_labeled": N_LABELED, "epochs": EPOCHS,
              "teacher_epochs": TEACHER_EPOCHS, "noise": NOISE.__dict__ | {"augment": "crop-flip"}, "lr": 1e-3,
              "lr_schedule": "cosine",
              "batch_size": 128}
    res = Results("noisy_student", args, config)
    data = cifar10_split(N_TRAIN, 0, 0, cache=CIFAR_CACHE)
    res.data["data"] = data.description
    spec = InputSpec(3, 32, 10)
    dev = torch.device("cpu")
    for seed in args.seeds:
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed))
        lab, unlab = perm[:N_LABELED], perm[N_LABELED:]
        x_l, y_l, x_u = data.x_train[lab], data.y_train[lab], data.x_train[unlab]
        noisy = RunConfig(TrainConfig(epochs=EPOCHS, lr=1e-3, lr_schedule="cosine", augment="crop-flip"), 128,
                          seed)
        seed_all(seed)
        teacher = build_model(MODEL, spec)
        run(CrossEntropyObjective(teacher), x_l, y_l,
            RunConfig(TrainConfig(epochs=TEACHER_EPOCHS, lr=1e-3, lr_schedule="cosine", augment="crop-flip"), 128,
                      seed), dev,
            desc="teacher")
        res.add("teacher | test acc", seed, accuracy(teacher, data.x_test, data.y_test), " %")
        seed_all(seed)
        for i, (student, _) in enumerate(noisy_student(teacher, lambda: build_model(MODEL, spec), x_l, y_l, x_u,
                                                       NOISE, noisy, dev), start=1):
            res.add(f"noisy student iteration {i} | test acc", seed, accuracy(student, data.x_test, data.y_test),
                    " %")
        seed_all(seed)
        plain = NoisyStudentConfig(iterations=1, soft=True, temperature=1.0, max_shift=0, noise_std=0.0)
        ((student, _),) = noisy_student(teacher, lambda: build_model(MODEL, spec), x_l, y_l, x_u, plain,
                                        RunConfig(TrainConfig(epochs=EPOCHS, lr=1e-3, lr_schedule="cosine"), 128,
                                                  seed), dev)
        res.add("student without noise, iteration 1 (ablation) | test acc", seed,
                accuracy(student, data.x_test, data.y_test), " %")
        update_doc("noisy_student")
    res.finish()


if __name__ == "__main__":
    main()
