"""`stpm distill ...` sub-commands; also runnable as `python -m stpm.distill.cli ...`.

  train   train a classifier on hard labels (e.g. a teacher)
  kd      distil a teacher into a student (kd, logit, dkd, fitnets, at, fsp, nokd)
  takd    teacher -> assistant(s) -> student chain
  export  ONNX export of a trained classifier, parity-checked with onnxruntime
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from stpm.distill import methods as M
from stpm.distill.data import Split, load_split
from stpm.distill.export import check_parity, export_classifier_onnx
from stpm.distill.models import InputSpec, build_model, default_feature_layers, load_weights
from stpm.distill.trainer import Objective, TrainConfig, count_errors, default_device, save_checkpoint

METHODS = ("kd", "logit", "dkd", "fitnets", "at", "fsp", "nokd")


@dataclass(frozen=True)
class KDSettings:
    """Distillation hyper-parameters of the `kd` and `takd` commands."""

    method: str = "kd"
    temperature: float = 4.0
    hard_weight: float = 0.5
    feature_weight: float = 1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="mnist", help="mnist | digits | path to an ImageFolder root")
    p.add_argument("--n-train", type=int, default=None, help="training images (mnist default 8000 of 10000)")
    p.add_argument("--image-size", type=int, default=32, help="ImageFolder resize")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt); a .json report goes beside it")
    p.add_argument("--onnx", type=Path, default=None, help="also export the trained model to this ONNX path")


def _kd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--hard-weight", type=float, default=0.5, help="lambda on the hard-label CE term")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `distill` with its sub-commands to a parent CLI's sub-parsers."""
    parser = subparsers.add_parser("distill", help="classifier knowledge distillation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="distill_command", required=True)

    p = sub.add_parser("train", help="train a classifier on hard labels")
    p.add_argument("--model", required=True, help="mlp<H>[d], cnn<D>[x<W>], torchvision:<n>, timm:<n>, module:attr")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("kd", help="distil a teacher into a student")
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-weights", type=Path, default=None, help="trained teacher; else it is trained first")
    p.add_argument("--student", required=True)
    p.add_argument("--method", choices=METHODS, default="kd")
    _kd_options(p)
    p.add_argument("--feature-weight", type=float, default=1.0, help="FitNets/FSP weight (AT uses 1000x)")
    p.add_argument("--student-layers", default=None, help="comma-separated layer names (feature methods)")
    p.add_argument("--teacher-layers", default=None, help="comma-separated layer names (feature methods)")
    _common(p)
    p.set_defaults(func=cmd_kd)

    p = sub.add_parser("takd", help="teacher -> assistant(s) -> student chain")
    p.add_argument("--path", required=True, help="comma-separated model names, teacher first, e.g. cnn10,cnn4,cnn2")
    _kd_options(p)
    _common(p)
    p.set_defaults(func=cmd_takd)

    p = sub.add_parser("export", help="export a trained classifier to ONNX")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--data", default="mnist")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export)
    return parser


def _setup(args: argparse.Namespace) -> tuple[Split, InputSpec, M.RunConfig, torch.device]:
    torch.manual_seed(args.seed)
    data = load_split(args.data, args.n_train, args.image_size)
    spec = InputSpec(data.x_train.shape[1], data.x_train.shape[-1], data.num_classes)
    cfg = M.RunConfig(TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                                  progress=not args.no_progress), batch_size=args.batch_size, seed=args.seed)
    device = torch.device(args.device) if args.device else default_device()
    return data, spec, cfg, device


def _finish(args: argparse.Namespace, model: nn.Module, data: Split, device: torch.device, report: dict) -> int:
    errors = count_errors(model, data.x_test, data.y_test, device)
    report.update(data=data.description, test_errors=errors, test_images=len(data.y_test),
                  test_accuracy=1 - errors / len(data.y_test), checkpoint=str(args.out))
    save_checkpoint(model, args.out)
    if args.onnx is not None:
        export_classifier_onnx(model, data.x_test[:2], args.onnx)
        report["onnx"] = str(args.onnx)
        report["onnx_max_abs_diff"] = check_parity(model, args.onnx, data.x_test[:16])
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    model = build_model(args.model, spec)
    M.train_classifier(model, data.x_train, data.y_train, cfg, device)
    return _finish(args, model, data, device, {"command": "train", "model": args.model, "train": asdict(cfg.train)})


def _layers(text: str | None, model: nn.Module) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else default_feature_layers(model)


def make_objective(settings: KDSettings, student: nn.Module, teacher: nn.Module, example: torch.Tensor,
                   student_layers: tuple[str, ...], teacher_layers: tuple[str, ...]) -> Objective:
    """The Objective for one of METHODS."""
    s = settings
    if s.method == "kd":
        return M.KDObjective(student, teacher, s.temperature, s.hard_weight)
    if s.method == "logit":
        return M.LogitMatchingObjective(student, teacher, s.hard_weight)
    if s.method == "dkd":
        return M.DKDObjective(student, teacher, s.temperature, s.dkd_alpha, s.dkd_beta, 1.0)
    if s.method == "fitnets":
        return M.FitNetObjective(student, teacher, student_layers[-1], teacher_layers[-1], example, s.feature_weight)
    if s.method == "at":
        return M.AttentionTransferObjective(student, teacher, student_layers, teacher_layers, 1000.0 * s.feature_weight)
    if s.method == "fsp":
        return M.FSPObjective(student, teacher, student_layers, teacher_layers, s.feature_weight)
    if s.method == "nokd":
        return M.CrossEntropyObjective(student)
    raise ValueError(f"unknown method {s.method!r}; choose from {METHODS}")


def cmd_kd(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    teacher = build_model(args.teacher, spec)
    if args.teacher_weights is not None:
        load_weights(teacher, str(args.teacher_weights))
    else:
        M.train_classifier(teacher, data.x_train, data.y_train, cfg, device)
    teacher_errors = count_errors(teacher, data.x_test, data.y_test, device)
    student = build_model(args.student, spec)
    settings = KDSettings(args.method, args.temperature, args.hard_weight, args.feature_weight)
    feature = args.method in ("fitnets", "at", "fsp")
    objective = make_objective(settings, student, teacher, data.x_train[:8],
                               _layers(args.student_layers, student) if feature else (),
                               _layers(args.teacher_layers, teacher) if feature else ())
    M.run(objective, data.x_train, data.y_train, cfg, device, desc=args.method)
    return _finish(args, student, data, device, {"command": "kd", "teacher": args.teacher, "student": args.student,
                                                 "teacher_test_errors": teacher_errors, "kd": asdict(settings),
                                                 "train": asdict(cfg.train)})


def cmd_takd(args: argparse.Namespace) -> int:
    data, spec, cfg, device = _setup(args)
    names = args.path.split(",")
    models = [build_model(n, spec) for n in names]
    M.takd_chain(models, data.x_train, data.y_train, cfg, device, args.temperature, args.hard_weight,
                 train_first=True)
    errors = {n: count_errors(m, data.x_test, data.y_test, device) for n, m in zip(names, models)}
    return _finish(args, models[-1], data, device, {"command": "takd", "path": names, "chain_test_errors": errors,
                                                    "train": asdict(cfg.train)})


def cmd_export(args: argparse.Namespace) -> int:
    data = load_split(args.data, None, args.image_size)
    spec = InputSpec(data.x_train.shape[1], data.x_train.shape[-1], data.num_classes)
    model = load_weights(build_model(args.model, spec), str(args.weights))
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
