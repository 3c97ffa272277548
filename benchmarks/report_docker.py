"""docs/DOCKER.md's blocks: the images (size, contents, role) and the Docker smoke's phases over its cold and
warm runs (benchmarks/results/docker_smoke_<run>.json, written by scripts/docker-smoke.sh). Rendered through
benchmarks/report.py. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

IMAGE_ROLES = {"serve": "scoring, no torch", "serve-gpu": "scoring on CUDA, no torch", "train": "training worker",
               "train-gpu": "training worker, CUDA", "cpu": "all-in-one: `train` serving",
               "gpu": "all-in-one: `train-gpu` serving"}


def docker_images_markdown(res: dict[str, Any]) -> str:
    """benchmarks/docker_images.py: the images' sizes by role and the scoring container's memory."""
    m, ld, b = res["machine"], res["load"], res["base"]
    lines = [f"Command: `.venv/bin/python {res['command']}` ({res['when']}). Machine: {m['cpu']}, {m['cores']} cores, "
             f"load average {m['load_avg_1_5_15'][0]:.1f} at the start and {m['load_avg_end'][0]:.1f} at the end; "
             f"Docker {m['docker']} ({m['storage_driver']}), base `{b['tag']}` ({b['size_bytes'] / 1e6:.0f} MB).", "",
             "| image | target (role) | size | venv | largest in the venv, MB |", "|---|---|---:|---:|---|"]
    for role, i in res["images"].items():
        big = ", ".join(f"{p['path']} {p['mb']}" for p in i["largest"][:6])
        lines.append(f"| `{i['tag']}` | `{role}` ({IMAGE_ROLES.get(role, role)}) | **{i['size_gb']:.2f} GB** "
                     f"| {i['venv_mb'] / 1000:.2f} GB | {big} |")
    pinned = ", ".join(f"{k}={v}" for k, v in ld["pinned"].items())
    lines += ["", f"`stpm serve` in each container: {ld['model']} ({pinned}). Idle: all its processes, model loaded "
              f"and warm. Peak: the server process's VmHWM while {ld['clients']} clients sent "
              f"{ld['request']} for {ld['seconds']:.0f} s.", "",
              "| image | idle RSS | peak RSS while scoring | RSS after | requests (req/s, errors) | torch in the process |",
              "|---|---:|---:|---:|---|---|"]
    for role, r in res["memory"].items():
        lines.append(f"| `{r['image']}` ({role}) | **{r['idle_rss_mb']} MB** | **{r['peak_rss_mb']} MB** "
                     f"| {r['rss_after_mb']} MB | {r['requests']} ({r['req_per_s']:.2f}/s, {r['errors']} errors) "
                     f"| {'mapped' if r['torch_mapped'] else 'no'} |")
    return "\n".join(lines)


SMOKE_RUNS = ("cold", "warm")  # benchmarks/results/docker_smoke_<run>.json, written by scripts/docker-smoke.sh
SMOKE_PHASES = {"all-in-one": "all-in-one container: healthy, train a model (1 job), score, restart, score",
                "serve": "scoring image on that volume: healthy, no torch, score, restart, score",
                "compose": "all-in-one through Compose v2: the same as the all-in-one container"}


def load_docker_smoke() -> dict[str, Any]:
    return {run: json.loads((RESULTS / f"docker_smoke_{run}.json").read_text()) for run in SMOKE_RUNS}


def _smoke_rows(run: dict[str, Any]) -> dict[str, float]:
    """Step -> seconds, the container phases ("serve: ...") summed into one row each."""
    rows: dict[str, float] = {}
    for step in run["steps"]:
        phase, sep, _ = step["name"].partition(": ")
        key = SMOKE_PHASES.get(phase, step["name"]) if sep else step["name"]
        rows[key] = rows.get(key, 0.0) + step["seconds"]
    return rows


def _smoke_conditions(run: dict[str, Any]) -> str:
    c, m = run["conditions"], run["machine"]
    have = [f"installed {' + '.join(c['installed_packages'])}" if c["installed_packages"] else "docker.io there",
            "built the base image" if c["base_built"] else "base image there",
            f"build cache {c['build_cache_at_start'] or 'empty'} at the start" + (", --no-cache" if c["no_cache"] else "")]
    return (f"{', '.join(have)}; load average {m['load_avg_start'].split()[0]} -> {m['load_avg_end'].split()[0]}; "
            f"commit {run['commit']}, {run['when']}")


def docker_smoke_markdown(res: dict[str, Any]) -> str:
    """scripts/docker-smoke.sh with STPM_SMOKE_RESULT: a run from a cold Docker cache and one from a warm one."""
    runs = [res[r] for r in SMOKE_RUNS]
    m = runs[0]["machine"]
    lines = [f"`{runs[0]['command']}`, machine: {m['cpu']}, {m['cores']} cores, Docker {m['docker']}.", ""]
    lines += [f"- **{name}**: {_smoke_conditions(run)}" for name, run in zip(SMOKE_RUNS, runs)]
    per_run = [_smoke_rows(r) for r in runs]
    lines += ["", "| step | " + " | ".join(f"{r} s" for r in SMOKE_RUNS) + " |", "|---|" + "---:|" * len(runs)]
    for key in per_run[0]:
        lines.append(f"| {key} | " + " | ".join(f"{p.get(key, 0):.0f}" for p in per_run) + " |")
    lines.append("| **total** | " + " | ".join(f"**{r['total_s']}** ({r['total_s'] / 60:.1f} min)" for r in runs) + " |")
    sizes = ", ".join(f"`{tag}` {size / 1e9:.2f} GB" for tag, size in runs[0]["images"].items())
    lines += ["", f"Checks passed: {' / '.join(str(r['checks_passed']) for r in runs)}. Images: {sizes}."]
    return "\n".join(lines)
