"""How much of its defect does a defective crop of the mixed-size sets keep? (Is a low AUROC on a mixed set
the crops cutting defects to slivers?) For each shared set, the mixed set is built as benchmarks/mixed_scale.py
builds it (stpm.training.mixed, the same seed) into a temporary folder, and every defective test crop's mask
is compared with its source mask: the share of the defect's pixels the crop keeps, and how many it keeps.
No model involved (numpy + Pillow).

    .venv/bin/python benchmarks/mixed_defects.py --out benchmarks/results/mixed_defects.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bank_size import DATASETS  # noqa: E402
from stpm.training.data import test_samples  # noqa: E402
from stpm.training.mixed import build_mixed_set  # noqa: E402


def defect_pixels(mask: Path) -> int:
    with Image.open(mask) as m:
        return int((np.asarray(m.convert("L")) > 0).sum())


def kept(source: Path, seed: int) -> list[dict]:
    """Per defective test image: its defect's pixels in the source and in its mixed-set crop."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="stpm-mixed-defects-") as tmp:
        build_mixed_set(source, Path(tmp), seed=seed)
        for s in test_samples(source):
            if s.label and s.mask is not None:
                rel = s.mask.relative_to(source)
                rows.append({"mask": rel.as_posix(), "source_px": defect_pixels(s.mask),
                             "crop_px": defect_pixels(Path(tmp) / rel)})
    return rows


def summary(rows: list[dict]) -> dict:
    share = np.array([r["crop_px"] / max(r["source_px"], 1) for r in rows])
    return {"n_defective": len(rows), "median_share_kept": float(np.median(share)),
            "share_below_10pct": float(np.mean(share < 0.10)), "share_below_25pct": float(np.mean(share < 0.25)),
            "median_crop_px": float(np.median([r["crop_px"] for r in rows])),
            "median_source_px": float(np.median([r["source_px"] for r in rows]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="bottle,metal_plate,kolektorsdd")
    ap.add_argument("--seed", type=int, default=0, help="the mixed sets' seed (benchmarks/mixed_scale.py: 0)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixed_defects.json"))
    a = ap.parse_args()
    res = {"command": " ".join(["benchmarks/mixed_defects.py", *sys.argv[1:]]), "seed": a.seed, "sets": {}}
    for name in a.datasets.split(","):
        rows = kept(DATASETS[name], a.seed)
        res["sets"][name] = {**summary(rows), "rows": rows}
        print(name, json.dumps(res["sets"][name] | {"rows": len(rows)}), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
