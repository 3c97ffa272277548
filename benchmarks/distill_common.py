"""Shared helpers for benchmarks/distill_*.py: args, seeding, mean/std tables, JSON results."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

from stpm.distill.summary import format_mean_std, mean_std  # noqa: E402  (after the sys.path insert)

__all__ = ["format_mean_std", "mean_std"]


def parse_args(description: str, default_epochs: int, flags: tuple[str, ...] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    for flag in flags:
        p.add_argument(flag, action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/...)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)


class AccuracyLog:
    """Test-set accuracy (%) per key, one value per seed, printed as it is recorded."""

    def __init__(self, x_test: torch.Tensor, y_test: torch.Tensor, device: torch.device,
                 started: float | None = None):
        self.x_test, self.y_test, self.device, self.started = x_test, y_test, device, started
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, model: torch.nn.Module) -> None:
        from stpm.distill.trainer import count_errors

        acc = 100.0 * (1 - count_errors(model, self.x_test, self.y_test, self.device) / len(self.y_test))
        self.values.setdefault(key, []).append(acc)
        elapsed = f" ({time.time() - self.started:.0f}s)" if self.started is not None else ""
        print(f"  {key}: {acc:.2f}%{elapsed}", flush=True)


def fmt(values: list[float], digits: int = 2) -> str:
    return format_mean_std(values, digits)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def write_result(name: str, args: argparse.Namespace, payload: dict, started: float) -> Path:
    out = args.out or RESULTS / f"distill_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name] + sys.argv),
               "seeds": args.seeds, "epochs": args.epochs, "machine": machine(),
               "wall_seconds": round(time.time() - started, 1), **payload}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
