"""PNG encoding of a served overlay: stpm.render.png_bytes (numpy "Up" filter, then ISA-L's deflate at level 1,
the default where the isal package is installed, or Python's zlib at level 1 with the RLE strategy, the
encoder before and without isal) vs Pillow at compress_level 1 and at its default (6), on real overlays (MVTec bottle test photos at 512 px,
with a heatmap of their own pixels' distance from the image mean: smooth like a real anomaly map).

    .venv/bin/python benchmarks/png_encode.py [--images 8] [--repeats 5]

Writes benchmarks/results/png_encode.json and the generated block `png_encode` of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.peer import cpu_info  # noqa: E402
from benchmarks.report_speed import png_encode_markdown  # noqa: E402
from stpm.imaging.decode import read_image  # noqa: E402
from stpm.imaging.render import default_deflate, overlay, png_bytes  # noqa: E402


def overlays(data: Path, n: int) -> list[np.ndarray]:
    paths = sorted((data / "test" / "broken_large").glob("*.png"))[:n]
    out = []
    for p in paths:
        rgb = read_image(p)
        d = np.linalg.norm(rgb.astype(np.float32) - rgb.reshape(-1, 3).mean(0), axis=2)
        out.append(overlay(rgb, d / max(float(d.max()), 1e-6)))
    return out


def time_ms(fn, arrays: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """Median ms per image over `repeats` passes, and the mean encoded size in kB."""
    per_pass = []
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        size = sum(len(fn(a)) for a in arrays)
        per_pass.append((time.perf_counter() - t0) * 1000 / len(arrays))
    return statistics.median(per_pass), size / len(arrays) / 1000


def pillow(level: int):
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    return encode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mvtec_ad_bottle_512" / "bottle"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "png_encode.json"))
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    arrays = overlays(Path(a.data), a.images)
    if not arrays:
        raise SystemExit(f"no test images under {a.data}")
    load0 = os.getloadavg()[0]
    rows = []
    ours = [("stpm.render.png_bytes, ISA-L level 1 (the default)", lambda x: png_bytes(x, "isal"))] \
        if default_deflate() == "isal" else []
    for name, fn in (*ours, ("stpm.render.png_bytes, zlib level 1, RLE (without isal)", lambda x: png_bytes(x, "zlib")),
                     ("Pillow compress_level=1", pillow(1)), ("Pillow compress_level=6 (default)", pillow(6))):
        ms, kb = time_ms(fn, arrays, a.repeats)
        rows.append({"encoder": name, "ms_per_image": ms, "kb_per_image": kb})
        print(f"{name}: {ms:.1f} ms, {kb:.0f} kB", flush=True)
    res = {
        "command": ".venv/bin/python benchmarks/png_encode.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "cpu_info": cpu_info(),
                    "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg()[0],
                    "pillow": Image.__version__, "numpy": np.__version__},
        "images": {"n": len(arrays), "shape": list(arrays[0].shape), "source": "MVTec bottle test/broken_large"},
        "repeats": a.repeats, "rows": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    if not a.no_doc:
        report.publish(out, res)
    print(png_encode_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
