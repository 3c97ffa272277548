"""Load benchmark of the scoring service (not a test).

Starts `python -m app.serve` (uvicorn, one worker) on 127.0.0.1, measures the bare scorer (stpm.runtime
in this process, same bundle, same image) first, then runs K concurrent clients for a bounded time per
K: requests/s, p50/p99 latency, errors, server RSS before/after. Writes benchmarks/results/load.json
and prints its Markdown (benchmarks/report.py); with --out benchmarks/results/load_default.json or
load_intra1.json it also rewrites that block of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/load.py --duration 15 --clients 1 4 8
    .venv/bin/python benchmarks/load.py --models-dir models --model bottle   # an existing model
    .venv/bin/python benchmarks/load.py --sweep --models-dir models --model bottle --duration 7

--sweep measures the micro-batcher instead: per backend (onnxruntime, openvino) and per (images per
batch, wait ms) of SWEEP_GRID, a fresh server with those settings pinned, K clients each; writes
benchmarks/results/load_sweep.json (and its block of docs/BENCHMARKS.md) with the choice of
benchmarks/batching.py, which app.batcher.BATCH_DEFAULTS must equal (tests/test_batching.py).

Without --models-dir a random-init ResNet18 bundle (torch needed here, not in the server) is built
once into /tmp/stpm-load-models: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_models(models_dir: Path, image_size: int) -> str:
    from stpm import bundle

    name = f"loadtest{image_size}"
    if bundle.list_versions(models_dir, name) if (models_dir / name).is_dir() else False:
        return name
    import torch

    from stpm.training.calibration import calibrate
    from stpm.options import ModelOptions
    from stpm.export.onnx import export_bundle
    from stpm.methods.maps import tile_score as image_score
    from stpm.methods.stpm.loss import anomaly_map
    from stpm.methods.stpm.model import build_stpm
    from stpm.methods.stpm.anomaly_map import STPMMap
    from stpm.training.publish import build_manifest, publish_model

    torch.manual_seed(0)
    cfg = ModelOptions(method="stpm", backbone="resnet18", pretrained=False, image_size=image_size)
    model, _ = build_stpm(cfg, seed=0)
    model.eval()
    x = torch.rand(4, 3, image_size, image_size)
    with torch.no_grad():
        t, s = model(x)
        scores = image_score(anomaly_map(t, s, (image_size, image_size))).numpy()
    manifest = build_manifest(name, cfg, calibrate(scores), "random-init", {"epochs": 0}, {"n_images": 4})
    amap = STPMMap(model, manifest["model"]["combine"], manifest["model"]["sigma"])
    publish_model(models_dir, amap, manifest, before_publish=lambda d: export_bundle(d))
    return name


def test_image() -> tuple[str, bytes]:
    shared = Path(os.environ.get("STPM_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = shared / "mvtec_ad_bottle_512" / "bottle" / "test" / "broken_large" / "000.png"
    if p.is_file():
        return p.name, p.read_bytes()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, "PNG")
    return "random512.png", buf.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def bare_scorer(bundle_dir: Path, data: bytes, n: int, threads: int | None) -> dict:
    from stpm.runtime.scorer import Scorer

    s = Scorer(bundle_dir, providers=("cpu",), intra_op_threads=threads)
    s.warmup()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.score([data], names=["x"])
        lat.append((time.perf_counter() - t0) * 1000)
    del s
    return {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": statistics.fmean(lat), "n": n}


def run_clients(url: str, k: int, duration: float, fname: str, data: bytes, params: dict, headers: dict) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def worker():
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = c.post("/score", files=[("files", (fname, data, "image/png"))], params=params, headers=headers)
                    ok = r.status_code == 200
                    err = None if ok else f"{r.status_code} {r.text[:100]}"
                except httpx.HTTPError as e:
                    err = f"{type(e).__name__}: {e}"
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    if err is None:
                        lat.append(dt)
                    else:
                        errors.append(err)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(k)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": k,
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:3],
        "req_per_s": len(lat) / wall,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
    }


@contextlib.contextmanager
def serve(models_dir: Path, model: str, env_extra: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m app.serve` on a free local port with `env_extra` on top of this environment; yields
    (base url, process) once /readyz answers 200, and stops the server on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STPM_MODELS_DIR": str(models_dir), "STPM_DEFAULT_MODEL": model, "STPM_PROVIDERS": "cpu",
           **env_extra}
    env.pop("STPM_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def batch_totals(metrics: str) -> tuple[float, float]:
    """(images, inference batches) so far, from the server's Prometheus text."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("stpm_batch_images_sum"):
            total += float(line.split()[-1])
        elif line.startswith("stpm_batch_images_count"):
            count += float(line.split()[-1])
    return total, count


