"""`stpm distill ...` sub-commands; also runnable as `python -m stpm.distill.cli ...`.

  train          train a classifier on hard labels (a teacher; --classes for a teacher of some classes only,
                 --snapshot-epochs to keep early-stopped teachers for ESKD)
  kd             distil one teacher into a student with one of METHODS
  takd           teacher -> assistant(s) -> student chain
  dml            deep mutual learning of two or more peers (no teacher)
  multi          several teachers over the same classes, averaged soft targets
  disjoint       teachers trained on disjoint class sets merged into one student, without labels
  noisy-student  Noisy Student self-training on a labelled subset plus the rest unlabelled
  latent         heterogeneous teachers aligned in one latent space (autoencoder + triplet), then KD
  export         ONNX export of a trained classifier, parity-checked with onnxruntime

Every command reads one split (--data, --split-seed, --n-train, --n-val); every checkpoint records it, and
a teacher checkpoint is refused when it was trained on another split (its training images could be test
images here) unless --trust-teacher-split is given. Options a method does not use are refused, not ignored.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from stpm.distill import methods as M
from stpm.distill.data import DATASETS, UNLABELED, Split, augmentation, load_split
from stpm.distill.export import check_parity, export_classifier_onnx
from stpm.distill.methods.feature_kd import probe_shapes
from stpm.distill.models import InputSpec, build_model, default_embedding_layer, default_feature_layers
from stpm.distill.trainer import (Objective, TrainConfig, count_errors, default_device, read_checkpoint,
                                  save_checkpoint)

METHODS = ("kd", "logit", "dkd", "fitnets", "at", "fsp", "sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "reviewkd",
           "nokd")
LAYER_METHODS = ("fitnets", "at", "fsp", "sp", "vid", "nst", "reviewkd")  # feature maps (--*-layers)
EMBEDDING_METHODS = ("cc", "rkd", "pkt", "crd")  # one embedding per model (--*-embedding)
# Distillation-term weight per method (RepDistiller's CIFAR recipes; ReviewKD from mdistiller).
DEFAULT_FEATURE_WEIGHT = {"fitnets": 100.0, "at": 1000.0, "fsp": 50.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0,
                          "rkd": 1.0, "pkt": 30000.0, "nst": 50.0, "crd": 0.8, "reviewkd": 1.0}
# The options each method reads; any other option given on the command line is an error.
METHOD_OPTIONS = {
    "kd": ("temperature", "hard_weight"),
    "logit": ("hard_weight",),
    "dkd": ("temperature", "ce_weight", "dkd_alpha", "dkd_beta"),
    "nokd": (),
    **{m: ("ce_weight", "feature_weight", "student_layers", "teacher_layers") for m in LAYER_METHODS},
    **{m: ("ce_weight", "feature_weight", "student_embedding", "teacher_embedding") for m in EMBEDDING_METHODS},
}
OPTION_FLAGS = {"temperature": "--temperature", "hard_weight": "--hard-weight", "ce_weight": "--ce-weight",
                "dkd_alpha": "--dkd-alpha", "dkd_beta": "--dkd-beta", "feature_weight": "--feature-weight",
                "student_layers": "--student-layers", "teacher_layers": "--teacher-layers",
                "student_embedding": "--student-embedding", "teacher_embedding": "--teacher-embedding"}


@dataclass(frozen=True)
class KDSettings:
    """Hyper-parameters of one distillation method; feature_weight None = the method's default weight."""

    method: str = "kd"
    temperature: float = 4.0
    hard_weight: float = 0.5
    ce_weight: float = 1.0
    feature_weight: float | None = None
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0

    def used(self) -> dict:
        """The settings the method actually reads (what a report should record)."""
        keys = [k for k in METHOD_OPTIONS[self.method] if hasattr(self, k)]
        out = {"method": self.method, **{k: getattr(self, k) for k in keys}}
        if "feature_weight" in out:
            out["feature_weight"] = self.weight()
        return out

    def weight(self) -> float:
        return DEFAULT_FEATURE_WEIGHT[self.method] if self.feature_weight is None else self.feature_weight


