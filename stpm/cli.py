"""`stpm train | calibrate | eval | export | predict | activate | bench | serve | worker | distill`.

The modules behind `export`, `bench` and `distill` are imported only when that command runs
(`build_parser(command)`); `serve` and `worker` belong to the service, which registers them through the
entry-point group `stpm.commands` (stpm never imports app). `stpm serve`, the Docker entry point, must
not pay for torch."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from stpm.runtime.sessions import BACKENDS, PRECISIONS
from stpm.bundle.names import EVALUATIONS, SCORER_ONNX
from stpm.bundle.store import MODEL_REF_HELP
from stpm.options import add_arguments as add_training_options

PREDICT_DEVICES = ("auto", "cpu", "cuda", "tensorrt")
STORE_COMMANDS = ("export", "bench")  # module commands that take --models-dir
COMMANDS_GROUP = "stpm.commands"  # entry points: commands other packages add (app: serve, worker)


def _models_dir(p: argparse.ArgumentParser) -> None:
    from stpm.bundle import default_models_dir

    p.add_argument("--models-dir", default=default_models_dir(), help="model store (env STPM_MODELS_DIR, default models/)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI. `command`: the sub-command about to run; only its module is imported (None: none)."""
    parser = argparse.ArgumentParser(prog="stpm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_command(sub)
    _calibrate_command(sub)
    _eval_command(sub)
    _module_command(sub, command, "export", "write teacher.onnx, student.onnx and the fused scorer.onnx",
                    _export_module)
    _predict_command(sub)
    p = sub.add_parser("activate", help="make a version the one its name serves (NAME/vN)")
    p.add_argument("model", help="NAME/VERSION, e.g. bottle/v3")
    _models_dir(p)
    p.set_defaults(func=cmd_activate)
    _module_command(sub, command, "bench", "speed benchmark: torch eager vs ONNX Runtime vs the full path",
                    _bench_module)
    _registered_commands(sub, command)  # serve, worker: the service (app/) registers them
    _distill_command(sub, command)
    return parser


def _train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a model on good images (PatchCore by default, or an STPM student), "
                                     "choose its settings on synthetic anomalies, calibrate, export and publish a "
                                     "version")
    p.add_argument("data", help="MVTec category folder (uses train/good) or a folder of good images")
    p.add_argument("--name", required=True, help="model name in the store")
    _models_dir(p)
    p.add_argument("--weights-dir", default=None, help="directory of weight files (env STPM_WEIGHTS_DIR)")
    p.add_argument("--run-dir", default=None, help="checkpoint folder of a training loop (default runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and report them")
    p.add_argument("--no-export", action="store_true", help="do not write the ONNX files")
    p.add_argument("--activate", action="store_true",
                   help="make the new version the active one (the first version of a new name always is)")
    add_training_options(p)  # generated from the option models (stpm.options, torch-free)
    p.set_defaults(func=cmd_train)


def _calibrate_command(sub: argparse._SubParsersAction) -> None:
    from stpm.options.table import training_options

    p = sub.add_parser("calibrate", help="publish a new version of a model with only its threshold changed: from "
                                         "new good images, or from the held-out scores it recorded")
    p.add_argument("model", help=MODEL_REF_HELP)
    p.add_argument("data", nargs="?", default=None,
                   help="good images the model has not seen (a folder, or an MVTec category: its train/good); "
                        "omitted: the held-out scores the model's calibration recorded")
    _models_dir(p)
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--activate", action="store_true", help="make the new version the active one")
    add_training_options(p, [o for o in training_options() if o.section == "calibration"])
    p.set_defaults(func=cmd_calibrate)


def _eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on an MVTec-layout test set")
    p.add_argument("model", help=MODEL_REF_HELP)
    p.add_argument("data", help="MVTec category folder (uses test/ and ground_truth/)")
    _models_dir(p)
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--out", default=None, help="report folder (default runs/eval-NAME-VERSION)")
    p.add_argument("--no-record", action="store_true",
                   help=f"do not record the metrics in the version's {EVALUATIONS} (the manifest is never changed)")
    p.set_defaults(func=cmd_eval)


def _predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score images; write overlays and a JSON")
    p.add_argument("model", help=MODEL_REF_HELP)
    p.add_argument("images", nargs="+", help="image files or folders")
    _models_dir(p)
    p.add_argument("--device", default="auto", choices=PREDICT_DEVICES,
                   help="ONNX Runtime execution provider: auto (TensorRT, CUDA, then CPU: what is installed), "
                        "cpu, cuda or tensorrt (default auto)")
    p.add_argument("--backend", default=None, choices=("auto", *BACKENDS),
                   help="inference backend (default $STPM_BACKEND, else auto: the fastest on this machine)")
    p.add_argument("--precision", default=None, choices=("auto", *PRECISIONS),
                   help="fp32, or a lower precision the bundle records as holding parity (default "
                        "$STPM_PRECISION, else auto); one it lacks falls back to fp32 with a warning")
    p.add_argument("--out", default="predictions", help="output folder")
    p.set_defaults(func=cmd_predict)


