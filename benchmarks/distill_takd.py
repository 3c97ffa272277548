"""TAKD and ESKD on CIFAR-10 (seed 002), shared by distill_cifar.py (CPU) and distill_gpu.py (GPU).

One pipeline at any scale: a teacher learns with hard labels and crop-flip (a snapshot after a third of its
epochs is the early-stopped teacher), three assistants learn from the teacher by Hinton KD, and per seed the
2-conv student learns with no KD (NOKD), KD from the teacher (BLKD), KD from each assistant (TAKD) and KD from
the early-stopped teacher (ESKD). Assistants and students see the training images without augmentation, so
each KD source's logits are computed once. Teacher and assistants are trained once (seed 0) and shared by the
seeds when `Scale.shared_teachers`, else once per seed. Trained teachers and assistants and their logits are
kept under benchmarks/work/ so that a resumed run does not train them again; while one trains, its state is
saved there after every epoch, so a killed run resumes a teacher or assistant after its last epoch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from distill_common import WORK, Results, accuracy, seed_all

from stpm.distill.data import Split
from stpm.distill.methods import CachedKDObjective, CrossEntropyObjective, RunConfig, pack_labels_and_logits, run
from stpm.distill.models import InputSpec, build_model
from stpm.distill.trainer import TrainConfig, predict_logits, read_checkpoint, save_checkpoint

SPEC = InputSpec(3, 32, 10)
ASSISTANT_DEPTHS = (8, 6, 4)
TEACHER_SETTINGS = ("width", "teacher_epochs", "early_teacher_epoch", "optimizer", "lr", "momentum", "weight_decay",
                    "batch_size", "precision", "teacher_augment", "lr_schedule")
ASSISTANT_SETTINGS = (*TEACHER_SETTINGS, "assistant_epochs", "temperature", "hard_weight", "student_augment",
                      "warmup_epochs")


def settings_of(config: dict, what: str) -> dict:
    """The settings a saved teacher or assistant depends on (student settings may change without retraining)."""
    keys = TEACHER_SETTINGS if what.startswith("teacher") else ASSISTANT_SETTINGS
    return {k: config.get(k) for k in keys}


@dataclass(frozen=True)
class Scale:
    """Models, schedules and precision of one TAKD/ESKD run (recorded in the result file's config)."""

    width: int = 100  # percent of the TAKD paper's channel widths, for every model
    teacher_epochs: int = 15
    assistant_epochs: int = 12
    student_epochs: int = 15
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    temperature: float = 4.0
    hard_weight: float = 0.5
    shared_teachers: bool = True
    precision: str = "fp32"  # fp32 | bf16 (bfloat16 autocast on the CPU or the GPU; weights stay float32)
    # linear lr warmup of the assistants and students (not the teacher): at lr 0.05 from the first step, the
    # full-width takd4 assistant lost every ReLU of its last conv layer in its first epoch and stayed a
    # constant classifier (10 % accuracy) on the full CIFAR-10 CPU run; one epoch of warmup trains it
    warmup_epochs: float = 1.0

    def name(self, depth: int) -> str:
        return f"takd{depth}" if self.width == 100 else f"takd{depth}x{self.width}"

    @property
    def early_epoch(self) -> int:
        return max(1, self.teacher_epochs // 3)

    def config(self) -> dict:
        return asdict(self) | {"teacher_augment": "crop-flip", "student_augment": "none",
                               "early_teacher_epoch": self.early_epoch, "lr_schedule": "cosine"}

    def run_config(self, epochs: int, seed: int, augment: str = "none", warmup: bool = True) -> RunConfig:
        train = TrainConfig(epochs=epochs, optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                            nesterov=self.optimizer == "sgd", weight_decay=self.weight_decay,
                            lr_schedule="cosine", warmup_epochs=self.warmup_epochs if warmup else 0.0,
                            augment=augment, amp=self.precision == "bf16",
                            amp_dtype="bfloat16", cpu_bf16=self.precision == "bf16", channels_last=True)
        return RunConfig(train, self.batch_size, seed, tensor_batches=True)


class Pipeline:
    """Trains and records the models of one TAKD/ESKD run; every model is skipped when already recorded."""

    def __init__(self, res: Results, data: Split, scale: Scale, device: torch.device, tag: str) -> None:
        self.res, self.data, self.scale, self.device, self.tag = res, data, scale, device, tag
        self.xtr, self.ytr = data.x_train.to(device), data.y_train.to(device)  # on the GPU once, if there is one
        self.val = (data.x_val.to(device), data.y_val)  # labels stay on the CPU (predict_logits returns CPU logits)
        self.test = (data.x_test.to(device), data.y_test)

    def record(self, key: str, seed: int, model: torch.nn.Module, curve: list[int] | None = None) -> None:
        model = model.to(self.device)
        if curve:
            n = len(self.data.y_val)
            self.res.note("curves", f"{key} | seed {seed} | val acc per epoch",
                          [round(100.0 * (1 - e / n), 2) for e in curve])
        self.res.add(f"{key} | val acc", seed, accuracy(model, *self.val, self.device), " %")
        self.res.add(f"{key} | test acc", seed, accuracy(model, *self.test, self.device), " %")

    def fresh(self, depth: int, seed: int) -> torch.nn.Module:
        seed_all(seed)
        return build_model(self.scale.name(depth), SPEC)

    def path(self, what: str, seed: int) -> str:
        return str(WORK / f"{self.tag}_{what}_seed{seed}.pt")

    def resume(self, what: str, seed: int) -> Path:
        """Where the training of a teacher or assistant keeps its state after every epoch (a kill loses one)."""
        return WORK / f"{self.tag}_{what}_seed{seed}.resume.pt"

    def cached(self, what: str, seed: int, depth: int) -> tuple[torch.nn.Module, torch.Tensor] | None:
        """A model (and its training-set logits) saved by an earlier run on this split with this scale."""
        try:
            state, meta = read_checkpoint(self.path(what, seed))
        except FileNotFoundError:
            return None
        if (meta.get("split") != self.data.fingerprint()
                or settings_of(meta.get("scale", {}), what) != settings_of(self.scale.config(), what)):
            return None
        model = self.fresh(depth, seed)
        model.load_state_dict(state)
        return model, torch.load(self.path(what + "_logits", seed), weights_only=True)

    def keep(self, what: str, seed: int, depth: int, model: torch.nn.Module) -> torch.Tensor:
        """Save the model and its logits on the training images; returns the packed KD targets."""
        logits = predict_logits(model, self.xtr, self.device)
        save_checkpoint(model, self.path(what, seed), {"model": self.scale.name(depth), "classes": None,
                                                       "split": self.data.fingerprint(),
                                                       "scale": self.scale.config()})
        torch.save(logits, self.path(what + "_logits", seed))
        return logits

    def teachers(self, seed: int) -> dict[str, torch.Tensor]:
        """KD targets (labels + logits on the training images) of teacher, early teacher and assistants."""
        s = self.scale
        hit, early_hit = self.cached("teacher", seed, 10), self.cached("teacher_early", seed, 10)
        if hit is None or early_hit is None:
            teacher = self.fresh(10, seed)
            hist = run(CrossEntropyObjective(teacher), self.xtr, self.ytr,
                       s.run_config(s.teacher_epochs, seed, "crop-flip", warmup=False), self.device,
                       eval_data=self.val,
                       snapshot_epochs=(s.early_epoch,), desc="teacher", resume_path=self.resume("teacher", seed))
            early = self.fresh(10, seed)
            early.load_state_dict(hist.snapshots[s.early_epoch])
            self.record("teacher takd10", seed, teacher, hist.test_errors)
            self.record("teacher takd10 early", seed, early)
            hit = (teacher, self.keep("teacher", seed, 10, teacher))
            early_hit = (early, self.keep("teacher_early", seed, 10, early))
        elif not self.res.has("teacher takd10 | test acc", seed):  # reloaded into a fresh result file
            self.record("teacher takd10", seed, hit[0])
            self.record("teacher takd10 early", seed, early_hit[0])
        targets = {"teacher": pack_labels_and_logits(self.ytr, hit[1].to(self.device)),
                   "early": pack_labels_and_logits(self.ytr, early_hit[1].to(self.device))}
        for depth in ASSISTANT_DEPTHS:
            key = f"TA takd{depth} (KD from teacher)"
            got = self.cached(f"assistant{depth}", seed, depth)
            if got is None:
                ta = self.fresh(depth, seed)
                hist = run(CachedKDObjective(ta, s.temperature, s.hard_weight), self.xtr, targets["teacher"],
                           s.run_config(s.assistant_epochs, seed), self.device,
                           eval_data=self.val, desc=f"TA{depth}",
                           resume_path=self.resume(f"assistant{depth}", seed))
                self.record(key, seed, ta, hist.test_errors)
                got = (ta, self.keep(f"assistant{depth}", seed, depth, ta))
            elif not self.res.has(f"{key} | test acc", seed):
                self.record(key, seed, got[0])
            targets[f"TA{depth}"] = pack_labels_and_logits(self.ytr, got[1].to(self.device))
        return targets

    def student(self, key: str, seed: int, targets: torch.Tensor | None, epochs: int | None = None) -> None:
        """One 2-conv student: hard labels (targets None) or Hinton KD from cached targets."""
        full = f"student takd2 {key}"
        if self.res.has(f"{full} | test acc", seed):
            return
        s = self.scale
        model = self.fresh(2, seed)
        objective = (CrossEntropyObjective(model) if targets is None else
                     CachedKDObjective(model, s.temperature, s.hard_weight))
        hist = run(objective, self.xtr, self.ytr if targets is None else targets,
                   s.run_config(epochs or s.student_epochs, seed), self.device,
                   eval_data=self.val, desc=key)
        self.record(full, seed, model, hist.test_errors)

    def seed_run(self, seed: int) -> None:
        """Every student of one seed (teachers and assistants of seed 0 when shared)."""
        targets = self.teachers(0 if self.scale.shared_teachers else seed)
        self.student("NOKD", seed, None)
        self.student("BLKD", seed, targets["teacher"])
        for depth in ASSISTANT_DEPTHS:
            self.student(f"TAKD (TA={depth})", seed, targets[f"TA{depth}"])
        self.student("ESKD (early teacher)", seed, targets["early"])
        self.student(f"NOKD, half the epochs ({self.scale.student_epochs // 2})", seed, None,
                     self.scale.student_epochs // 2)
        self.res.render()
