"""`stpm train | eval | export | predict | activate | bench | serve | worker | distill`.

The modules behind `export`, `bench`, `serve`, `worker` and `distill` are imported only when that command runs
(`build_parser(command)`): `stpm serve`, the Docker entry point, must not pay for torch."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_MODELS_DIR = os.environ.get("STPM_MODELS_DIR", "models")


def _common(p: argparse.ArgumentParser, training: bool = False) -> None:
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help="model store (env STPM_MODELS_DIR)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    if training:
        p.add_argument("--backbone", default="resnet18",
                       help="teacher: resnet18, resnet34, wide_resnet50_2, efficientnet_lite0")
        p.add_argument("--image-size", "--tile-size", dest="image_size", type=int, default=256,
                       help="model input S in pixels: images are covered by S x S tiles (default 256)")
        p.add_argument("--epochs", type=int, default=100)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--seed", type=int, default=0)


def _positive(v: str) -> int:
    i = int(v)
    if i < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return i


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI. `command`: the sub-command about to run; only its module is imported (None: none)."""
    parser = argparse.ArgumentParser(prog="stpm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a student on good images and publish a model version")
    p.add_argument("data", help="MVTec category folder (uses train/good) or a folder of good images")
    p.add_argument("--name", required=True, help="model name in the store")
    _common(p, training=True)
    p.add_argument("--student-backbone", default=None, help="student architecture (default: same as teacher)")
    p.add_argument("--layers", default="", help="comma-separated feature layers (default: backbone's 3 stages)")
    p.add_argument("--combine", choices=["product", "sum"], default="product")
    p.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing of the map (pixels)")
    p.add_argument("--image-score", choices=["max", "topk_mean"], default="max",
                   help="image score from the stitched map: its maximum, or the mean of its top-k values")
    p.add_argument("--topk", type=float, default=0.01,
                   help="for topk_mean: < 1 a fraction of the map's pixels, >= 1 a number of pixels")
    p.add_argument("--tiling", choices=["tile", "squash"], default="tile",
                   help="tile: keep the aspect ratio, one fixed scale, overlapping S x S tiles (default); "
                        "squash: resize every image to S x S (loses thin defects in elongated images)")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels the training images' median short side is scaled to (default: S, so an image "
                        "of the median size is one tile high or wide)")
    p.add_argument("--scale", type=float, default=None, help="fixed input -> model scale (wins over --resolution)")
    p.add_argument("--overlap", type=float, default=0.25, help="minimum overlap of neighbouring tiles (fraction)")
    p.add_argument("--max-upscale", type=float, default=2.0,
                   help="smaller images are upscaled to one tile by at most this factor, else refused")
    p.add_argument("--max-tiles", type=int, default=64, help="images needing more tiles are refused")
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--patience", type=int, default=0, help="early stopping after N epochs without improvement")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps per epoch (smoke tests)")
    p.add_argument("--augment", action="store_true", help="mild photometric jitter")
    p.add_argument("--calibration", choices=["max_margin", "quantile"], default="max_margin")
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--no-pretrained", action="store_true", help="random teacher (tests only)")
    p.add_argument("--weights", default=None, help="teacher ImageNet weight file")
    p.add_argument("--weights-dir", default=None, help="directory of weight files (env STPM_WEIGHTS_DIR)")
    p.add_argument("--run-dir", default=None, help="checkpoint folder (default runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and report them")
    p.add_argument("--no-export", action="store_true", help="do not write the ONNX files")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--activate", action="store_true",
                   help="make the new version the active one (the first version of a new name always is)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on an MVTec-layout test set")
    p.add_argument("model", help="NAME or NAME/VERSION")
    p.add_argument("data", help="MVTec category folder (uses test/ and ground_truth/)")
    _common(p)
    p.add_argument("--out", default=None, help="report folder (default runs/eval-NAME-VERSION)")
    p.add_argument("--no-record", action="store_true", help="do not record the metrics in the manifest")
    p.set_defaults(func=cmd_eval)

    _module_command(sub, command, "export", "write teacher.onnx, student.onnx and the fused scorer.onnx",
                    "stpm.export")

    p = sub.add_parser("predict", help="score images; write overlays and a JSON")
    p.add_argument("model", help="NAME or NAME/VERSION")
    p.add_argument("images", nargs="+", help="image files or folders")
    _common(p)
    p.add_argument("--out", default="predictions", help="output folder")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("activate", help="make a version the one its name serves (NAME/vN)")
    p.add_argument("model", help="NAME/VERSION, e.g. bottle/v3")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help="model store (env STPM_MODELS_DIR)")
    p.set_defaults(func=cmd_activate)

    _module_command(sub, command, "bench", "speed benchmark: torch eager vs ONNX Runtime vs the full path",
                    "stpm.bench")
    _module_command(sub, command, "serve", "start the HTTP service (uvicorn)", "app.serve")
    _module_command(sub, command, "worker", "run training jobs from the Celery queue (scaled mode, docs/SCALING.md)",
                    "app.celery_worker")

    distill_help = "classifier knowledge distillation"
    if command != "distill":
        _placeholder(sub.add_parser("distill", help=distill_help))
    else:
        try:
            from stpm.distill import cli as distill_cli

            distill_cli.register(sub)
        except ImportError as e:
            _mark_unavailable(sub.add_parser("distill", help=distill_help), "distill", e)
    return parser