def _distill_command(sub: argparse._SubParsersAction, command: str | None) -> None:
    distill_help = "classifier knowledge distillation"
    if command != "distill":
        _placeholder(sub.add_parser("distill", help=distill_help))
        return
    try:
        from stpm.distill import cli as distill_cli

        distill_cli.register(sub)
    except ImportError as e:
        _mark_unavailable(sub.add_parser("distill", help=distill_help), "distill", e)


def _placeholder(p: argparse.ArgumentParser) -> None:
    """A listed command whose module is not imported (another command runs)."""
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _export_module() -> ModuleType:
    from stpm.export import cli

    return cli


def _bench_module() -> ModuleType:
    from stpm.evaluation import speed

    return speed


def _module_command(sub: argparse._SubParsersAction, command: str | None, name: str, help: str,
                    load: Callable[[], ModuleType]) -> None:
    """A sub-command implemented by the module `load()` imports (its add_arguments + main), imported
    only when `command` is `name` (a deferred import the import contracts see, not a name in a string).
    If the module cannot be imported (e.g. torch absent in a scoring-only install), the command stays
    listed and says why."""
    p = sub.add_parser(name, help=help)
    if command != name:
        _placeholder(p)
        return
    try:
        mod = load()
    except ImportError as e:
        _mark_unavailable(p, name, e)
        return
    if name in STORE_COMMANDS:
        _models_dir(p)
    mod.add_arguments(p)
    p.set_defaults(func=mod.main)


def _registered_commands(sub: argparse._SubParsersAction, command: str | None) -> None:
    """The commands of the `stpm.commands` entry-point group, by name: each entry point is a
    `register(sub)` that adds its sub-command. Its module is imported when that command runs or the
    commands are listed (`command` None), not when another one runs. One whose module cannot be imported
    (e.g. the service's dependencies absent) stays listed and says why."""
    for ep in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if command is not None and command != ep.name:
            _placeholder(sub.add_parser(ep.name))
            continue
        try:
            register = ep.load()
        except ImportError as e:
            _mark_unavailable(sub.add_parser(ep.name, help=f"not available in this installation ({e})"), ep.name, e)
            continue
        register(sub)


def _mark_unavailable(p: argparse.ArgumentParser, name: str, e: ImportError) -> None:
    """Any arguments are accepted so the user sees why the command is missing, not a usage error."""
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: _unavailable(name, e))


def _unavailable(what: str, e: Exception) -> int:
    print(f"stpm {what}: not available in this installation ({e})", file=sys.stderr)
    return 2


def cmd_train(a: argparse.Namespace) -> int:
    from stpm import bundle
    from stpm.bundle.manifest import Manifest
    from stpm.options import from_args
    from stpm.training.pipeline import run_training

    run_dir = Path(a.run_dir or Path("runs") / a.name)
    out = run_training(a.data, a.name, a.models_dir, from_args(a), run_dir=run_dir, weights_dir=a.weights_dir,
                       skip_bad=a.skip_bad, resume=a.resume, export=not a.no_export)
    for p, reason in out.skipped:
        print(f"skipped {p}: {reason}", file=sys.stderr)
    if out.version is None:
        print(f"interrupted after {out.fitted.record.get('epochs_run', 0)} epoch(s); checkpoint kept in {run_dir}. "
              f"Continue with: stpm train {a.data} --name {a.name} --resume", file=sys.stderr)
        return 130
    if a.activate:
        bundle.set_active(a.models_dir, a.name, out.version)
    manifest = Manifest.read(out.path)
    cal = manifest.calibration
    summary = {"model": manifest.ref, "path": str(out.path), "method": manifest.method, **out.fitted.summary,
               "sigma": manifest.model.sigma, "image_score": manifest.model.image_score,
               "threshold": cal.threshold, "good_scores": cal.good_stats, "seconds": round(out.fitted.seconds, 1),
               "tiling": manifest.geometry.to_dict()}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from stpm.options.table import build, training_options
    from stpm.training.recalibration import calibrate_bundle

    cfg = build({o.name: getattr(a, o.name) for o in training_options() if o.section == "calibration"}).calibration
    out = calibrate_bundle(a.models_dir, a.model, a.data, cfg, device=a.device, activate=a.activate)
    cal = out.calibration
    print(json.dumps({"model": f"{Path(out.path).parent.name}/{out.version}", "path": str(out.path),
                      "previous": {"threshold": out.previous.threshold, "rule": out.previous.method,
                                   "expected_fpr": out.previous.expected_fpr},
                      "calibration": cal.expectation()}, indent=2))
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
    from stpm.evaluation.report import evaluate, format_operating_points
    from stpm.methods.loading import load_map
    from stpm.training.reproducible import resolve_device

    path = bundle.locate(a.models_dir, a.model)
    amap, manifest = load_map(path)
    out = Path(a.out or Path("runs") / f"eval-{manifest.name}-{manifest.version}")
    device = resolve_device(a.device)
    report = evaluate(amap.to(device), manifest, a.data, device, out)
    if not a.no_record:
        bundle.record_evaluation(path, str(Path(a.data).resolve().name), {
            "data": str(a.data), "evaluated_at": bundle.utc_now(), **report["metrics"]["overall"],
            "per_defect": report["metrics"]["per_defect"],
            "operating_points": report["decision"]["operating_points"],  # GET /models shows them with the rest
        })
    o = report["metrics"]["overall"]
    decision = {k: v for k, v in report["decision"].items() if k != "operating_points"}  # a table below
    print(json.dumps({**{k: o[k] for k in ("image_auroc", "pixel_auroc", "aupro_0.3", "image_f1_max") if k in o},
                      "decision": decision}, indent=2))
    if report["decision"]["operating_points"]:
        print(format_operating_points(report["decision"]["operating_points"]))
    print(f"report: {out / 'report.json'}  pictures: {out / 'index.html'}"
          + ("" if a.no_record else f"  recorded in: {path / EVALUATIONS}"))
    return 0


