"""Speed benchmark: torch eager vs ONNX Runtime vs the full scoring path; writes the "Speed" section.

    .venv/bin/python benchmarks/speed.py                      # resnet18 STPM at 256 px (weights random: speed only)
    .venv/bin/python benchmarks/speed.py --bundle models/bottle/v1 --int8-data ../shared/data/mvtec_ad_bottle_512/bottle

Without --bundle it builds a resnet18 teacher + student bundle at 256 px with random weights (speed does
not depend on the weights); INT8 parity needs a trained bundle (--bundle) and labelled data (--int8-data).
Results go to benchmarks/results/speed[-NAME].json and the "## Speed" section of docs/BENCHMARKS.md
(only that section is rewritten; other sections are left alone).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shared_data() -> Path:
    env = os.environ.get("STPM_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def speed_bundle(models_dir: Path, image_size: int = 256) -> Path:
    """resnet18 teacher + student (random weights), calibrated on a few random images, exported."""
    import numpy as np
    import torch

    from stpm.calibrate import calibrate
    from stpm.config import ModelConfig
    from stpm.export import export_bundle
    from stpm.loss import anomaly_map, image_score
    from stpm.model import build_stpm
    from stpm.publish import build_manifest, publish_model

    cfg = ModelConfig(backbone="resnet18", pretrained=False, image_size=image_size)
    model, _ = build_stpm(cfg, seed=0)
    model.eval()
    with torch.no_grad():
        t, s = model(torch.rand(4, 3, image_size, image_size))
        scores = image_score(anomaly_map(t, s, (image_size, image_size))).numpy()
    manifest = build_manifest("speed-resnet18", cfg, calibrate(np.asarray(scores)), "random-init", {}, {})
    _, path = publish_model(models_dir, model, manifest, before_publish=lambda d: export_bundle(d))
    return path


def write_section(doc: Path, body: str, heading: str = "## Speed") -> None:
    """Replace (or append) one `## ` section of a markdown file, leaving the rest as it is."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    doc.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: build a resnet18 speed bundle)")
    ap.add_argument("--images", default=None, help="images to score (default: the bottle test set)")
    ap.add_argument("--int8-data", default=None, help="MVTec category folder for INT8 parity")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--overlay-size", choices=("input", "model"), default="input")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed[-NAME].json)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    a = ap.parse_args()

    from stpm.bench import format_table, run_bench

    images = a.images or str(shared_data() / "mvtec_ad_bottle_512" / "bottle" / "test")
    with tempfile.TemporaryDirectory(prefix="stpm-speed-") as tmp:
        bundle = Path(a.bundle) if a.bundle else speed_bundle(Path(tmp))
        name = bundle.parent.name
        out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"speed-{name}.json"
        res = run_bench(bundle, images, tuple(int(b) for b in a.batch_sizes.split(",")), a.seconds, a.threads,
                        a.overlay_size, a.int8_data, out_json=out, print_table=True)
    if not a.no_doc:
        m = res["machine"]
        cmd = "`.venv/bin/python benchmarks/speed.py " + " ".join(sys.argv[1:]) + "`"
        body = (
            f"Command: {cmd} (JSON: `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}`).\n"
            f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} threads; torch {m['torch']}, onnxruntime "
            f"{m['onnxruntime']}; load average {m['load_avg_at_start'][0]:.1f} at start, "
            f"{m['load_avg_at_end'][0]:.1f} at end (the machine is shared; contenders run interleaved in rounds "
            f"so load hits them alike). Model: {res['model']['backbone']} teacher + student, "
            f"{res['model']['image_size']} px; images: {res['images']['n']} files of "
            f"{res['images']['source_size'][0]} px.\n\n" + format_table(res)
        )
        write_section(ROOT / "docs" / "BENCHMARKS.md", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
