"""Seed 002 (Hinton et al. 2015) on the full MNIST: soft targets vs hard labels, and the temperature sweep.

Data: 55,000 training / 5,000 validation digits (drawn from the official 60,000 with split seed 0) / the
official 10,000 test digits. Every choice (the teacher's recipe, T, lambda) is made on validation errors.

Teacher (the paper's recipe, as far as two cores go): 2 x 1200 ReLU, dropout 0.2 on the input and 0.5 on
the hidden units, max-norm 3.5 on every unit's incoming weights, +-2 px random translations of the
training digits, a long schedule: Adam, lr 1e-3 decayed to 0 by a cosine over 200 epochs, batch 128 (Adam
was chosen over SGD with Nesterov momentum 0.9 at lr 0.1, which diverged in its first epochs, on the
validation errors of a 25-epoch pilot of each). One teacher (seed 0), shared by all seeds, saved under
benchmarks/work/ and reused by a rerun; the seeds vary the students. Its logits on the untranslated
training digits are computed once.
Students, trained without any regularisation on the untranslated digits with Adam (lr 1e-3, cosine to 0,
batch 128), long enough to reach zero training errors (the run records training errors and per-epoch
validation errors):
- 2 x 800: hard labels vs soft targets (lambda = 0.1 on the hard-label term, Hinton's "considerably lower
  weight"); the temperature is chosen among 4, 8, 20 on the validation errors of seed 0, then seeds 1 and 2
  train at that temperature.
- `--jittered` (a check of why the soft targets help less than in the seed): 2 x 800 hard labels and soft
  targets at the chosen T and lambda, both on the teacher's +-2 px translated digits (a new translation per
  batch, the teacher's soft targets computed on the same translated digits), every seed: is the gap to the
  seed's 74 errors the transfer set? Both arms get the same digits, so their ratio stays a like-for-like
  comparison.
- `--big-lambdas 0.5,...` (another check): 2 x 800 soft-target students at the chosen T with these lambdas
  instead of HARD_WEIGHT, every seed (the cached teacher logits; no translations), beside the main arms.
- sweep: 2 x 300 and 2 x 30, hard labels and soft targets for T in {1, 2.5, 4, 8, 20} x lambda in
  {0.1, 0.5}; for each T the lambda with fewer mean validation errors, and the best T by mean validation
  errors over the seeds.
Precision: bfloat16 autocast for the 2 x 1200 and 2 x 800 nets where the CPU computes bf16 natively (AMX:
about 2x faster there), float32 for the small ones (bf16 is not faster there) and for every evaluation.

Plan: `python benchmarks/distill_epoch_times.py` measures one epoch of every model above (CPU and wall
seconds, load average) and prices this default schedule from it in docs/DISTILLATION.md: the teacher's 200
epochs, 2 x 800 students of 30 epochs (3 selection runs on seed 0, then hard and soft for seeds 1-2, hard for
seed 0) and the sweep's students of 20 epochs ((1 + 5 x 2) per width and seed).

python benchmarks/distill_hinton.py [--seeds 0 1 2] [--teacher-epochs 200] [--epochs 30] [--sweep-epochs 20]
       [--precision auto|fp32|bf16] [--widths 800,300,30] [--jittered] [--big-lambdas 0.5]
A rerun resumes: models whose numbers are in the result file (same settings) are not trained again, and the
teacher continues after its last epoch (its state is saved under benchmarks/work/ after every epoch).
`--widths 800,30` and `--widths 300` split the students over two processes (one result file, merged).
"""
from __future__ import annotations

import torch
from distill_common import WORK, Results, errors, parse_args, precision_arg, seed_all
from distill_report_hinton import JITTERED, soft_key

from stpm.distill.data import Split, mnist_split
from stpm.distill.methods import (
    CachedKDObjective,
    CrossEntropyObjective,
    KDObjective,
    RunConfig,
    pack_labels_and_logits,
    run,
)
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, predict_logits, read_checkpoint, save_checkpoint

TEMPERATURES = (1.0, 2.5, 4.0, 8.0, 20.0)
BIG_TS = (4.0, 8.0, 20.0)  # candidates for the 2 x 800 student, chosen on validation (seed SELECT_SEED)
HARD_WEIGHT = 0.1  # lambda of the 2 x 800 student
HARD_WEIGHTS = (0.1, 0.5)  # lambda candidates of the sweep
SELECT_SEED, N_VAL = 0, 5000
TEACHER = {"model": "mlp1200d", "optimizer": "adam", "lr": 1e-3, "max_norm": 3.5, "augment": "shift2",
           "lr_schedule": "cosine", "batch_size": 128, "seed": 0}
