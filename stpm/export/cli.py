"""`stpm export MODEL`: write the ONNX graphs of a bundle, check them against torch, and optionally check
bf16 and quantise to int8 on a labelled MVTec test set."""

from __future__ import annotations

import argparse
import json

from stpm import bundle
from stpm.export.onnx import export_bundle
from stpm.export.parity import DEFAULT_ATOL, ExportParityError, tile_check_images
from stpm.export.precision import check_bf16, quantize_int8
from stpm.bundle.manifest import Manifest
from stpm.bundle.store import MODEL_REF_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_REF_HELP)
    p.add_argument("--fp16", action="store_true", help="also write scorer_fp16.onnx (for GPUs)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check-dir", default=None, help="folder of real images for the parity check")
    p.add_argument("--check-count", type=int, default=8)
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="tolerance in normalised score units")
    p.add_argument("--int8-data", default=None,
                   help="MVTec category folder: also quantise to INT8 (calibrated on train/good), shipped "
                        "only if decisions and AUROC on its test set hold")
    p.add_argument("--int8-calibration-images", type=int, default=32)
    p.add_argument("--int8-engine", choices=("onnxruntime", "nncf"), default="nncf",
                   help="int8 quantiser: NNCF (run on OpenVINO) or ONNX Runtime's quantize_static")
    p.add_argument("--precisions", default="bf16",
                   help="lower precisions to check against fp32 and record ('bf16' or '' for none); with "
                        "--int8-data, bf16 is checked on that folder's labelled test set too")


def _check_images(path, check_dir: str | None, count: int):
    """The --check-dir images (None: the export's synthetic ones); one the geometry cannot cover is an
    error naming its file."""
    from stpm.imaging.decode import read_image
    from stpm.training.data import list_images

    if not check_dir:
        return None
    files = list_images(check_dir, recursive=True)[:count]
    imgs = [read_image(f) for f in files]
    tile_check_images(imgs, Manifest.read(path).geometry, names=[str(f) for f in files])
    return imgs


def _lower_precisions(path, int8_data: str, n_calibration: int, engine: str, bf16: bool) -> None:
    """bf16 (if asked) and int8 on the labelled test set of an MVTec category, calibrated on its good images."""
    from stpm.imaging.decode import read_image
    from stpm.training.data import good_train_dir, list_images, test_samples

    train, test = list_images(good_train_dir(int8_data)), test_samples(int8_data)
    calibration = train[:: max(1, len(train) // n_calibration)][:n_calibration]
    test_imgs = [read_image(s.path) for s in test]
    labels = [s.label for s in test]
    if bf16:
        print(json.dumps(check_bf16(path, test_imgs, labels), indent=2))
    q = quantize_int8(path, [read_image(p) for p in calibration], test_imgs, labels, engine=engine)
    print(json.dumps(q, indent=2))


def main(args: argparse.Namespace) -> int:
    path = bundle.locate(args.models_dir, args.model)
    precisions = tuple(x for x in args.precisions.split(",") if x)
    try:
        ex = export_bundle(path, fp16=args.fp16, opset=args.opset, atol=args.atol, precisions=precisions,
                           check_images=_check_images(path, args.check_dir, args.check_count))
    except ExportParityError as e:
        print(f"export failed: {e}")
        print(json.dumps(e.report, indent=2))
        return 1
    print(f"exported {path}: {', '.join(ex['files'])}")
    print(json.dumps(ex["parity"], indent=2))
    if args.int8_data:
        _lower_precisions(path, args.int8_data, args.int8_calibration_images, args.int8_engine, "bf16" in precisions)
    return 0


__all__ = ["add_arguments", "main"]