def _placeholder(p: argparse.ArgumentParser) -> None:
    """A listed command whose module is not imported (another command runs)."""
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _module_command(sub: argparse._SubParsersAction, command: str | None, name: str, help: str, module: str) -> None:
    """A sub-command implemented by `module` (its add_arguments + main), imported only when `command`
    is `name`. If the module cannot be imported (e.g. torch absent in a scoring-only install), the
    command stays listed and says why."""
    p = sub.add_parser(name, help=help)
    if command != name:
        _placeholder(p)
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        _mark_unavailable(p, name, e)
        return
    mod.add_arguments(p)
    p.set_defaults(func=mod.main)


def _mark_unavailable(p: argparse.ArgumentParser, name: str, e: ImportError) -> None:
    """Any arguments are accepted so the user sees why the command is missing, not a usage error."""
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: _unavailable(name, e))


def _unavailable(what: str, e: Exception) -> int:
    print(f"stpm {what}: not available in this installation ({e})", file=sys.stderr)
    return 2


def cmd_train(a: argparse.Namespace) -> int:
    from stpm import bundle
    from stpm.config import CalibrationConfig, ModelConfig, TilingConfig, TrainConfig
    from stpm.pipeline import train_and_publish

    model_cfg = ModelConfig(
        backbone=a.backbone, student_backbone=a.student_backbone,
        layers=tuple(x for x in a.layers.split(",") if x), image_size=a.image_size,
        pretrained=not a.no_pretrained, weights=a.weights, combine=a.combine, sigma=a.sigma,
        image_score=a.image_score, topk=a.topk,
    )
    tiling_cfg = TilingConfig(mode=a.tiling, resolution=a.resolution, scale=a.scale, overlap=a.overlap,
                              max_upscale=a.max_upscale, max_tiles=a.max_tiles)
    train_cfg = TrainConfig(
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
        val_fraction=a.val_fraction, patience=a.patience, seed=a.seed, device=a.device, amp=a.amp,
        compile=a.compile, num_workers=a.workers, augment=a.augment, max_steps=a.max_steps,
    )
    calib_cfg = CalibrationConfig(method=a.calibration, quantile=a.quantile, margin=a.margin)
    run_dir = Path(a.run_dir or Path("runs") / a.name)
    out = train_and_publish(a.data, a.name, a.models_dir, model_cfg, train_cfg, calib_cfg, tiling_cfg, run_dir,
                            a.weights_dir, a.skip_bad, a.resume, not a.no_export)
    for p, reason in out.skipped:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    if out.version is None:
        print(f"interrupted after {out.fit.epochs_run} epoch(s); checkpoint kept in {run_dir}. "
              f"Continue with: stpm train {a.data} --name {a.name} --resume", file=sys.stderr)
        return 130
    if a.activate:
        bundle.set_active(a.models_dir, a.name, out.version)
    cal = out.calibration
    print(json.dumps({
        "model": f"{a.name}/{out.version}", "path": str(out.path), "best_epoch": out.fit.best_epoch,
        "best_val_loss": out.fit.best_val_loss, "epochs_run": out.fit.epochs_run,
        "threshold": cal.threshold, "good_scores": cal.good_stats, "seconds": round(out.fit.seconds, 1),
        "tiling": bundle.read_manifest(out.path)["tiling"],
    }, indent=2))
    return 0


