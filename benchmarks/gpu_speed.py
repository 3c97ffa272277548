"""GPU speed of the STPM scorer in torch: CUDA eager fp32 vs fp16 / bf16 autocast vs torch.compile,
batch 1 and 32, p50/p99 ms per call and images/s; prints one JSON object (and writes it with --out).

Self-contained for a bare GPU machine (torch with CUDA, timm, numpy): no install of the project, random
weights (speed does not depend on them), from the repository root:

    PYTHONPATH=. python benchmarks/gpu_speed.py --out gpu_speed.json          # ~2-3 min on one GPU
    PYTHONPATH=. python benchmarks/gpu_speed.py --device cpu --quick          # smoke test on a CPU

Models: "resnet18" (teacher and student ResNet18, the paper) and "lite0" (EfficientNet-Lite0 teacher,
ResNet18 student, the quality default), 256 px, product of the three layer maps, image score = max.
One call = pinned host uint8 [N, 3, 256, 256] -> device -> fused scorer -> map and scores back on the
host (what a service pays per batch), timed with a device synchronise. A global time budget
(--budget-s) skips the rows that would not fit and says so in the output: torch.compile rows come last.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stpm.options import ModelOptions  # noqa: E402  (torch-only modules: no onnx, safetensors or sklearn needed)
from stpm.methods.maps import tile_score as image_score  # noqa: E402
from stpm.methods.stpm.loss import anomaly_map  # noqa: E402
from stpm.methods.stpm.model import build_stpm  # noqa: E402

MODELS = {"resnet18": ModelOptions(backbone="resnet18", pretrained=False),
          "lite0": ModelOptions(backbone="efficientnet_lite0", student_backbone="resnet18", pretrained=False)}


class Fused(nn.Module):
    """uint8 [N, 3, S, S] -> (map [N, S, S], raw score [N]): stpm.export.FusedScorer without the calibration."""

    def __init__(self, cfg: ModelOptions):
        super().__init__()
        self.model, _ = build_stpm(cfg, seed=0)
        self.size = cfg.image_size
        self.combine = cfg.combine

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = self.model(images.float() * (1.0 / 255.0))
        amap = anomaly_map(t, s, (self.size, self.size), self.combine, 0.0)
        return amap, image_score(amap)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, host: torch.Tensor, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Wall ms per call: host uint8 -> device -> fn -> map and scores on the host."""

    def call():
        amap, raw = fn(host.to(device, non_blocking=True))
        return amap.float().cpu(), raw.float().cpu()

    for _ in range(warmup):
        call()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        sync(device)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def row(ms: list[float], batch: int) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "images_per_s": round(batch * 1000.0 / float(a.mean()), 1),
            "iters": len(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="64 px, a few iterations: a smoke test of the script")
    ap.add_argument("--models", default="resnet18,lite0")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="start no new row after this long (one torch.compile row can take ~1 min more)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()

    t_start = time.perf_counter()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available to this torch", "torch": torch.__version__}))
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the TF32 question is a separate row)
    torch.backends.cudnn.allow_tf32 = False
    batches = [int(b) for b in a.batches.split(",")]
    size = 64 if a.quick else 256
    result: dict = {
        "what": "STPM fused scorer, torch, host uint8 -> map + score on host, random weights",
        "image_size": size, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "command": " ".join(sys.argv), "rows": [], "skipped": [],
    }

    def iters_for(batch: int) -> tuple[int, int]:
        if a.quick:
            return 1, 3
        return (10, 200) if batch == 1 else (3, 30)

    models = {}
    for name in a.models.split(","):
        cfg = MODELS[name]
        if a.quick:
            cfg = ModelOptions(**{**cfg.__dict__, "image_size": size})
        models[name] = Fused(cfg).eval().to(device)

    modes = [("eager", "fp32", None), ("eager", "fp16", torch.float16), ("eager", "bf16", torch.bfloat16),
             ("eager", "tf32", None)]
    if not a.no_compile:
        modes += [("compile", "fp32", None), ("compile", "fp16", torch.float16)]
    with torch.inference_mode():
        for kind, prec, dtype in modes:
            for name, net in models.items():
                fn = net
                if kind == "compile":
                    fn = torch.compile(net, dynamic=False)
                for batch in batches:
                    label = {"model": name, "mode": kind, "precision": prec, "batch": batch}
                    elapsed = time.perf_counter() - t_start
                    if elapsed > a.budget_s:
                        result["skipped"].append({**label, "why": f"time budget ({a.budget_s:.0f} s) spent"})
                        continue
                    tf32 = prec == "tf32" and device.type == "cuda"
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                    host = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
                    if device.type == "cuda":
                        host = host.pin_memory()
                    warmup, iters = iters_for(batch)
                    if kind == "compile":
                        warmup += 2  # the first calls compile
                    t0 = time.perf_counter()
                    try:
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            ms = time_calls(fn, host, device, warmup, iters)
                    except Exception as e:  # a mode this torch/device cannot run: say so, go on
                        result["skipped"].append({**label, "why": f"{type(e).__name__}: {str(e)[:300]}"})
                        continue
                    result["rows"].append({**label, **row(ms, batch), "seconds": round(time.perf_counter() - t0, 1)})
                    print(json.dumps(result["rows"][-1]), file=sys.stderr, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        result["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
