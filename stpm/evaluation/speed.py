"""`stpm bench`: torch eager vs ONNX Runtime vs the full scoring path, side by side in one run.

Same images, same model, same thread count for every contender:
  - torch eager (CPU): the fused scorer module (uint8 batch -> map, scores) under torch.no_grad,
  - ONNX Runtime CPU, bare session: `scorer.onnx` on a ready uint8 batch,
  - full path: encoded bytes -> decode -> resize -> score -> heatmap overlay PNG (stpm.runtime.Scorer),
  - optionally ONNX Runtime INT8 (static quantisation calibrated on good images) with its parity.
Also the physical bound: FLOPs of teacher + student per image (torch.utils.flop_counter) over a
measured fp32 GEMM rate (torch.matmul on large square matrices).

The benchmark works on a temporary copy of the bundle, so the bundle itself is never modified.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stpm.bundle.manifest import Manifest
from stpm.bundle.names import INPUT, REJECTED_INT8_ONNX, SCORER_INT8_ONNX, SCORER_ONNX
from stpm.bundle.store import MODEL_REF_HELP
from stpm.runtime.cpu import cpu_name


def timeit(fn: Callable[[], Any], seconds: float, min_iters: int = 5, warmup: int = 2) -> np.ndarray:
    """Call fn repeatedly for about `seconds` (at least min_iters times); -> [iters, 2]: wall ms and
    process CPU ms per call. On a machine shared with other jobs the CPU time of a single-threaded run
    is the stable measure (what a quiet core would take); wall time is what a caller sees."""
    for _ in range(warmup):
        fn()
    lat = []
    t_end = time.perf_counter() + seconds
    while len(lat) < min_iters or time.perf_counter() < t_end:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        lat.append(((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    return np.asarray(lat)


def interleaved(fns: dict[str, Callable[[], Any]], seconds: float, rounds: int = 4,
                min_iters: int = 3) -> dict[str, np.ndarray]:
    """Time several contenders in alternating rounds (each gets seconds / rounds per round), so that
    load from other processes on a shared machine hits them alike; -> latencies in ms per contender."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            out[k].append(timeit(fn, seconds / rounds, min_iters=max(1, min_iters // rounds or 1),
                                 warmup=2 if r == 0 else 0))
    return {k: np.concatenate(v) for k, v in out.items()}


def summarize(lat: np.ndarray, batch: int) -> dict[str, float]:
    wall, cpu = lat[:, 0], lat[:, 1]
    return {
        "batch": batch,
        "iters": len(wall),
        "images_per_s": float(batch * len(wall) / (wall.sum() / 1e3)),
        "ms_per_image": float(wall.mean() / batch),
        "p50_ms": float(np.percentile(wall, 50)),
        "p99_ms": float(np.percentile(wall, 99)),
        "cpu_ms_per_image": float(cpu.mean() / batch),
        "cpu_p50_ms": float(np.percentile(cpu, 50)),
    }