def cmd_activate(a: argparse.Namespace) -> int:
    from stpm import bundle

    name, version = bundle.parse_ref(a.model)
    if version is None:
        print(f"stpm activate: name a version: {name}/vN (one of: "
              f"{', '.join(bundle.list_versions(a.models_dir, name)) or 'none'})", file=sys.stderr)
        return 2
    previous = bundle.get_active(a.models_dir, name)
    bundle.set_active(a.models_dir, name, version)
    print(json.dumps({"name": name, "active_version": version, "previous_version": previous}))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from stpm import bundle
    from stpm.evaluate import evaluate
    from stpm.train import resolve_device
    from stpm.weights import load_model

    path = bundle.resolve(a.models_dir, a.model)
    model, manifest = load_model(path)
    out = Path(a.out or Path("runs") / f"eval-{manifest['name']}-{manifest['version']}")
    device = resolve_device(a.device)
    report = evaluate(model.to(device), manifest, a.data, device, out)
    if not a.no_record:
        manifest = bundle.read_manifest(path)
        manifest.setdefault("metrics", {})[str(Path(a.data).resolve().name)] = {
            "data": str(a.data), "evaluated_at": bundle.utc_now(), **report["metrics"]["overall"],
            "per_defect": report["metrics"]["per_defect"],
        }
        bundle.write_manifest(path, manifest)
    o = report["metrics"]["overall"]
    print(json.dumps({k: o[k] for k in ("image_auroc", "pixel_auroc", "aupro_0.3", "image_f1_max",
                                         "at_calibrated_threshold") if k in o}, indent=2))
    print(f"report: {out / 'report.json'}  pictures: {out / 'index.html'}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from stpm import bundle
    from stpm.imageio import ImageDecodeError, is_image_path
    from stpm.runtime import Scorer

    path = bundle.resolve(a.models_dir, a.model)
    if not (path / "scorer.onnx").is_file():
        print(f"{path} has no scorer.onnx: run `stpm export {a.model}` first", file=sys.stderr)
        return 2
    files: list[Path] = []
    for item in a.images:
        p = Path(item)
        files.extend(sorted(q for q in p.iterdir() if is_image_path(q)) if p.is_dir() else [p])
    scorer = Scorer(path)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for f in files:
        try:
            r = scorer.score([f.read_bytes()], names=[str(f)], map_size="input", overlay=True)[0]
        except (ImageDecodeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        overlay = out / f"{f.stem}_overlay.png"
        overlay.write_bytes(r.overlay_png)
        results.append({"file": str(f), "raw_score": r.raw_score, "score": r.score, "is_anomaly": r.is_anomaly,
                        "threshold": r.threshold, "overlay": str(overlay)})
    report = {"model": f"{scorer.name}/{scorer.version}", "results": results}
    (out / "predictions.json").write_text(json.dumps(report, indent=2))
    for r in results:
        flag = "ANOMALY" if r["is_anomaly"] else "ok"
        print(f"{r['score']:.3f}  {flag:7s}  {r['file']}")
    print(f"wrote {out / 'predictions.json'}")
    return 1 if failed else 0


def _command_of(argv: list[str]) -> str | None:
    """The sub-command in argv (the first word that is not a top-level option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv)).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stpm.bundle import BundleError, ModelNotFoundError, list_models
    from stpm.imageio import DataError

    try:
        return int(args.func(args) or 0)
    except (BundleError, DataError, ValueError, FileNotFoundError) as e:
        hint = ""
        models_dir = getattr(args, "models_dir", None)
        if isinstance(e, ModelNotFoundError) and models_dir is not None:
            hint = f" (models in {models_dir}: {', '.join(list_models(models_dir)) or 'none'})"
        print(f"stpm {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