def machine_info() -> dict:
    from stpm.runtime.cpu import cpu_flags, cpu_name

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "flags": sorted(cpu_flags()),
            "platform": platform.platform(), "python": platform.python_version()}


SWEEP_GRID = ((1, 0.0), (4, 0.0), (4, 2.0), (8, 0.0), (8, 2.0), (16, 0.0), (16, 2.0))  # (images, wait ms)


def script_path(argv0: str) -> str:
    """This script as the repository-relative path a reader can rerun."""
    p = Path(argv0).resolve()
    return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else argv0


def grid_point(text: str) -> tuple[int, float]:
    """BATCH:WAIT_MS -> (batch, wait ms), for argparse."""
    try:
        b, w = text.split(":")
        batch, wait = int(b), float(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH:WAIT_MS such as 8:2, got {text!r}") from None
    if batch < 1 or wait < 0:
        raise argparse.ArgumentTypeError(f"batch must be >= 1 and wait >= 0, got {text!r}")
    return batch, wait


def sweep_point(models_dir: Path, model: str, backend: str, precision: str, batch: int, wait_ms: float,
                clients: list[int], duration: float, fname: str, data: bytes, heatmap: str) -> dict:
    """One server with this backend, precision and (batch, wait): images/s and p50/p99 per client count,
    the load average around each run, and what the server reports it runs (/readyz)."""
    env = {"STPM_BACKEND": backend, "STPM_PRECISION": precision, "STPM_BATCH_MAX_IMAGES": str(batch),
           "STPM_BATCH_WAIT_MS": str(wait_ms)}
    with serve(models_dir, model, env) as (url, _proc):
        ready = httpx.get(url + "/readyz", timeout=10).json()
        params = {"heatmap": heatmap}
        run_clients(url, 1, 2.0, fname, data, params, {})  # warm the HTTP path
        runs = []
        for k in clients:
            before = batch_totals(httpx.get(url + "/metrics").text)
            load_start = os.getloadavg()
            r = run_clients(url, k, duration, fname, data, params, {})
            r["loadavg_start"], r["loadavg_end"] = list(load_start), list(os.getloadavg())
            after = batch_totals(httpx.get(url + "/metrics").text)
            n_batches = after[1] - before[1]
            r["mean_batch_images"] = (after[0] - before[0]) / n_batches if n_batches else None
            runs.append(r)
    served = {k: ready.get(k) for k in ("model", "version", "backend", "precision", "batch_max_images",
                                         "batch_wait_ms")}
    if (served["backend"], served["precision"], served["batch_max_images"]) != (backend, precision, batch):
        raise SystemExit(f"the server runs {served}, not the requested {backend}/{precision}, batch {batch}")
    point = {"backend": backend, "precision": precision, "batch": batch, "wait_ms": wait_ms, "served": served,
             "selection": ready.get("selection"), "runs": runs}
    print(json.dumps({k: point[k] for k in ("backend", "precision", "batch", "wait_ms")}
                     | {f"c{r['clients']}": [round(r["req_per_s"], 2), round(r["p50_ms"]), round(r["p99_ms"])]
                        for r in runs}), flush=True)
    return point


def bundle_precision(bundle_dir: Path, backend: str) -> str:
    """bf16 where the bundle ships it for this backend and the CPU runs it, else fp32."""
    from stpm.runtime import choice, cpu
    from stpm.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    bf16 = ((manifest.get("exports") or {}).get("bf16") or {})
    held = choice.bundle_precisions(manifest, bundle_dir)["bf16"] is None
    if held and bf16.get("backend") == backend and cpu.cpu_precision_support("bf16") is None:
        return "bf16"
    return "fp32"


def run_sweep(args: argparse.Namespace, models_dir: Path, model: str) -> int:
    """--sweep: every backend x (batch, wait) point, one fresh server each, backends interleaved per
    point so the shared machine's load drift hits them alike; the choice by benchmarks.batching."""
    from benchmarks.batching import Rule, choose, merge_rounds
    from stpm import bundle

    bundle_dir = bundle.resolve(models_dir, model)
    fname, data = test_image()
    manifest = bundle.read_manifest(bundle_dir)
    precisions = {b: bundle_precision(bundle_dir, b) for b in args.backends}
    load_start = os.getloadavg()
    measured: dict[tuple[str, int, float], list[dict]] = {}
    for rnd in range(args.repeats):  # every other round walks the grid backwards: drift evens out
        for batch, wait in (args.grid if rnd % 2 == 0 else args.grid[::-1]):
            for b in args.backends:
                measured.setdefault((b, batch, wait), []).append(
                    sweep_point(models_dir, model, b, precisions[b], batch, wait, args.clients, args.duration,
                                fname, data, args.heatmap))
    points = []
    for (b, batch, wait), pts in measured.items():
        if any(p["served"] != pts[0]["served"] for p in pts):
            raise SystemExit(f"{b} batch {batch} wait {wait}: the server ran differently across rounds")
        points.append({k: pts[0][k] for k in ("backend", "precision", "batch", "wait_ms", "served", "selection")}
                      | {"runs": merge_rounds([p["runs"] for p in pts]), "rounds": [p["runs"] for p in pts]})
    rule = Rule()
    result = {
        "command": " ".join([script_path(sys.argv[0]), *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info() | {"loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg())},
        "model": str(bundle_dir.relative_to(models_dir)),
        "method": "{method} ({backbone}, {image_size} px)".format(**{"method": "stpm", **manifest["model"]}),
        "image": fname,
        "image_bytes": len(data),
        "heatmap": args.heatmap,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "intra_op_threads": "default",
        "rule": {"clients": rule.clients, "max_slowdown": rule.max_slowdown, "tie": rule.tie},
        "points": points,
        "choice": {b: choose(points, b, rule).to_dict() for b in args.backends},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    from benchmarks import report
    from benchmarks.report_speed import sweep_markdown

    print(sweep_markdown(result))
    report.publish(args.out, result)
    return 1 if any(r["errors"] for p in points for r in p["runs"]) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per client count")
    ap.add_argument("--bare-n", type=int, default=50)
    ap.add_argument("--heatmap", default="none", choices=["none", "overlay", "map", "both"])
    ap.add_argument("--intra-op-threads", type=int, default=None)
    ap.add_argument("--batch-wait-ms", type=float, default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="measure every backend x (batch, wait) of SWEEP_GRID, one server each, and choose the "
                    "batcher's defaults (benchmarks/batching.py); default --out load_sweep.json")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"], help="with --sweep")
    ap.add_argument("--repeats", type=int, default=2,
                    help="with --sweep: rounds over the grid (alternately reversed); each point shows the median")
    ap.add_argument("--grid", nargs="+", type=grid_point, default=list(SWEEP_GRID), metavar="BATCH:WAIT_MS",
                    help="with --sweep: the (images per batch, wait ms) settings; must include 1:0, the baseline")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default benchmarks/results/load.json, with --sweep load_sweep.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / ("load_sweep.json" if args.sweep else "load.json")

    models_dir = args.models_dir or Path("/tmp/stpm-load-models")
    models_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_models(models_dir, args.image_size)
    if args.sweep:
        return run_sweep(args, models_dir, model)
    from stpm import bundle

    bundle_dir = bundle.resolve(models_dir, model)
    fname, data = test_image()

    print(f"bare scorer on {bundle_dir} ...", flush=True)
    bare = bare_scorer(bundle_dir, data, args.bare_n, args.intra_op_threads)

    env = {}
    if args.intra_op_threads is not None:
        env["STPM_INTRA_OP_THREADS"] = str(args.intra_op_threads)
    if args.batch_wait_ms is not None:
        env["STPM_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
    with serve(models_dir, model, env) as (url, proc):
        rss_before = rss_mb(proc.pid)
        params = {"heatmap": args.heatmap}
        run_clients(url, 1, 2.0, fname, data, params, {})  # warm the HTTP path
        runs = []
        for k in args.clients:
            r = run_clients(url, k, args.duration, fname, data, params, {})
            r["server_rss_mb"] = rss_mb(proc.pid)
            runs.append(r)
            print(json.dumps(r), flush=True)
        metrics = httpx.get(url + "/metrics").text
        rss_after = rss_mb(proc.pid)
        # the bare scorer again (server idle): the machine's load drifts; compare with the mean of both
        bare2 = bare_scorer(bundle_dir, data, args.bare_n, args.intra_op_threads)
        for k in ("p50_ms", "p99_ms", "mean_ms"):
            bare[k + "_after"] = bare2[k]
            bare[k] = (bare[k] + bare2[k]) / 2

    batch_sum, batch_count = batch_totals(metrics)
    one = next((r for r in runs if r["clients"] == 1), None)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1m_at_end": os.getloadavg()[0]},
        "intra_op_threads": args.intra_op_threads,
        "model": str(bundle_dir.relative_to(models_dir)),
        "image": fname,
        "image_bytes": len(data),
        "heatmap": args.heatmap,
        "bare_scorer": bare,
        "runs": runs,
        "server_rss_mb": {"before": rss_before, "after": rss_after},
        "mean_batch_images": batch_sum / batch_count if batch_count else None,
        "http_overhead_batch1": (one["p50_ms"] - bare["p50_ms"]) / bare["p50_ms"] if one else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    from benchmarks import report
    from benchmarks.report_speed import load_markdown

    print(load_markdown(result))
    report.publish(args.out, result)
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
