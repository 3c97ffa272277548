"""benchmarks/report.py's peer block renders the Patchcore peer's rows, its build record and the ratios to it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402

BUILD = {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"], "image_size": [256, 256],
         "coreset_sampling_ratio": 0.1, "feature_grid": [32, 32], "dims": 1536, "images": 209,
         "patches_per_image": 1024, "patches": 214016, "bank_rows": 21401, "bank": "random rows",
         "fit_seconds": 61.5, "cpu": "test CPU", "torch_threads": 2, "load_average_start": 0.4, "load_average_end": 1.2,
         "openvino_input_shape": "[1,3,512,512]", "export_seconds": 40.0}


def _row(p50: float, info: dict) -> dict:
    return {"p50_ms": p50, "p95_ms": p50 * 1.2, "cpu_p50_ms": p50 * 2, "cpu_p95_ms": p50 * 2.4, "n": 4, "info": info}


def _result(quality_png: float, peer_pc: float) -> dict:
    rows = {"peer_ov_default": _row(50.0, {"inference_precision": "<Type: 'float32'>", "threads": 2}),
            "peer_pc_ov": _row(peer_pc, {"inference_precision": "<Type: 'float32'>", "threads": 2}),
            "peer_pc_torch": _row(peer_pc * 1.5, {"runtime": "torch", "dtype": "float32", "threads": 2}),
            "quality_full_png": _row(quality_png, {"backend": "openvino", "precision": "fp32"})}
    res = {"command": "python benchmarks/peer.py", "cpu": {"model": "test CPU", "cores": 2, "simd_flags": ["avx2"]},
           "load_average_per_round": [1.0, 1.1], "load_average_end": [1.2, 1.0, 0.9], "images": "2 PNGs",
           "rows": rows, "peer_patchcore_build": BUILD}
    for ref, key in (("peer_ov_default", "vs_peer_ov_default_p50"), ("peer_pc_ov", "vs_peer_pc_ov_p50")):
        res[key] = {k: round(r["p50_ms"] / rows[ref]["p50_ms"], 3) for k, r in rows.items()}
    return res


def test_patchcore_rows_build_record_and_ratio_are_rendered():
    text = report.peer_markdown(_result(quality_png=40.0, peer_pc=500.0))
    assert "| anomalib Patchcore, OpenVINO default | OpenVINO float32 | 500.0 |" in text
    assert "| anomalib Patchcore, TorchInferencer | torch float32, 2 threads | 750.0 |" in text
    assert "p50 / Patchcore OpenVINO |" in text
    assert "bank **21401 rows**" in text and "feature grid 32x32" in text and "**61.5 s**" in text
    assert "p50 **0.080x** anomalib Patchcore's OpenVINO default (target <= 0.1: met)" in text


def test_patchcore_target_missed_is_said():
    text = report.peer_markdown(_result(quality_png=60.0, peer_pc=500.0))
    assert "p50 **0.120x** anomalib Patchcore's OpenVINO default (target <= 0.1: not met)" in text


def test_without_patchcore_rows_the_table_keeps_its_columns():
    res = _result(quality_png=40.0, peer_pc=500.0)
    for k in ("peer_pc_ov", "peer_pc_torch"):
        res["rows"].pop(k)
    res.pop("vs_peer_pc_ov_p50")
    res.pop("peer_patchcore_build")
    text = report.peer_markdown(res)
    assert "Patchcore" not in text
    assert "| contender | runs on | p50 ms | p95 ms | CPU p50 ms | p50 / peer default |\n" in text
