"""Memory benchmark of /score (not a test): peak RSS of the server for the largest requests the pixel
budget accepts, and for the request issue 14 found (32 images of 6300 x 6300 in one 3.7 MB request).

Starts `python -m app.serve` (uvicorn, one worker, CPU provider, default limits unless given) on
127.0.0.1. Before each request the server's peak-RSS counter is reset (`/proc/PID/clear_refs` = 5);
after it the peak (VmHWM) and the resident size (VmRSS) are read. Writes benchmarks/results/memory.json
and prints its Markdown (benchmarks/report.py); the default --out also rewrites its block of
docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --max-request-pixels 60000000   # another budget

Without --models-dir a random-init ResNet18 bundle is built once into /tmp/stpm-load-models (memory
does not depend on the weights). The images are the real MVTec bottle photo (../shared/data) scaled
up, with noise so that the heatmap PNGs do not compress to nothing, saved as JPEG (each under the
20 MiB per-file limit); without the data a random 512 px image stands in.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from load import build_models, serve, test_image  # benchmarks/load.py
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stpm.imaging.decode import DEFAULT_MAX_PIXELS


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def photo(side_w: int, side_h: int, seed: int) -> bytes:
    """The real test photo scaled to side_w x side_h, with mild noise, as JPEG (quality 80)."""
    _, data = test_image()
    base = Image.open(io.BytesIO(data)).convert("RGB").resize((side_w, side_h), Image.BILINEAR)
    arr = np.asarray(base).astype(np.int16)
    rng = np.random.default_rng(seed)
    arr = np.clip(arr + rng.integers(-6, 7, arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def solid_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def side_for(pixels: int) -> int:
    return int(pixels ** 0.5)


def cases(max_pixels: int, budget: int, max_files: int) -> list[dict]:
    """The largest accepted requests of each shape, and the refused amplification request."""
    big = side_for(max_pixels)  # the largest image the per-image limit accepts
    n_big = max(1, budget // (big * big))
    per_img_32 = side_for(budget // max_files)
    per_img_32_overlay = side_for(budget // (2 * max_files))
    return [
        {"label": f"1 x {big}x{big}, heatmap=both (input size)", "n": 1, "w": big, "h": big,
         "params": {"heatmap": "both"}, "expect": 200 if 3 * big * big <= budget else 413},
        {"label": f"{n_big} x {big}x{big}, heatmap=none", "n": n_big, "w": big, "h": big,
         "params": {"heatmap": "none"}, "expect": 200},
        {"label": f"{max_files} x {per_img_32}x{per_img_32}, heatmap=none", "n": max_files, "w": per_img_32,
         "h": per_img_32, "params": {"heatmap": "none"}, "expect": 200},
        {"label": f"{max_files} x {per_img_32_overlay}x{per_img_32_overlay}, heatmap=overlay", "n": max_files,
         "w": per_img_32_overlay, "h": per_img_32_overlay, "params": {"heatmap": "overlay"}, "expect": 200},
        {"label": f"{max_files} x 6300x6300 solid PNGs (the issue's request), heatmap=none", "n": max_files,
         "w": 6300, "h": 6300, "solid": True, "params": {"heatmap": "none"}, "expect": 413},
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--max-request-pixels", type=int, default=None, help="default: the server's default")
    ap.add_argument("--intra-op-threads", type=int, default=1)
    ap.add_argument("--cases", type=int, nargs="+", default=None, help="run only these cases (0-based)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = ap.parse_args()

    from app.settings import Settings

    defaults = Settings(_env_file=None)
    budget = args.max_request_pixels or getattr(defaults, "max_request_pixels", 3 * DEFAULT_MAX_PIXELS)
    models_dir = args.models_dir or Path("/tmp/stpm-load-models")
    models_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_models(models_dir, args.image_size)

    results = []
    env = {"STPM_INTRA_OP_THREADS": str(args.intra_op_threads), "STPM_MAX_REQUEST_PIXELS": str(budget),
           "STPM_TRAIN_ENABLED": "false"}
    with serve(models_dir, model, env) as (url, proc):
        with httpx.Client(base_url=url, timeout=600) as c:
            c.post("/score", files=[("files", ("warm.jpg", photo(512, 512, 0), "image/jpeg"))])
            idle = proc_status(proc.pid)["VmRSS"]
            print(f"idle RSS {idle:.0f} MB; budget {budget} pixels", flush=True)
            for i, case in enumerate(cases(defaults.max_pixels, budget, defaults.max_files)):
                if args.cases is not None and i not in args.cases:
                    continue
                blobs = ([solid_png(case["w"])] * case["n"] if case.get("solid") else
                         [photo(case["w"], case["h"], i) for i in range(case["n"])])
                files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
                sent = sum(len(b) for b in blobs)
                before = proc_status(proc.pid)["VmRSS"]
                reset_peak(proc.pid)
                t0 = time.perf_counter()
                r = c.post("/score", files=files, params=case["params"])
                dt = time.perf_counter() - t0
                status, body = r.status_code, len(r.content)
                del r  # the client's copy of the answer
                time.sleep(0.5)
                st = proc_status(proc.pid)
                row = {"case": case["label"], "status": status, "expected": case["expect"],
                       "request_mb": round(sent / 2**20, 1), "response_mb": round(body / 2**20, 1),
                       "seconds": round(dt, 2), "rss_before_mb": round(before), "peak_rss_mb": round(st["VmHWM"]),
                       "rss_after_mb": round(st["VmRSS"]),
                       "pixels": case["n"] * case["w"] * case["h"]}
                results.append(row)
                print(json.dumps(row), flush=True)
                del blobs, files
    load = os.getloadavg()
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1_5_15": [round(x, 2) for x in load]},
        "settings": {"max_request_pixels": budget, "max_pixels": defaults.max_pixels,
                     "max_files": defaults.max_files, "max_upload_bytes": defaults.max_upload_bytes,
                     "intra_op_threads": args.intra_op_threads, "model_image_size": args.image_size},
        "idle_rss_mb": round(idle),
        "cases": results,
        "worst_accepted_peak_rss_mb": max((r["peak_rss_mb"] for r in results if r["status"] == 200), default=None),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}\n")
    from benchmarks import report
    from benchmarks.report_speed import memory_markdown

    print(memory_markdown(out))
    report.publish(args.out, out)
    bad = [r for r in results if r["status"] != r["expected"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
