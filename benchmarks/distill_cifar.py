"""Seed 002 on CIFAR-10 at the largest honest CPU scale: TAKD (teacher 10 convs, assistants 8/6/4, student 2)
and the early-stopped teacher (ESKD), with the TAKD paper's plain CNNs at their full published widths.

Data: the full CIFAR-10 training set (JPEG q75 copy) less 5,000 validation images (45,000 / 5,000, split
seed 0), the official 10,000 test images; decoded once into benchmarks/work/cifar10_uint8.npz.
Pipeline (distill_takd.py): teacher takd10 with crop-flip, its snapshot after a third of its epochs as the
early-stopped teacher; assistants takd8 / takd6 / takd4 by Hinton KD from the teacher; per seed the student
takd2 with no KD (NOKD), KD from the teacher (BLKD), from each assistant (TAKD) and from the early-stopped
teacher (ESKD), plus NOKD at half the epochs (its accuracy beside NOKD's shows whether NOKD has settled).
Students and assistants see no augmentation (the paper's plain-CNN code has none), so every KD source's
logits are computed once. KD: T = 4, lambda = 0.5 on the hard-label term (the earlier run's choice on
validation; not re-tuned). SGD with Nesterov momentum 0.9, weight decay 5e-4, lr 0.05 with a cosine decay to
0, batch 128 (the paper: SGD momentum 0.9, lr 0.01 constant for 200 epochs, weight decay 1e-4); the
assistants and students warm the lr up linearly over their first epoch (Scale.warmup_epochs: without it the
full-width takd4 assistant died in its first epoch, a constant classifier at 10 %), the teacher does not.
Teacher and assistants are trained once (seed 0) and shared by the three seeds (CPU time); the seeds vary
the students. bfloat16 autocast and channels-last where the CPU computes bf16 natively (AMX), float32
evaluation.

Plan, from one measured epoch of the 45,000 images on this machine (2-core Xeon with AMX, 1 torch thread,
bf16 + channels-last, CPU seconds; the load average was 7-9 from other jobs, so wall time was ~5x longer):
takd2 13 s, takd4 28 s, takd6 41 s, takd8 47 s, takd10 with crop-flip 145 s per epoch; float32 evaluation
of the teacher's logits on the training images ~2.5 min per pass.
- teacher: 12 epochs, ~36 min with its evaluations; assistants: 10 epochs each, ~20 min;
- students: 6 per seed at 12 epochs + NOKD at 6, ~17 min per seed, ~51 min for three seeds.
Expected total about 1 h 50 min of one core of a quiet machine.
Still shortened against the paper: epochs (12 / 10 / 12 against 200), one teacher and one set of assistants
for all seeds, T and lambda not searched.

python benchmarks/distill_cifar.py [--seeds 0 1 2] [--teacher-epochs 12] [--assistant-epochs 10] [--epochs 12]
       [--precision auto|fp32|bf16]
A rerun resumes: recorded students are skipped, teacher and assistants are reloaded from benchmarks/work/.
"""
from __future__ import annotations

import torch
from distill_common import CIFAR_CACHE, Results, parse_args, precision_arg
from distill_takd import Pipeline, Scale

from stpm.distill.data import cifar10_split

N_VAL = 5000


def main() -> None:
    args = parse_args(__doc__, {"--teacher-epochs": (int, 12, "teacher epochs"),
                                "--assistant-epochs": (int, 10, "assistant epochs"),
                                "--epochs": (int, 12, "student epochs"),
                                "--precision": (str, "auto", "auto | fp32 | bf16 (CPU autocast)")})
    scale = Scale(teacher_epochs=args.teacher_epochs, assistant_epochs=args.assistant_epochs,
                  student_epochs=args.epochs, precision=precision_arg(args.precision), shared_teachers=True)
    res = Results("cifar", args, scale.config() | {"n_val": N_VAL, "split_seed": 0})
    data = cifar10_split(None, N_VAL, 0, cache=CIFAR_CACHE)
    res.data["data"] = data.description
    pipeline = Pipeline(res, data, scale, torch.device("cpu"), tag="cifar_cpu")
    for seed in args.seeds:
        pipeline.seed_run(seed)
    res.finish()


if __name__ == "__main__":
    main()