def gemm_rate(n: int = 2048, seconds: float = 3.0) -> dict[str, float]:
    """Measured fp32 matmul rate in GFLOP/s: best wall-clock rate, and the rate per CPU-second
    (= per core; the stable figure on a shared machine)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    lat = timeit(lambda: torch.matmul(a, b), seconds, min_iters=3)
    flop = 2 * n**3
    return {"wall_gflops": flop / (lat[:, 0].min() / 1e3) / 1e9,
            "per_core_gflops": flop / (np.median(lat[:, 1]) / 1e3) / 1e9}


def model_flops(model, image_size: int) -> float:
    """FLOPs (2 x multiply-accumulates) of one tile through a map module (stpm: teacher + student)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def load_images(images_dir: str | Path, n: int) -> list[bytes]:
    from stpm.training.data import list_images

    files = list_images(images_dir, recursive=True)
    if not files:
        raise FileNotFoundError(f"no images under {images_dir}")
    step = max(1, len(files) // n)  # spread over defect types when given an MVTec test folder
    return [p.read_bytes() for p in files[::step][:n]]


@dataclass
class _Setup:
    """What every contender of a run shares: the bundle copy, its torch module, the images."""

    work: Path  # the temporary copy of the bundle (exported if it was not)
    model: Any  # the torch map module
    manifest: Manifest
    size: int  # the model's tile size
    blobs: list[bytes]  # encoded images, at least max(batch_sizes)
    tiles: np.ndarray  # uint8 [N, 3, S, S]: the images squashed to one tile each (the bare graph's input)
    source_size: tuple[int, int]  # (height, width) of the first image
    threads: int


def _setup(bundle_dir: str | Path, tmp: Path, images_dir: str | Path, max_batch: int, threads: int) -> _Setup:
    """Copy the bundle (exported if it was not) and read the images, repeated up to max_batch."""
    from stpm.export import export_bundle, nchw
    from stpm.imaging.decode import decode_image
    from stpm.imaging.geometry import Geometry, tile_images
    from stpm.methods.loading import load_map

    work = tmp / "bundle"
    shutil.copytree(bundle_dir, work)
    model, manifest = load_map(work)
    if SCORER_ONNX not in manifest.export_files:
        export_bundle(work)
        manifest = Manifest.read(work)
    size = manifest.model.image_size
    blobs = load_images(images_dir, max(max_batch, 8))
    while len(blobs) < max_batch:
        blobs = blobs + blobs
    decoded = [decode_image(b) for b in blobs]
    tiles = nchw(tile_images(decoded, Geometry.squash(size)).tiles)
    return _Setup(work, model, manifest, size, blobs, tiles, decoded[0].shape[:2], threads)


def _header(setup: _Setup, images_dir: str | Path, seconds: float, overlay_size: str) -> dict[str, Any]:
    """The result's description of the run: bundle, model, images, machine."""
    import onnxruntime as ort
    import torch

    m = setup.manifest.to_dict()
    return {
        "bundle": setup.manifest.ref,
        "model": {k: m["model"].get(k) for k in ("backbone", "student_backbone", "layers", "image_size", "combine")},
        "images": {"dir": str(images_dir), "n": len(setup.blobs), "source_size": list(setup.source_size)},
        "machine": {
            "cpu": cpu_name(), "cpus": os.cpu_count(), "threads": setup.threads,
            "load_avg_at_start": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "providers_available": ort.get_available_providers(),
        },
        "seconds_per_measurement": seconds,
        "overlay_size": overlay_size,
        "results": {},
    }


def _bound(setup: _Setup) -> dict[str, float]:
    """The physical bound: FLOPs per tile over the measured fp32 GEMM rate (wall, and per core)."""
    flops = model_flops(setup.model, setup.size)
    rate = gemm_rate()
    return {"gflop_per_image": flops / 1e9, "gemm_gflops": rate["wall_gflops"],
            "gemm_gflops_per_core": rate["per_core_gflops"],
            "fp32_bound_ms": flops / (rate["wall_gflops"] * 1e9) * 1e3,
            "fp32_bound_cpu_ms": flops / (rate["per_core_gflops"] * 1e9) * 1e3}  # core-ms: compare with CPU ms


def _overlay_variants(overlay_size: str, size: int) -> dict[str, tuple[int, int] | None]:
    """Full-path contenders -> the overlay's map_size (None: each input's own size)."""
    if overlay_size == "input":
        return {"full_path": None}
    if overlay_size == "model":
        return {"full_path": (size, size)}
    return {"full_path": None, "full_path_model_overlay": (size, size)}


def _int8_session(setup: _Setup, int8_data: str | Path, n_calibration: int) -> tuple[dict[str, Any], Any]:
    """Quantise on the category's good images, check on its test set -> (the int8 record, a session of
    the int8 graph, shipped or not: for timing)."""
    from stpm.export import quantize_int8
    from stpm.imaging.decode import read_image
    from stpm.runtime.sessions import ort_session
    from stpm.training.data import good_train_dir, list_images, test_samples

    train, test = list_images(good_train_dir(int8_data)), test_samples(int8_data)
    cal_files = train[:: max(1, len(train) // n_calibration)][:n_calibration]
    q = quantize_int8(setup.work, [read_image(p) for p in cal_files], [read_image(s.path) for s in test],
                      [s.label for s in test], keep_rejected=True)
    path = setup.work / (SCORER_INT8_ONNX if q["shipped"] else REJECTED_INT8_ONNX)
    return q, ort_session(path, intra_op_threads=setup.threads)


def _measure_batch(setup: _Setup, b: int, contenders: dict[str, Any], variants: dict[str, Any],
                   seconds: float) -> dict[str, dict[str, Any]]:
    """Every contender at batch size b, interleaved -> results keyed "<contender>_b<b>"."""
    import torch

    xb, nb, bl = torch.from_numpy(setup.tiles[:b].copy()), setup.tiles[:b].copy(), setup.blobs[:b]
    timings: dict[str, list[dict[str, float]]] = {k: [] for k in variants}

    def torch_step():
        with torch.inference_mode():
            contenders["torch"](xb)

    def full(key: str, map_size):
        def step():
            timings[key].extend(r.timings for r in contenders["scorer"].score(bl, map_size=map_size, overlay=True))
        return step

    fns = {"torch_eager": torch_step, "ort_cpu": lambda: contenders["scorer"].session.run(nb)}
    fns.update({k: full(k, ms) for k, ms in variants.items()})
    if contenders.get("int8") is not None:
        fns["ort_cpu_int8"] = lambda: contenders["int8"].run(None, {INPUT: nb})
    out = {f"{k}_b{b}": summarize(lat, b) for k, lat in interleaved(fns, seconds).items()}
    for k, map_size in variants.items():
        out[f"{k}_b{b}"]["overlay_size"] = "input" if map_size is None else list(map_size)
        out[f"{k}_b{b}"]["breakdown_ms_per_image"] = {
            m: float(np.mean([t[m] for t in timings[k]])) for m in ("decode_ms", "infer_ms", "render_ms")}
    return out


def _ratios(results: dict[str, Any], batch_sizes: Sequence[int], bound_cpu_ms: float, int8: bool) -> dict[str, float]:
    """Ratios on CPU time (core-ms per image) and the per-core bound: stable under other jobs' load.
    They equal wall-time ratios on a quiet machine for single-threaded runs (threads=1)."""
    b1, key = batch_sizes[0], "cpu_ms_per_image"
    t_ms, o_ms, f_ms = (results[f"{k}_b{b1}"][key] for k in ("torch_eager", "ort_cpu", "full_path"))
    ratios = {
        f"ort_over_torch_b{b1}": o_ms / t_ms,
        f"full_over_ort_b{b1}": f_ms / o_ms,
        f"ort_over_fp32_bound_b{b1}": o_ms / bound_cpu_ms,
        "best_ort_fp32_over_bound": min(results[f"ort_cpu_b{b}"][key] for b in batch_sizes) / bound_cpu_ms,
    }
    if f"full_path_model_overlay_b{b1}" in results:
        ratios[f"full_model_overlay_over_ort_b{b1}"] = results[f"full_path_model_overlay_b{b1}"][key] / o_ms
    if int8:
        ratios["int8_over_fp32_bound_best"] = min(results[f"ort_cpu_int8_b{b}"][key] for b in batch_sizes) / bound_cpu_ms
    return ratios


def run_bench(
    bundle_dir: str | Path,
    images_dir: str | Path,
    batch_sizes: Sequence[int] = (1, 16),
    seconds: float = 8.0,
    threads: int | None = None,
    overlay_size: str = "both",
    int8_data: str | Path | None = None,
    int8_calibration_images: int = 32,
    out_json: str | Path | None = None,
    print_table: bool = True,
) -> dict[str, Any]:
    """Benchmark a bundle on the images in `images_dir`; -> results dict (also written to out_json).

    seconds: measuring time per contender and batch size. threads: intra-op threads for torch and
    ONNX Runtime alike (None: the number of CPUs). overlay_size: "input" (overlay at each image's own
    size), "model" (at the model's image size) or "both" (two full-path contenders). int8_data: an MVTec
    category folder: quantise on its train/good images, then measure decision agreement and AUROC change
    on its test set."""
    import torch

    from stpm.export import fused_scorer
    from stpm.runtime.scorer import Scorer

    if overlay_size not in ("input", "model", "both"):
        raise ValueError(f"overlay_size must be input, model or both, got {overlay_size!r}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="stpm-bench-"))
    try:
        setup = _setup(bundle_dir, tmp, images_dir, max(batch_sizes), threads)
        res = _header(setup, images_dir, seconds, overlay_size)
        res["bound"] = _bound(setup)
        contenders = {"torch": fused_scorer(setup.model, setup.manifest),  # the ONNX Runtime fp32 rows:
                      "scorer": Scorer(setup.work, providers=("cpu",), intra_op_threads=threads,
                                       max_batch=max(batch_sizes), backend="onnxruntime", precision="fp32")}
        if int8_data is not None:
            res["int8"], contenders["int8"] = _int8_session(setup, int8_data, int8_calibration_images)
        variants = _overlay_variants(overlay_size, setup.size)
        for b in batch_sizes:
            res["results"].update(_measure_batch(setup, b, contenders, variants, seconds))
        res["ratios_basis"] = "CPU time per image; bound per core"
        res["ratios"] = _ratios(res["results"], batch_sizes, res["bound"]["fp32_bound_cpu_ms"], int8_data is not None)
        res["machine"]["load_avg_at_end"] = list(os.getloadavg())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(res, indent=2) + "\n")
    if print_table:
        print(format_table(res))
    return res


def format_table(res: dict[str, Any]) -> str:
    """Markdown table of the results (also used for docs/BENCHMARKS.md)."""
    lines = [
        "| contender | batch | images/s | ms/image | p50 ms (batch) | p99 ms (batch) | CPU ms/image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in res["results"].items():
        name = key.rsplit("_b", 1)[0]
        lines.append(f"| {name} | {r['batch']} | {r['images_per_s']:.1f} | {r['ms_per_image']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_ms_per_image']:.1f} |")
    b = res["bound"]
    lines.append("")
    lines.append(f"teacher + student: {b['gflop_per_image']:.2f} GFLOP/image; measured fp32 GEMM "
                 f"{b['gemm_gflops']:.0f} GFLOP/s wall ({b['gemm_gflops_per_core']:.0f} per core-second) -> fp32 bound "
                 f"{b['fp32_bound_ms']:.1f} ms/image wall, {b['fp32_bound_cpu_ms']:.1f} core-ms/image")
    lines.append(f"ratios ({res.get('ratios_basis', 'wall')}): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    for key, r in res["results"].items():
        if "breakdown_ms_per_image" in r:
            bd = r["breakdown_ms_per_image"]
            lines.append(f"{key}: decode+resize {bd['decode_ms']:.1f} ms, infer {bd['infer_ms']:.1f} ms, "
                         f"render (overlay PNG at {r['overlay_size']} size) {bd['render_ms']:.1f} ms per image")
    if "int8" in res:
        q = res["int8"]
        lines.append(f"int8: decision agreement {q['decision_agreement']:.4f} on {q['n_check_images']} test images, "
                     f"AUROC fp32 {q.get('auroc_fp32', float('nan')):.4f} -> int8 {q.get('auroc_int8', float('nan')):.4f}, "
                     f"shipped: {q['shipped']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_REF_HELP)
    p.add_argument("images", help="folder of images to score (e.g. an MVTec category's test folder)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per contender and batch size")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all CPUs)")
    p.add_argument("--overlay-size", choices=("input", "model", "both"), default="both",
                   help="overlay PNG at each image's size, at the model's size, or both (two contenders)")
    p.add_argument("--int8-data", default=None, help="MVTec category folder: try static INT8 and measure parity")
    p.add_argument("--json", default=None, help="write the results here")


def main(args: argparse.Namespace) -> int:
    from stpm.bundle import locate

    path = locate(args.models_dir, args.model)
    run_bench(path, args.images, tuple(int(b) for b in args.batch_sizes.split(",")), args.seconds,
              args.threads, args.overlay_size, args.int8_data, out_json=args.json)
    return 0