def fail(message: str) -> NoReturn:
    """Stop with a CLI error naming the problem (message on stderr, exit status 1)."""
    print(f"stpm distill: error: {message}", file=sys.stderr)
    raise SystemExit(message)


def pair_layers(student_layers: tuple[str, ...], teacher_layers: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Pair the first n student and teacher layers, n = the shorter list (stages at the same resolution for
    the zoo's plain CNNs; layer1..4 for ResNets)."""
    n = min(len(student_layers), len(teacher_layers))
    if n == 0:
        raise ValueError("no feature layers to pair")
    return student_layers[:n], teacher_layers[:n]


def make_objective(settings: KDSettings, student: nn.Module, teacher: nn.Module, example: torch.Tensor,
                   student_layers: tuple[str, ...] = (), teacher_layers: tuple[str, ...] = (),
                   student_embedding: str | None = None, teacher_embedding: str | None = None) -> Objective:
    """The Objective for one of METHODS. Layer methods use the paired layers (all for AT, FSP, VID, NST,
    ReviewKD; the last pair for FitNets and SP); embedding methods use the embedding layers (default:
    models.default_embedding_layer)."""
    s, w, ce = settings, settings.weight() if settings.method in DEFAULT_FEATURE_WEIGHT else 0.0, settings.ce_weight
    if s.method == "kd":
        return M.KDObjective(student, teacher, s.temperature, s.hard_weight)
    if s.method == "logit":
        return M.LogitMatchingObjective(student, teacher, s.hard_weight)
    if s.method == "dkd":
        return M.DKDObjective(student, teacher, s.temperature, s.dkd_alpha, s.dkd_beta, ce)
    if s.method == "nokd":
        return M.CrossEntropyObjective(student)
    if s.method in LAYER_METHODS:
        sl, tl = pair_layers(student_layers or default_feature_layers(student),
                             teacher_layers or default_feature_layers(teacher))
        if s.method == "fitnets":
            return M.FitNetObjective(student, teacher, sl[-1], tl[-1], example, w, ce)
        if s.method == "at":
            return M.AttentionTransferObjective(student, teacher, sl, tl, w, ce)
        if s.method == "fsp":
            return M.FSPObjective(student, teacher, sl, tl, w, ce, example)
        if s.method == "sp":
            return M.SPObjective(student, teacher, sl[-1:], tl[-1:], w, ce)
        if s.method == "vid":
            return M.VIDObjective(student, teacher, sl, tl, example, w, ce)
        if s.method == "nst":
            return M.NSTObjective(student, teacher, sl, tl, w, ce)
        return M.ReviewKDObjective(student, teacher, sl, tl, example, w, ce)
    if s.method in EMBEDDING_METHODS:
        se = student_embedding or default_embedding_layer(student)
        te = teacher_embedding or default_embedding_layer(teacher)
        if s.method == "cc":
            return M.CCObjective(student, teacher, se, te, example, w, ce)
        if s.method == "rkd":
            return M.RKDObjective(student, teacher, se, te, w, ce)
        if s.method == "pkt":
            return M.PKTObjective(student, teacher, se, te, w, ce)
        return M.CRDObjective(student, teacher, se, te, example, w, ce)
    raise ValueError(f"unknown method {s.method!r}; choose from {METHODS}")


# ----------------------------------------------------------------------------------------------- options

def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATASETS, default="mnist",
                   help="mnist, cifar10 (official test sets, from ../shared/data), digits (scikit-learn) or "
                        "folder (an ImageFolder root given by --data-dir)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="ImageFolder root for --data folder; another location of the MNIST raw/ or CIFAR-10 files")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation(/test) split")
    p.add_argument("--n-train", type=int, default=None, help="training images drawn (default: all the rest)")
    p.add_argument("--n-val", type=int, default=0, help="validation images held out of training")
    p.add_argument("--image-size", type=int, default=32, help="resize for --data folder")


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: decay to 0 over the run (default); constant")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augment", default="none", help="none | shift<N> (random translation) | crop-flip")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--no-amp", action="store_true", help="no fp16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt); a .json report goes beside it")
    p.add_argument("--onnx", type=Path, default=None, help="also export the trained model to this ONNX path")