STUDENT = {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "batch_size": 128, "regularisation": "none"}
SPEC, CPU = InputSpec(1, 28, 10), torch.device("cpu")


def student_config(epochs: int, seed: int, bf16: bool, augment: str = "none") -> RunConfig:
    return RunConfig(TrainConfig(epochs=epochs, lr=STUDENT["lr"], lr_schedule="cosine", cpu_bf16=bf16,
                                 augment=augment), batch_size=STUDENT["batch_size"], seed=seed, tensor_batches=True)


def record(res: Results, key: str, seed: int, model: torch.nn.Module, data: Split, curve: list[int],
           train_targets: torch.Tensor | None = None) -> None:
    """Validation and test errors (and training errors, on the untranslated digits, of the teacher and the
    2 x 800 students), the validation curve."""
    res.note("curves", f"{key} | seed {seed} | val errors per epoch", curve)
    if train_targets is not None:
        res.add(f"{key} | train errors", seed, errors(model, data.x_train, train_targets))
    res.add(f"{key} | val errors", seed, errors(model, data.x_val, data.y_val))
    res.add(f"{key} | test errors", seed, errors(model, data.x_test, data.y_test))


def teacher_model(args, res: Results, data: Split, bf16: bool) -> torch.nn.Module:
    """The one teacher: loaded from benchmarks/work/ when trained on this split with these settings."""
    teacher = build_model(TEACHER["model"], SPEC)
    path = WORK / f"hinton_teacher_{TEACHER['model']}_adam_maxnorm_e{args.teacher_epochs}_seed0.pt"
    if path.is_file():
        state, meta = read_checkpoint(path)
        if meta.get("split") == data.fingerprint() and meta.get("recipe") == res.data["config"]["teacher"]:
            teacher.load_state_dict(state)
            if not res.has("teacher 2x1200 | test errors", 0):
                record(res, "teacher 2x1200", 0, teacher, data, meta.get("curve", []), data.y_train)
            elif not res.has("teacher 2x1200 | train errors", 0):  # recorded before training errors were
                res.add("teacher 2x1200 | train errors", 0, errors(teacher, data.x_train, data.y_train))
            return teacher
    seed_all(TEACHER["seed"])
    teacher = build_model(TEACHER["model"], SPEC)
    cfg = TrainConfig(epochs=args.teacher_epochs, optimizer="adam", lr=TEACHER["lr"], max_norm=TEACHER["max_norm"],
                      augment=TEACHER["augment"], lr_schedule="cosine", cpu_bf16=bf16)
    hist = run(CrossEntropyObjective(teacher), data.x_train, data.y_train,
               RunConfig(cfg, TEACHER["batch_size"], TEACHER["seed"], tensor_batches=True), CPU,
               eval_data=(data.x_val, data.y_val), desc="teacher", resume_path=path.with_suffix(".resume.pt"))
    save_checkpoint(teacher, path, {"model": TEACHER["model"], "split": data.fingerprint(), "classes": None,
                                    "recipe": res.data["config"]["teacher"], "curve": hist.test_errors})
    record(res, "teacher 2x1200", 0, teacher, data, hist.test_errors, data.y_train)
    return teacher


def train_student(res: Results, data: Split, key: str, seed: int, width: int, epochs: int, bf16: bool,
                  targets: torch.Tensor | torch.nn.Module | None = None, t: float = 0.0, lam: float = 0.0,
                  augment: str = "none") -> None:
    """One student: hard labels (targets None), soft targets at T = t, lambda = lam from cached teacher logits
    (targets a tensor), or from the teacher itself on each (augmented) batch (targets the teacher: --jittered);
    skipped when its numbers are recorded already."""
    if res.has(f"{key} | test errors", seed):
        return
    seed_all(seed)
    model = build_model(f"mlp{width}", SPEC)
    if targets is None:
        objective = CrossEntropyObjective(model)
    elif isinstance(targets, torch.nn.Module):
        objective = KDObjective(model, targets, t, lam)
    else:
        objective = CachedKDObjective(model, t, lam)
    labels = targets if isinstance(targets, torch.Tensor) else data.y_train
    hist = run(objective, data.x_train, labels, student_config(epochs, seed, bf16, augment), CPU,
               eval_data=(data.x_val, data.y_val), desc=key)
    record(res, key, seed, model, data, hist.test_errors, data.y_train if width == 800 else None)


