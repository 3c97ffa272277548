"""bf16 on a memory-bank (PatchCore) scorer: the whole graph in bf16 vs the split (f32 features, bf16 bank
search, stpm.runtime.sessions.split_bank_search) vs fp32, on one bundle's full labelled test set, in one run.

    .venv/bin/python benchmarks/bf16_split.py --bundle bottle=models/bottle/v1 --bundle metal_plate=models/metal_plate/v1

Per bundle and mode: the largest and median relative image-score change against OpenVINO fp32, the
decisions that flip at the calibrated threshold, image AUROC, and the median wall ms of one tile
(batch 1, interleaved rounds). Writes benchmarks/results/bf16_split.json and the "bf16_split" block
of docs/BENCHMARKS.md. Needs a CPU with bf16 instructions (the flags are recorded).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = {"bottle": "mvtec_ad_bottle_512/bottle", "metal_plate": "mpdd_metal_plate_512/metal_plate"}
MODES = ("f32", "bf16_whole", "bf16_split")


def scorer_maps(path: Path, mode: str):
    """A callable uint8 tiles [N, 3, S, S] -> raw tile maps [N, S, S] for one mode (OpenVINO CPU)."""
    import openvino as ov

    from stpm.runtime import sessions

    if mode == "bf16_split":
        s = sessions.OpenVinoSession(path, "bf16")
        assert s.mode == "bf16 bank search, f32 features", s.mode
        return lambda x: s.run(x)[0]
    c = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_PRECISION_HINT": "bf16" if mode == "bf16_whole" else "f32"})
    out = next(o for o in c.outputs if "anomaly_map" in o.get_names())
    req = c.create_infer_request()
    return lambda x: np.asarray(req.infer({0: x})[out], dtype=np.float32)


def main() -> int:
    import report
    from sklearn.metrics import roc_auc_score
    from speed import shared_data

    from stpm.runtime import cpu


    from stpm.imaging.scores import image_scores

    from stpm.bundle.manifest import Manifest
    from stpm.imaging.geometry import stitch_all, tile_images
    from stpm.training.data import test_samples
    from stpm.imaging.decode import read_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="DATASET=BUNDLE_DIR (bottle, metal_plate)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_split.json"))
    a = ap.parse_args()
    if cpu.cpu_precision_support("bf16"):
        sys.exit(f"this CPU cannot run bf16: {cpu.cpu_precision_support('bf16')}")

    res = {"command": " ".join(["benchmarks/bf16_split.py", *sys.argv[1:]]), "cpu": cpu.cpu_name(),
           "cpu_flags": sorted(f for f in cpu.cpu_flags() if "bf16" in f or "amx" in f),
           "load_avg_at_start": list(os.getloadavg()), "bundles": {}}
    for spec in a.bundle:
        ds, path = spec.split("=", 1)
        path = Path(path)
        manifest = Manifest.read(path)
        geometry, score_spec = manifest.geometry, manifest.image_score
        threshold = manifest.calibration.threshold
        samples = test_samples(shared_data() / DATA[ds])
        labels = np.array([s.label for s in samples])
        tiled = tile_images([read_image(s.path) for s in samples], geometry)
        tiles = np.ascontiguousarray(tiled.tiles.transpose(0, 3, 1, 2))
        runs = {m: scorer_maps(path / "scorer.onnx", m) for m in MODES}
        scores = {m: image_scores(stitch_all(np.concatenate([runs[m](tiles[i:i + 1])
                                                                          for i in range(len(tiles))]), tiled), score_spec)
                for m in MODES}  # image scores through the stitched maps, as the Scorer computes them
        ref = np.asarray(scores["f32"])
        row = {"n_test": len(samples), "modes": {}}
        one = tiles[:1]
        times = {m: [] for m in MODES}
        for r in range(a.rounds):
            for m in MODES[r % 3:] + MODES[:r % 3]:
                runs[m](one)  # warm after the others ran
                for _ in range(5):
                    t0 = time.perf_counter()
                    runs[m](one)
                    times[m].append((time.perf_counter() - t0) * 1e3)
        for m in MODES:
            got = np.asarray(scores[m])
            rel = np.abs(got - ref) / np.abs(ref)
            row["modes"][m] = {"max_rel_score_change": float(rel.max()), "median_rel_score_change": float(np.median(rel)),
                               "decision_flips": int(((got >= threshold) != (ref >= threshold)).sum()),
                               "auroc": float(roc_auc_score(labels, got)), "tile_ms_median": float(np.median(times[m]))}
        res["bundles"][ds] = row
        print(ds, json.dumps(row), flush=True)
    res["load_avg_at_end"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    report.publish(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