def _teacher_options(p: argparse.ArgumentParser, several: bool) -> None:
    if several:
        p.add_argument("--teachers", required=True, help="comma-separated teacher model names")
        p.add_argument("--teacher-weights", required=True,
                       help="comma-separated teacher checkpoints (stpm distill train)")
    else:
        p.add_argument("--teacher", required=True, help="teacher model name")
        p.add_argument("--teacher-weights", type=Path, default=None,
                       help="trained teacher checkpoint (stpm distill train); else the teacher is trained first")
    p.add_argument("--trust-teacher-split", action="store_true",
                   help="accept teacher checkpoints without a split record or from another split (their training "
                        "images may then be in this test set)")


def _kd_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="T (kd, dkd; default 4)")
    p.add_argument("--hard-weight", type=float, default=None,
                   help="lambda in lambda*CE + (1-lambda)*soft term (kd, logit; default 0.5)")
    p.add_argument("--ce-weight", type=float, default=None,
                   help="weight of the CE term (dkd, feature methods; default 1)")
    p.add_argument("--feature-weight", type=float, default=None,
                   help="weight of the feature/relation term; default per method: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_FEATURE_WEIGHT.items()))
    p.add_argument("--dkd-alpha", type=float, default=None, help="DKD target-class weight (default 1)")
    p.add_argument("--dkd-beta", type=float, default=None, help="DKD non-target weight (default 8)")
    p.add_argument("--student-layers", default=None,
                   help=f"comma-separated feature layers ({', '.join(LAYER_METHODS)})")
    p.add_argument("--teacher-layers", default=None, help="comma-separated feature layers, paired in order")
    p.add_argument("--student-embedding", default=None, help=f"embedding layer ({', '.join(EMBEDDING_METHODS)})")
    p.add_argument("--teacher-embedding", default=None, help="teacher embedding layer")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `distill` with its sub-commands to a parent CLI's sub-parsers."""
    parser = subparsers.add_parser("distill", help="classifier knowledge distillation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="distill_command", required=True)

    p = sub.add_parser("train", help="train a classifier on hard labels")
    p.add_argument("--model", required=True, help="mlp<H>[d], cnn<D>[x<W>], takd<D>[x<P>], torchvision:<n>, "
                                                  "timm:<n>, module:attr")
    p.add_argument("--classes", default=None, help="train on these classes only, e.g. 0-4 or 0,2,5 (disjoint teachers)")
    p.add_argument("--snapshot-epochs", default=None,
                   help="comma-separated epochs after which the model is also saved (OUT.epochN.pt; ESKD teachers)")
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("kd", help="distil a teacher into a student")
    _teacher_options(p, several=False)
    p.add_argument("--student", required=True)
    p.add_argument("--method", choices=METHODS, default="kd")
    _kd_method_options(p)
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_kd)

    p = sub.add_parser("takd", help="teacher -> assistant(s) -> student chain (Hinton KD along the path)")
    p.add_argument("--path", required=True, help="comma-separated model names, teacher first, e.g. takd10,takd4,takd2")
    p.add_argument("--teacher-weights", type=Path, default=None, help="trained first model; else it is trained first")
    p.add_argument("--trust-teacher-split", action="store_true", help="see kd")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hard-weight", type=float, default=0.5, help="lambda on the hard-label CE term")
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_takd)

    p = sub.add_parser("dml", help="deep mutual learning: peers learn together; the first is saved")
    p.add_argument("--models", required=True, help="comma-separated peer model names (>= 2), the student first")
    p.add_argument("--temperature", type=float, default=1.0)
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_dml)

    p = sub.add_parser("multi", help="several teachers (same classes), averaged soft targets")
    _teacher_options(p, several=True)
    p.add_argument("--student", required=True)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hard-weight", type=float, default=0.5)
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_multi)

    p = sub.add_parser("disjoint", help="teachers of disjoint class sets merged into one student, no labels")
    _teacher_options(p, several=True)
    p.add_argument("--student", required=True)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--weighting", choices=("energy", "confidence"), default="energy",
                   help="per-image teacher weights: softmax over concatenated logits (energy) or max probability")
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_disjoint)

    p = sub.add_parser("noisy-student", help="Noisy Student self-training (the teacher learns the labelled subset)")
    p.add_argument("--teacher", required=True, help="teacher model, trained here on the labelled subset only")
    p.add_argument("--student", required=True, help="student model (a dropout model, e.g. mlp800d, for model noise)")
    p.add_argument("--n-labeled", type=int, required=True, help="labelled training images; the rest lose their labels")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--hard-pseudo-labels", action="store_true", help="one-hot pseudo-labels instead of soft ones")
    p.add_argument("--temperature", type=float, default=1.0, help="pseudo-label temperature")
    p.add_argument("--max-shift", type=int, default=2, help="input noise: random translation (px)")
    p.add_argument("--noise-std", type=float, default=0.3, help="input noise: Gaussian std (normalised units)")
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_noisy_student)

    p = sub.add_parser("latent", help="teachers aligned in one latent space (AE + triplet), then KD")
    _teacher_options(p, several=True)
    p.add_argument("--teacher-feature-layers", required=True, help="one layer per teacher, comma-separated")
    p.add_argument("--student", required=True)
    p.add_argument("--student-layer", default=None, help="student layer matched to the latent code "
                                                         "(default: its embedding layer)")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--margin", type=float, default=0.5)
    p.add_argument("--latent-weight", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hard-weight", type=float, default=0.5)
    _data_options(p)
    _train_options(p)
    p.set_defaults(func=cmd_latent)

    p = sub.add_parser("export", help="export a trained classifier to ONNX")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", type=Path, required=True)
    _data_options(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export)
    return parser


# ----------------------------------------------------------------------------------------------- helpers

def _setup(args: argparse.Namespace) -> tuple[Split, InputSpec, M.RunConfig, torch.device]:
    torch.manual_seed(args.seed)
    try:
        data = load_split(args.data, args.data_dir, args.n_train, args.n_val, args.split_seed, args.image_size)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    spec = InputSpec(data.x_train.shape[1], data.x_train.shape[-1], data.num_classes)
    try:
        augmentation(args.augment)
    except ValueError as e:
        fail(f"--augment: {e}")
    cfg = M.RunConfig(TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                                  weight_decay=args.weight_decay, amp=not args.no_amp, progress=not args.no_progress,
                                  augment=args.augment, lr_schedule=args.lr_schedule),
                      batch_size=args.batch_size, seed=args.seed)
    device = torch.device(args.device) if args.device else default_device()
    return data, spec, cfg, device