def chosen_big_t(res: Results) -> float:
    """The 2 x 800 temperature with the fewest validation errors of seed SELECT_SEED (ties: the larger T)."""
    val = {t: res.get(f"{soft_key(800, t, HARD_WEIGHT)} | val errors", SELECT_SEED) for t in BIG_TS}
    return min(sorted(val, reverse=True), key=val.get)


def main() -> None:
    args = parse_args(__doc__, {"--teacher-epochs": (int, 200, "teacher epochs (one teacher, seed 0)"),
                                "--epochs": (int, 30, "2 x 800 student epochs"),
                                "--sweep-epochs": (int, 20, "2 x 300 / 2 x 30 student epochs"),
                                "--precision": (str, "auto", "auto | fp32 | bf16 (2x1200 and 2x800 nets)"),
                                "--widths": (str, "800,300,30", "students to train (parallel processes may share "
                                                                "the widths: --widths 800,30 and --widths 300)"),
                                "--jittered": (bool, False, "also 2 x 800 hard and soft students on translated "
                                                            "digits (needs the 2 x 800 temperature chosen)"),
                                "--big-lambdas": (str, "", "also 2 x 800 soft students at the chosen T with these "
                                                           "lambdas, comma-separated (e.g. 0.5)")})
    widths = [int(w) for w in args.widths.split(",")]
    if not set(widths) <= {800, 300, 30}:
        raise SystemExit(f"--widths must be a subset of 800,300,30, got {args.widths}")
    bf16 = precision_arg(args.precision) == "bf16"
    config = {"teacher": TEACHER | {"epochs": args.teacher_epochs}, "student": STUDENT,
              "big_student": "mlp800", "hard_weight": HARD_WEIGHT, "big_ts": BIG_TS, "select_seed": SELECT_SEED,
              "temperatures": TEMPERATURES, "hard_weights": HARD_WEIGHTS, "epochs": args.epochs,
              "sweep_epochs": args.sweep_epochs, "n_val": N_VAL, "split_seed": 0,
              "bf16_autocast": "2x1200 and 2x800 nets" if bf16 else "none"}
    res = Results("hinton", args, config)
    data = mnist_split(n_val=N_VAL, split_seed=0)
    res.data["data"] = data.description
    teacher = teacher_model(args, res, data, bf16)
    targets = pack_labels_and_logits(data.y_train, predict_logits(teacher, data.x_train, CPU))
    res.render()

    if 800 in widths:
        for t in BIG_TS:  # choose T for the 2 x 800 student on seed SELECT_SEED's validation errors
            train_student(res, data, soft_key(800, t, HARD_WEIGHT), SELECT_SEED, 800, args.epochs, bf16, targets,
                          t, HARD_WEIGHT)
        big_t = chosen_big_t(res)
        for seed in args.seeds:
            train_student(res, data, "2x800 hard labels", seed, 800, args.epochs, bf16)
            train_student(res, data, soft_key(800, big_t, HARD_WEIGHT), seed, 800, args.epochs, bf16, targets,
                          big_t, HARD_WEIGHT)
        res.render()
    lambdas = [float(x) for x in args.big_lambdas.split(",") if x.strip()]
    if lambdas or args.jittered:  # the checks beside the main arms, at its temperature
        big_t = chosen_big_t(res)  # a KeyError here: run the 2 x 800 selection (--widths 800) first
        for lam in lambdas:
            for seed in args.seeds:
                train_student(res, data, soft_key(800, big_t, lam), seed, 800, args.epochs, bf16, targets, big_t, lam)
        if args.jittered:
            shift = TEACHER["augment"]
            for seed in args.seeds:
                train_student(res, data, "2x800 hard labels" + JITTERED, seed, 800, args.epochs, bf16, augment=shift)
                train_student(res, data, soft_key(800, big_t, HARD_WEIGHT) + JITTERED, seed, 800, args.epochs, bf16,
                              teacher, big_t, HARD_WEIGHT, shift)
        res.render()

    for seed in args.seeds:
        for width in [w for w in (300, 30) if w in widths]:
            train_student(res, data, f"2x{width} hard labels", seed, width, args.sweep_epochs, False)
            for t in TEMPERATURES:
                for lam in HARD_WEIGHTS:
                    train_student(res, data, soft_key(width, t, lam), seed, width, args.sweep_epochs, False,
                                  targets, t, lam)
        res.render()
    res.finish()


if __name__ == "__main__":
    main()