def overlay_stems(files: list[Path]) -> dict[Path, str]:
    """A distinct overlay name per input file (keyed by its absolute path): its stem; where names collide, the
    extension for files of one folder (000.png beside 000.jpg: 000_png, 000_jpg), the folders above it for
    files of different folders (test/good/000.png beside test/crack/000.png: good__000, crack__000), and a
    counter if that is not enough. The same file given twice has one name."""
    unique = list(dict.fromkeys(f.absolute() for f in files))
    level = dict.fromkeys(unique, 0)  # folders named above the stem
    extension = dict.fromkeys(unique, False)

    def name(f: Path) -> str:
        up = f.parent.parts[1:]  # without the root
        up = up[len(up) - min(level[f], len(up)):]
        return "__".join([*up, f.stem]) + (f"_{f.suffix.lstrip('.')}" if extension[f] else "")

    for _ in range(64):
        names = {f: name(f) for f in unique}
        groups: dict[str, list[Path]] = {}
        for f in unique:
            groups.setdefault(names[f], []).append(f)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return names
        for group in clashes:
            for f in group:
                if not extension[f] and any(g.parent == f.parent for g in group if g != f):
                    extension[f] = True
                else:
                    level[f] += 1
    seen: Counter[str] = Counter()  # names that still collide after 64 rounds: number them
    for f in unique:
        seen[names[f]] += 1
        if seen[names[f]] > 1:
            names[f] += f"-{seen[names[f]]}"
    return names


def cmd_predict(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stpm import bundle
    from stpm.api import load
    from stpm.imaging.decode import ImageDecodeError, is_image_path

    path = bundle.locate(a.models_dir, a.model)
    if not (path / SCORER_ONNX).is_file():
        print(f"{path} has no {SCORER_ONNX}: run `stpm export {a.model}` first", file=sys.stderr)
        return 2
    files: list[Path] = []
    for item in a.images:
        p = Path(item)
        files.extend(sorted(q for q in p.iterdir() if is_image_path(q)) if p.is_dir() else [p])
    names = overlay_stems(files)
    scorer = load(path, device=a.device, backend=a.backend, precision=a.precision)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for f in tqdm(files, desc="predict", unit="image", disable=None):  # a bar on a terminal only
        try:
            r = scorer.score([f], map_size="input", overlay=True)[0]
        except ImageDecodeError as e:
            tqdm.write(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        overlay = out / f"{names[f.absolute()]}_overlay.png"
        overlay.write_bytes(r.overlay_image)
        results.append({"file": str(f), "raw_score": r.raw_score, "score": r.score, "is_anomaly": r.is_anomaly,
                        "threshold": r.threshold, "overlay": str(overlay)})
    report = {"model": f"{scorer.name}/{scorer.version}", "providers": scorer.providers,
              "backend": scorer.backend, "precision": scorer.precision,
              "selection": scorer.selection.to_dict(), "results": results}
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
    from stpm.imaging.decode import DataError

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