def _meta(model_name: str, data: Split, classes: list[int] | None = None) -> dict:
    return {"model": model_name, "split": data.fingerprint(), "classes": classes}


def _finish(args: argparse.Namespace, model: nn.Module, name: str, data: Split, device: torch.device,
            report: dict) -> int:
    errors = count_errors(model, data.x_test, data.y_test, device)
    report.update(data=data.description, split=data.fingerprint(), test_errors=errors,
                  test_images=len(data.y_test), test_accuracy=1 - errors / len(data.y_test), checkpoint=str(args.out))
    if len(data.y_val):
        report["val_accuracy"] = 1 - count_errors(model, data.x_val, data.y_val, device) / len(data.y_val)
    save_checkpoint(model, args.out, _meta(name, data))
    if args.onnx is not None:
        export_classifier_onnx(model, data.x_test[:2], args.onnx)
        report["onnx"] = str(args.onnx)
        report["onnx_max_abs_diff"] = check_parity(model, args.onnx, data.x_test[:16])
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def load_teacher(name: str, path: Path, data: Split, trust_split: bool) -> tuple[nn.Module, list[int] | None]:
    """Build `name` and load a checkpoint, refusing one trained on another split unless trust_split.

    Returns (model, the classes it was trained on or None for all). Its output width follows those classes.
    """
    if not Path(path).is_file():
        fail(f"teacher checkpoint not found: {path}")
    state, meta = read_checkpoint(Path(path))
    if not trust_split:
        recorded = meta.get("split")
        if recorded is None:
            fail(f"teacher checkpoint {path} has no split record, so its training images may be in this test set; "
                 "retrain it with `stpm distill train` on this split, or pass --trust-teacher-split")
        here = data.fingerprint()
        if recorded != here:
            diff = ", ".join(f"{k} {recorded.get(k)!r} there vs {here[k]!r} here" for k in here
                             if recorded.get(k) != here[k] and k != "train_sha256")
            fail(f"teacher checkpoint {path} was trained on another split ({diff or 'different training images'}): "
                 "its training images may be in this test set; use the same --data/--split-seed/--n-train/--n-val, "
                 "retrain the teacher, or pass --trust-teacher-split")
    classes = meta.get("classes")
    spec = InputSpec(data.x_train.shape[1], data.x_train.shape[-1], len(classes) if classes else data.num_classes)
    model = build_model(name, spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        fail(f"teacher checkpoint {path} does not fit model {name!r}: {str(e).splitlines()[0]}")
    return model, classes


def _teachers(args: argparse.Namespace, data: Split) -> tuple[list[str], list[nn.Module], list[list[int] | None]]:
    names, paths = args.teachers.split(","), args.teacher_weights.split(",")
    if len(names) != len(paths):
        fail(f"{len(names)} --teachers but {len(paths)} --teacher-weights")
    loaded = [load_teacher(n, Path(p), data, args.trust_teacher_split) for n, p in zip(names, paths)]
    return names, [m for m, _ in loaded], [c for _, c in loaded]


def parse_classes(text: str, num_classes: int) -> list[int]:
    """'0-4' or '0,2,5' -> sorted class indices within [0, num_classes)."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            fail(f"--classes: cannot read {part!r} (use e.g. 0-4 or 0,2,5)")
    if not out or min(out) < 0 or max(out) >= num_classes:
        fail(f"--classes {text!r} must lie in [0, {num_classes})")
    return sorted(out)


def _check_method_options(args: argparse.Namespace) -> KDSettings:
    """Refuse options the chosen method does not use; fill the rest with the method's defaults."""
    used = METHOD_OPTIONS[args.method]
    for opt, flag in OPTION_FLAGS.items():
        if getattr(args, opt, None) is not None and opt not in used:
            users = sorted(m for m, opts in METHOD_OPTIONS.items() if opt in opts)
            extra = " (its CE term is weighted by --ce-weight)" if opt == "hard_weight" and "ce_weight" in used else ""
            fail(f"{flag} is not used by --method {args.method}{extra}; it applies to: {', '.join(users)}")
    d = KDSettings(method=args.method)
    pick = lambda opt: getattr(d, opt) if getattr(args, opt) is None else getattr(args, opt)  # noqa: E731
    return KDSettings(args.method, pick("temperature"), pick("hard_weight"), pick("ce_weight"),
                      args.feature_weight, pick("dkd_alpha"), pick("dkd_beta"))


def _split_names(text: str | None) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


# ----------------------------------------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    classes = parse_classes(args.classes, data.num_classes) if args.classes else None
    x, y, report_data = data.x_train, data.y_train, data
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        remap = torch.full((data.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        x, y = x[keep], remap[y[keep]]
        spec = InputSpec(spec.in_channels, spec.image_size, len(classes))
    model = build_model(args.model, spec)
    snaps = tuple(int(e) for e in args.snapshot_epochs.split(",")) if args.snapshot_epochs else ()
    hist = M.train_classifier(model, x, y, cfg, device, snapshot_epochs=snaps)
    for epoch, state in hist.snapshots.items():
        snap = build_model(args.model, spec)
        snap.load_state_dict(state)
        save_checkpoint(snap, args.out.with_suffix(f".epoch{epoch}.pt"), _meta(args.model, data, classes))
    report = {"command": "train", "model": args.model, "train": asdict(cfg.train), "classes": classes,
              "snapshots": [str(args.out.with_suffix(f".epoch{e}.pt")) for e in hist.snapshots]}
    if classes is None:
        return _finish(args, model, args.model, report_data, device, report)
    # a teacher of some classes: accuracy on the test images of those classes, in its own output space
    keep = torch.isin(data.y_test, torch.tensor(classes))
    pred = torch.tensor(classes)[M.pseudo_labels(model, data.x_test[keep], device, 1.0, soft=False).argmax(-1)]
    acc = float((pred == data.y_test[keep]).float().mean())
    report.update(data=data.description, split=data.fingerprint(), test_images=int(keep.sum()),
                  test_accuracy_on_its_classes=acc, checkpoint=str(args.out))
    save_checkpoint(model, args.out, _meta(args.model, data, classes))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def _teacher_for_kd(args: argparse.Namespace, data: Split, spec: InputSpec, cfg: M.RunConfig,
                    device: torch.device) -> nn.Module:
    if args.teacher_weights is not None:
        teacher, classes = load_teacher(args.teacher, args.teacher_weights, data, args.trust_teacher_split)
        if classes is not None:
            fail(f"teacher {args.teacher_weights} knows only classes {classes}; use `stpm distill disjoint`")
        return teacher
    teacher = build_model(args.teacher, spec)
    M.train_classifier(teacher, data.x_train, data.y_train, cfg, device)
    return teacher


def cmd_kd(args: argparse.Namespace) -> int:
    settings = _check_method_options(args)
    data, spec, cfg, device = _setup(args)
    teacher = _teacher_for_kd(args, data, spec, cfg, device)
    teacher_errors = count_errors(teacher, data.x_test, data.y_test, device)
    student = build_model(args.student, spec)
    try:
        objective = make_objective(settings, student, teacher, data.x_train[:8], _split_names(args.student_layers),
                                   _split_names(args.teacher_layers), args.student_embedding, args.teacher_embedding)
    except (KeyError, ValueError) as e:
        fail(f"--method {args.method}: {e}")
    M.run(objective, data.x_train, data.y_train, cfg, device, desc=args.method)
    return _finish(args, student, args.student, data, device,
                   {"command": "kd", "teacher": args.teacher, "student": args.student,
                    "teacher_test_errors": teacher_errors, "kd": settings.used(), "train": asdict(cfg.train)})


def cmd_takd(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    names = args.path.split(",")
    if len(names) < 2:
        fail("--path needs at least a teacher and a student")
    models = [build_model(n, spec) for n in names]
    if args.teacher_weights is not None:
        models[0], _ = load_teacher(names[0], args.teacher_weights, data, args.trust_teacher_split)
    M.takd_chain(models, data.x_train, data.y_train, cfg, device, args.temperature, args.hard_weight,
                 train_first=args.teacher_weights is None)
    errors = {n: count_errors(m, data.x_test, data.y_test, device) for n, m in zip(names, models)}
    return _finish(args, models[-1], names[-1], data, device,
                   {"command": "takd", "path": names, "chain_test_errors": errors, "temperature": args.temperature,
                    "hard_weight": args.hard_weight, "train": asdict(cfg.train)})


def cmd_dml(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    names = args.models.split(",")
    if len(names) < 2:
        fail("--models needs at least two peers")
    peers = [build_model(n, spec) for n in names]
    M.run(M.MutualObjective(peers, args.temperature), data.x_train, data.y_train, cfg, device, desc="dml")
    errors = {f"{i}:{n}": count_errors(m, data.x_test, data.y_test, device)
              for i, (n, m) in enumerate(zip(names, peers))}
    return _finish(args, peers[0], names[0], data, device,
                   {"command": "dml", "peers": names, "peer_test_errors": errors, "temperature": args.temperature,
                    "train": asdict(cfg.train)})


def cmd_multi(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    names, teachers, classes = _teachers(args, data)
    if any(c is not None for c in classes):
        fail("multi needs teachers over all classes; teachers of some classes go to `stpm distill disjoint`")
    student = build_model(args.student, spec)
    M.run(M.MultiTeacherKD(student, teachers, args.temperature, args.hard_weight), data.x_train, data.y_train,
          cfg, device, desc="multi")
    return _finish(args, student, args.student, data, device,
                   {"command": "multi", "teachers": names, "student": args.student, "temperature": args.temperature,
                    "hard_weight": args.hard_weight, "train": asdict(cfg.train)})


def cmd_disjoint(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    names, teachers, classes = _teachers(args, data)
    if any(c is None for c in classes):
        fail("disjoint needs teachers trained with `stpm distill train --classes ...`")
    student = build_model(args.student, spec)
    no_labels = torch.full_like(data.y_train, UNLABELED)
    try:
        objective = M.DisjointMergeKD(student, teachers, classes, data.num_classes, args.temperature, args.weighting)
    except ValueError as e:
        fail(str(e))
    M.run(objective, data.x_train, no_labels, cfg, device, desc="disjoint")
    return _finish(args, student, args.student, data, device,
                   {"command": "disjoint", "teachers": names, "teacher_classes": classes, "student": args.student,
                    "temperature": args.temperature, "weighting": args.weighting, "labels_used": 0,
                    "train": asdict(cfg.train)})


def cmd_noisy_student(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    n = len(data.y_train)
    if not 0 < args.n_labeled < n:
        fail(f"--n-labeled must lie in [1, {n - 1}] (there are {n} training images)")
    g = torch.Generator().manual_seed(args.split_seed)
    perm = torch.randperm(n, generator=g)
    lab, unlab = perm[:args.n_labeled], perm[args.n_labeled:]
    teacher = build_model(args.teacher, spec)  # it must see only the labelled subset, so it is trained here
    M.train_classifier(teacher, data.x_train[lab], data.y_train[lab], cfg, device)
    ns = M.NoisyStudentConfig(args.iterations, not args.hard_pseudo_labels, args.temperature, args.max_shift,
                              args.noise_std)
    results = M.noisy_student(teacher, lambda: build_model(args.student, spec), data.x_train[lab],
                              data.y_train[lab], data.x_train[unlab], ns, cfg, device)
    errors = [count_errors(s, data.x_test, data.y_test, device) for s, _ in results]
    return _finish(args, results[-1][0], args.student, data, device,
                   {"command": "noisy-student", "teacher": args.teacher, "student": args.student,
                    "n_labeled": args.n_labeled, "teacher_test_errors": count_errors(teacher, data.x_test,
                                                                                     data.y_test, device),
                    "iteration_test_errors": errors, "noisy_student": asdict(ns), "train": asdict(cfg.train)})


def cmd_latent(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    names, teachers, classes = _teachers(args, data)
    if any(c is not None for c in classes):
        fail("latent needs teachers over all classes")
    layers = tuple(args.teacher_feature_layers.split(","))
    if len(layers) != len(teachers):
        fail(f"{len(teachers)} teachers but {len(layers)} --teacher-feature-layers")
    example = data.x_train[:2]
    try:
        dims = tuple(int(torch.Size(probe_shapes(t, (layer,), example)[0][1:]).numel())
                     for t, layer in zip(teachers, layers))
    except KeyError as e:
        fail(str(e))
    aligner = M.LatentAligner(dims, args.latent_dim, hidden=256)
    M.run(M.AlignerObjective(aligner, teachers, layers, args.margin, 1.0), data.x_train, data.y_train, cfg, device,
          desc="aligner")
    student = build_model(args.student, spec)
    s_layer = args.student_layer or default_embedding_layer(student)
    s_dim = int(torch.Size(probe_shapes(student, (s_layer,), example)[0][1:]).numel())
    M.run(M.LatentKDObjective(student, s_layer, s_dim, teachers, layers, aligner, args.latent_dim, args.temperature,
                              args.hard_weight, args.latent_weight), data.x_train, data.y_train, cfg, device,
          desc="latent")
    return _finish(args, student, args.student, data, device,
                   {"command": "latent", "teachers": names, "teacher_layers": layers, "student": args.student,
                    "student_layer": s_layer, "latent_dim": args.latent_dim, "margin": args.margin,
                    "latent_weight": args.latent_weight, "temperature": args.temperature,
                    "hard_weight": args.hard_weight, "train": asdict(cfg.train)})


def cmd_export(args: argparse.Namespace) -> int:
    try:
        data = load_split(args.data, args.data_dir, args.n_train, args.n_val, args.split_seed, args.image_size)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    model, _ = load_teacher(args.model, args.weights, data, trust_split=True)
    export_classifier_onnx(model, data.x_test[:2], args.out)
    diff = check_parity(model, args.out, data.x_test[:16])
    print(json.dumps({"onnx": str(args.out), "max_abs_diff": diff}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stpm")
    register(parser.add_subparsers(dest="command", required=True))
    raw = list(sys.argv[1:] if argv is None else argv)
    if not raw or raw[0] != "distill":
        raw = ["distill"] + raw
    args = parser.parse_args(raw)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
