"""CPU ms per stage of the full path's decode and render, 512 px bottle PNGs: median of 20 (process time).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/render_stages.py --out benchmarks/results/render_stages.json

decode (stpm.imaging.decode.decode_image), the input's resize to the model's scale (half, as on bottle), the
256 -> 512 map resize, the Turbo overlay blend (OpenCV, and
Pillow's for comparison), and the overlay's
encoding as PNG / JPEG / WebP (stpm.render; PNG also with Python's zlib, the deflate without isal). Prints JSON; with --out, also writes it with the command, the
CPU and its flags, and the load average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stpm.imaging import render  # noqa: E402
from stpm.imaging.decode import decode_image, resize_rgb  # noqa: E402


def cpu_ms(fn, n: int = 20) -> float:
    ts = []
    for i in range(n):
        t0 = time.process_time()
        fn(i)
        ts.append((time.process_time() - t0) * 1e3)
    return round(float(np.median(ts)), 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. benchmarks/results/render_stages.json)")
    a = ap.parse_args()
    load = round(os.getloadavg()[0], 2)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer import cpu_info
    from speed import shared_data

    paths = sorted((shared_data() / "mvtec_ad_bottle_512" / "bottle" / "test").rglob("*.png"))[:20]
    if not paths:
        sys.exit("the bottle test PNGs are needed (../shared/data)")
    data = [p.read_bytes() for p in paths]
    rgb = decode_image(data[0])
    small = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    big = render.resize_map(small, rgb.shape[:2])
    ov = render.overlay(rgb, big)
    jpegs = [render.encode(decode_image(d), "jpeg") for d in data]  # the same images as JPEG (quality 90)
    out = {"image": f"{rgb.shape[1]}x{rgb.shape[0]} PNG", "decode": cpu_ms(lambda i: decode_image(data[i % len(data)])),
           "decode_jpeg": cpu_ms(lambda i: decode_image(jpegs[i % len(jpegs)])),
           "resize_input_to_half": cpu_ms(lambda i: resize_rgb(rgb, (rgb.shape[0] // 2, rgb.shape[1] // 2))),
           "resize_map_256_to_input": cpu_ms(lambda i: render.resize_map(small, rgb.shape[:2])),
           "overlay_blend": cpu_ms(lambda i: render.overlay(rgb, big)),
           "overlay_blend_pillow": cpu_ms(lambda i: render.pillow_overlay(rgb, big))}
    for f in render.FORMATS:
        out[f"encode_{f}"] = cpu_ms(lambda i, f=f: render.encode(ov, f))
    out["encode_png_deflate"] = render.default_deflate()
    out["encode_png_zlib"] = cpu_ms(lambda i: render.png_bytes(ov, "zlib"))
    print(json.dumps(out))
    if a.out:
        record = {"command": " ".join(["benchmarks/render_stages.py", *sys.argv[1:]]), "cpu": cpu_info(),
                  "load_average_at_start": load, "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_ms_median_of_20": out}
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
