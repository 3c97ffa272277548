"""One epoch of every model of the Hinton reproduction (distill_hinton.py), measured, and the plan sized from it.

Each model trains `--epochs` single epochs on the 55,000 training digits exactly as distill_hinton.py trains
it (same recipe, precision, batch, tensor batches, per-epoch validation); the result file keeps the CPU and
the wall seconds of every epoch and the load average, and the block multiplies the median CPU seconds per
epoch by distill_hinton.py's default schedule. CPU seconds are what a quiet core would spend; wall seconds
show what the load of the moment cost. Soft-target students are timed too (cached teacher logits: the
teacher here is untrained, which changes the numbers, not the cost).

python benchmarks/distill_epoch_times.py [--epochs 2] [--precision auto|fp32|bf16]
"""
from __future__ import annotations

import os
import statistics
import time

import distill_hinton as H
import torch
from distill_common import Results, parse_args, precision_arg, seed_all

from stpm.distill.data import mnist_split
from stpm.distill.methods import (
    CachedKDObjective,
    CrossEntropyObjective,
    RunConfig,
    pack_labels_and_logits,
    run,
)
from stpm.distill.models import build_model
from stpm.distill.trainer import TrainConfig, predict_logits

# model label -> (zoo model, bf16 where the CPU has it, KD student, teacher recipe)
MODELS = {"teacher 2x1200 (dropout, max-norm, jitter)": ("mlp1200d", True, False, True),
          "student 2x800 hard labels": ("mlp800", True, False, False),
          "student 2x800 soft targets": ("mlp800", True, True, False),
          "student 2x300 soft targets": ("mlp300", False, True, False),
          "student 2x30 soft targets": ("mlp30", False, True, False)}


def schedule(teacher_epochs: int = 200, epochs: int = 30, sweep_epochs: int = 20) -> dict[str, int]:
    """Epochs per model label in distill_hinton.py's default run (3 seeds, its students and sweep)."""
    sweep = (1 + len(H.TEMPERATURES) * len(H.HARD_WEIGHTS)) * 3 * sweep_epochs  # hard + T x lambda, 3 seeds
    return {"teacher 2x1200 (dropout, max-norm, jitter)": teacher_epochs,
            "student 2x800 hard labels": 3 * epochs,  # seeds 0-2
            "student 2x800 soft targets": (len(H.BIG_TS) + 2) * epochs,  # T chosen on seed 0, then seeds 1-2
            "student 2x300 soft targets": sweep, "student 2x30 soft targets": sweep}


def time_epochs(label: str, data, targets: torch.Tensor, n: int, bf16_cpu: bool) -> list[tuple[float, float]]:
    """(CPU s, wall s) of n single epochs of one model, trained as distill_hinton.py trains it."""
    name, uses_bf16, kd, is_teacher = MODELS[label]
    seed_all(0)
    model = build_model(name, H.SPEC)
    objective = CachedKDObjective(model, 4.0, H.HARD_WEIGHT) if kd else CrossEntropyObjective(model)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, lr_schedule="cosine", cpu_bf16=uses_bf16 and bf16_cpu,
                      **({"max_norm": H.TEACHER["max_norm"], "augment": H.TEACHER["augment"]} if is_teacher else {}))
    out = []
    for epoch in range(n):
        cpu0, wall0 = time.process_time(), time.time()
        run(objective, data.x_train, targets if kd else data.y_train, RunConfig(cfg, 128, epoch, tensor_batches=True),
            H.CPU, eval_data=(data.x_val, data.y_val), desc=label)
        out.append((time.process_time() - cpu0, time.time() - wall0))
    return out


def main() -> None:
    args = parse_args(__doc__, {"--epochs": (int, 2, "single epochs timed per model"),
                                "--precision": (str, "auto", "auto | fp32 | bf16 (2x1200 and 2x800 nets)")})
    bf16 = precision_arg(args.precision) == "bf16"
    res = Results("epoch_times", args, {"epochs_timed": args.epochs, "bf16_autocast": bf16,
                                        "schedule": schedule(), "threads": args.threads})
    data = mnist_split(n_val=H.N_VAL, split_seed=0)
    res.data["data"] = data.description
    logits = predict_logits(build_model("mlp1200d", H.SPEC), data.x_train, H.CPU)
    targets = pack_labels_and_logits(data.y_train, logits)
    for label in MODELS:
        if res.has(f"{label} | CPU s per epoch", 0):
            continue
        times = time_epochs(label, data, targets, args.epochs, bf16)
        res.note("epochs", label, {"cpu_s": [round(c, 2) for c, _ in times], "wall_s": [round(w, 2) for _, w in times],
                                   "load": round(os.getloadavg()[0], 2)})
        res.add(f"{label} | wall s per epoch", 0, statistics.median(w for _, w in times), " s")
        res.add(f"{label} | CPU s per epoch", 0, statistics.median(c for c, _ in times), " s")
    res.finish()


if __name__ == "__main__":
    main()
