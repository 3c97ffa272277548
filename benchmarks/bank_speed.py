"""Speed per memory-bank size on the fp32 path (issue 26): the exported scorer (stpm.runtime.Scorer) forced to
fp32 on ONNX Runtime and on OpenVINO (f32 inference precision, set explicitly), side by side in one run:

    .venv/bin/python benchmarks/bank_speed.py --bundles /tmp/bank-bundles --rounds 6 --per-round 10

The bundles are the bottle banks benchmarks/bank_size.py --bundles published (same teacher, geometry and
sigma; only the bank differs); `--pattern` picks other bundles side by side, e.g. the default and `--mirrors hv`
on bottle (benchmarks/results/mirrors_speed.json):

    .venv/bin/python benchmarks/bank_speed.py --bundles /tmp/mspeed --pattern 'bottle-*/v1' \
        --out benchmarks/results/mirrors_speed.json

Inputs: the bottle test PNGs at 512 px, batch 1. Per bundle and backend:
the full path (file bytes -> score + overlay at 512 px, PNG and JPEG, as benchmarks/peer.py times it) and
the bare `Scorer.infer` on a ready uint8 tile. All scorers live in this one process, loaded and warmed
once; rounds are interleaved (each round runs every contender for --per-round images, in a rotating
order) so all see the same load. Per image: wall ms and the process's CPU ms (one contender runs at a
time). On a CPU with bf16 (AMX), fp32 forced is the proxy for a CPU without bf16: the same kernels' f32
paths (AVX-512 here; an AVX2-only CPU runs them slower). Writes benchmarks/results/bank_speed.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peer import cpu_info, pct  # noqa: E402
from benchmarks.speed import shared_data  # noqa: E402

BACKENDS = {"onnxruntime": {"backend": "onnxruntime", "providers": ("CPUExecutionProvider",)},
            "openvino": {"backend": "openvino"}}
PATHS = ("full_png", "full_jpeg", "bare_infer")


def contenders(bundle: Path, backend: str) -> tuple[dict[str, Callable[[Path], float]], dict]:
    """path name -> predict(image path) for one bundle on one backend at fp32, and what the scorer chose."""
    from safetensors import safe_open

    from stpm.bundle.names import MEMORY_BANK_WEIGHTS
    from stpm.runtime.scorer import Scorer

    s = Scorer(bundle, precision="fp32", fall_back_to_fp32=False, **BACKENDS[backend])
    with safe_open(str(bundle / MEMORY_BANK_WEIGHTS), "np") as f:
        rows = int(f.get_slice("bank").get_shape()[0])
    info = {"backend": s.backend, "precision": s.precision, "reason": s.selection.reason, "bank_rows": rows,
            "mirrors": s.manifest.model.mirrors}
    tile = np.random.default_rng(0).integers(0, 256, (1, 3, s.image_size, s.image_size), dtype=np.uint8)

    def full(fmt: str) -> Callable[[Path], float]:
        def predict(path: Path) -> float:
            r = s.score([path.read_bytes()], overlay=True, heatmap_format=fmt)[0]
            assert r.overlay_image is not None
            return r.raw_score
        return predict

    return {"full_png": full("png"), "full_jpeg": full("jpeg"),
            "bare_infer": lambda path: float(s.infer(tile)[1][0])}, info


def _order(bundle: Path) -> tuple[int, str]:
    """bottle-bankN: the largest bank first; other names in name order."""
    name = bundle.parent.name
    rows = name.removeprefix("bottle-bank")
    return (-int(rows), name) if rows.isdigit() else (0, name)


def timed(predict: Callable[[Path], float], images: list[Path], start: int, n: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for i in range(start, start + n):
        w0, c0 = time.perf_counter(), time.process_time()
        predict(images[i % len(images)])
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True, help="folder of bottle-bankN/v1 bundles (benchmarks/bank_size.py)")
    ap.add_argument("--pattern", default="bottle-bank*/v1", help="which bundles under --bundles (a glob)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bank_speed.json"))
    a = ap.parse_args()
    images = sorted((shared_data() / "mvtec_ad_bottle_512" / "bottle" / "test").rglob("*.png"))
    bundles = sorted(Path(a.bundles).glob(a.pattern), key=_order)
    if not images or not bundles:
        sys.exit(f"no images ({len(images)}) or no bundles under {a.bundles} ({len(bundles)})")
    predictors, infos = {}, {}
    for b in bundles:
        for backend in BACKENDS:
            fns, info = contenders(b, backend)
            for path, fn in fns.items():
                key = f"{b.parent.name}/{backend}/{path}"
                predictors[key], infos[key] = fn, info
                timed(fn, images, 0, 3)  # warm-up
    keys = list(predictors)
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    loads = []
    for r in range(a.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        shift = r * len(keys) // a.rounds
        for k in keys[shift:] + keys[:shift]:
            w, c = timed(predictors[k], images, r * a.per_round, a.per_round)
            wall[k] += w
            cpu[k] += c
        print(f"round {r + 1}/{a.rounds} load {loads[-1]}", file=sys.stderr, flush=True)
    rows = {k: {"p50_ms": pct(wall[k], 50), "p95_ms": pct(wall[k], 95), "cpu_p50_ms": pct(cpu[k], 50),
                "n": len(wall[k]), "info": infos[k]} for k in keys}
    out = {"command": " ".join(["benchmarks/bank_speed.py", *sys.argv[1:]]), "cpu": cpu_info(),
           "load_average_per_round": loads, "load_average_end": [round(x, 2) for x in os.getloadavg()],
           "images": f"{len(images)} PNGs, first {images[0]}", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for k in keys:
        print(f"{k:45s} p50 {rows[k]['p50_ms']:8.2f}  p95 {rows[k]['p95_ms']:8.2f}  cpu {rows[k]['cpu_p50_ms']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
