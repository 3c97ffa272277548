"""Shared helpers for benchmarks/distill_*.py: arguments, data, per-run JSON results, tables in the doc.

Results are saved after every trained model (benchmarks/results/distill_<name>.json), keyed by seed, so a
killed run loses at most one model and a rerun (all seeds, or some: `--seeds 2`) merges into the same file and
skips the models already recorded (`Results.has`). Every run record keeps the load average at start and end,
its mean over the run (sampled at every saved result), and wall and CPU seconds, and whether the run reached
its end (`finished`, set by `Results.finish`): a file whose last run did not is rendered as partial, without
verdicts (distill_render.is_partial).
"""
from __future__ import annotations

import argparse
import fcntl
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


def cpu_has_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AMX or AVX-512 bf16): bf16 autocast is fast there."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def precision_arg(value: str) -> str:
    """--precision auto|fp32|bf16 -> fp32 or bf16 (auto: bf16 where the CPU has native bf16)."""
    if value not in ("auto", "fp32", "bf16"):
        raise SystemExit(f"--precision must be auto, fp32 or bf16, not {value!r}")
    return ("bf16" if cpu_has_bf16() else "fp32") if value == "auto" else value


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
    recorded again replaces the old one. A different config starts a new file. Processes with the same config
    may write one file at the same time (e.g. two parts of a benchmark): every save merges, under a lock, what
    the others saved."""

    def __init__(self, name: str, args: argparse.Namespace, config: dict) -> None:
        self.path = args.out or RESULTS / f"distill_{name}.json"
        config = json.loads(json.dumps(config))  # as it reads back from the file (tuples become lists)
        self.started, self.cpu_started = time.time(), time.process_time()
        self.data: dict = {"benchmark": name, "config": config, "values": {}, "runs": []}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("config") == config:
                self.data |= {k: v for k, v in old.items() if k not in ("benchmark", "config")}
        self.run = {"command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
                    "seeds": args.seeds, "machine": machine(), "load_at_start": os.getloadavg()[0],
                    "run_id": f"{os.getpid()}-{time.time_ns()}", "finished": False}
        self.loads = [os.getloadavg()[0]]
        self.data["runs"].append(self.run)  # values are replaced key by key as this run records them

    def render(self) -> None:
        """Re-render this benchmark's block of the doc, unless the results go to a file of their own (--out)."""
        if self.path.resolve() == (RESULTS / f"distill_{self.data['benchmark']}.json").resolve():
            update_doc(self.data["benchmark"])

    def finish(self) -> None:
        """Mark this run complete: until then, while it is the file's last run, its block reads as partial."""
        self.run["finished"] = True
        self.data.pop("missing", None)  # a partial file's note of what was missing (distill_render.partial_notice)
        self.save()
        self.render()

    def has(self, key: str, seed: int) -> bool:
        """True when a value for (key, seed) is recorded already (a resumed run skips that model)."""
        return str(seed) in self.data["values"].get(key, {})

    def get(self, key: str, seed: int) -> float:
        return self.data["values"][key][str(seed)]

    def note(self, section: str, key: str, value: object) -> None:
        """Extra facts beside the values (e.g. per-epoch validation curves): data[section][key] = value."""
        self.data.setdefault(section, {})[key] = value
        self.save()

    def add(self, key: str, seed: int, value: float, unit: str = "") -> None:
        self.data["values"].setdefault(key, {})[str(seed)] = value
        print(f"  [{time.time() - self.started:6.0f}s] seed {seed} {key}: {value:.2f}{unit}", flush=True)
        self.save()

    def save(self) -> None:
        self.loads.append(os.getloadavg()[0])
        self.run.update(wall_seconds=round(time.time() - self.started, 1),
                        cpu_seconds=round(time.process_time() - self.cpu_started, 1),
                        load_at_end=self.loads[-1], load_mean=round(sum(self.loads) / len(self.loads), 2))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        WORK.mkdir(parents=True, exist_ok=True)
        with open(WORK / f"{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                self.merge(json.loads(self.path.read_text()))
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)

    def _merge_runs(self, disk_runs: list[dict]) -> None:
        """Run records we lack are taken; of another process's run known to both, the fresher record (more
        wall seconds) wins, so a copy taken early never overwrites that run's later progress; ours stays ours."""
        index = {r.get("run_id"): i for i, r in enumerate(self.data["runs"]) if r.get("run_id") is not None}
        for r in disk_runs:
            i = index.get(r.get("run_id")) if r.get("run_id") is not None else None
            if i is None:
                if r not in self.data["runs"]:
                    self.data["runs"].append(r)
            elif self.data["runs"][i] is not self.run and \
                    r.get("wall_seconds", 0) > self.data["runs"][i].get("wall_seconds", 0):
                self.data["runs"][i] = r

    def merge(self, disk: dict) -> None:
        """Take what another process saved with the same config: values, notes and run records we lack."""
        if disk.get("config") != self.data["config"]:
            return
        for section, content in disk.items():
            if section == "runs":
                self._merge_runs(content)
            elif isinstance(content, dict) and section != "config":
                ours = self.data.setdefault(section, {})
                for key, value in content.items():
                    if isinstance(value, dict) and isinstance(ours.get(key), dict):
                        ours[key] = value | ours[key]  # per-seed values: ours win where both have one
                    else:
                        ours.setdefault(key, value)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             device: torch.device = torch.device("cpu")) -> float:
    """Accuracy in percent (the model and the batches on `device`)."""
    from stpm.distill.trainer import count_errors

    return 100.0 * (1 - count_errors(model, x, y.cpu(), device) / len(y))


def errors(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from stpm.distill.trainer import count_errors

    return count_errors(model, x, y, torch.device("cpu"))


def update_doc(name: str) -> None:
    """Re-render this benchmark's block of docs/DISTILLATION.md from its JSON (distill_report.py)."""
    import distill_report

    distill_report.write_sections([name])
