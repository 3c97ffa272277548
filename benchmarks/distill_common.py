"""Shared helpers for benchmarks/distill_*.py: arguments, data, per-run JSON results, tables in the doc.

Results are saved after every trained model (benchmarks/results/distill_<name>.json), keyed by seed, so a
killed run loses at most one model and a rerun of some seeds (`--seeds 2`) merges into the same file.
"""
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

from stpm.distill.summary import format_mean_std, mean_std  # noqa: E402  (after the sys.path insert)

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"  # gitignored: caches and logs
CIFAR_CACHE = WORK / "cifar10_uint8.npz"

__all__ = ["format_mean_std", "mean_std"]


def parse_args(description: str, options: dict[str, tuple[type, object, str]]) -> argparse.Namespace:
    """--seeds, --threads, --out and the benchmark's own options {"--name": (type, default, help)}."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model/shuffling seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/...)")
    for flag, (typ, default, help_) in options.items():
        if typ is bool:
            p.add_argument(flag, action="store_true", help=help_)
        else:
            p.add_argument(flag, type=typ, default=default, help=help_)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)


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


class Results:
    """values[key][str(seed)] = number; saved to JSON after every add(). Existing values are kept when the file
    was written with the same config (a rerun of some seeds, or of a part, completes a killed run); a value
    recorded again replaces the old one. A different config starts a new file."""

    def __init__(self, name: str, args: argparse.Namespace, config: dict) -> None:
        self.path = args.out or RESULTS / f"distill_{name}.json"
        self.started, self.cpu_started = time.time(), time.process_time()
        self.data: dict = {"benchmark": name, "config": config, "values": {}, "runs": []}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("config") == config:
                self.data["values"] = old.get("values", {})
                self.data["runs"] = old.get("runs", [])
        self.run = {"command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
                    "seeds": args.seeds, "machine": machine(), "load_at_start": os.getloadavg()[0]}
        self.data["runs"].append(self.run)  # values are replaced key by key as this run records them

    def add(self, key: str, seed: int, value: float, unit: str = "") -> None:
        self.data["values"].setdefault(key, {})[str(seed)] = value
        print(f"  [{time.time() - self.started:6.0f}s] seed {seed} {key}: {value:.2f}{unit}", flush=True)
        self.save()

    def save(self) -> None:
        self.run.update(wall_seconds=round(time.time() - self.started, 1),
                        cpu_seconds=round(time.process_time() - self.cpu_started, 1),
                        load_at_end=os.getloadavg()[0])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in percent (CPU)."""
    from stpm.distill.trainer import count_errors

    return 100.0 * (1 - count_errors(model, x, y, torch.device("cpu")) / len(y))


def errors(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from stpm.distill.trainer import count_errors

    return count_errors(model, x, y, torch.device("cpu"))


def update_doc(name: str) -> None:
    """Re-render this benchmark's block of docs/DISTILLATION.md from its JSON (distill_report.py)."""
    import distill_report

    distill_report.write_sections([name])
