"""Load benchmark of the scoring service (not a test).

Starts `python -m app.serve` (uvicorn, one worker) on 127.0.0.1, measures the bare scorer (stpm.runtime
in this process, same bundle, same image) first, then runs K concurrent clients for a bounded time per
K: requests/s, p50/p99 latency, errors, server RSS before/after. Writes benchmarks/results/load.json
and prints its Markdown (benchmarks/report.py); with --out benchmarks/results/load_default.json or
load_intra1.json it also rewrites that block of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/load.py --duration 15 --clients 1 4 8
    .venv/bin/python benchmarks/load.py --models-dir models --model bottle   # an existing model

Without --models-dir a random-init ResNet18 bundle (torch needed here, not in the server) is built
once into /tmp/stpm-load-models: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
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

    from stpm.calibrate import calibrate
    from stpm.config import ModelConfig
    from stpm.export import export_bundle
    from stpm.loss import anomaly_map, image_score
    from stpm.model import build_stpm
    from stpm.publish import build_manifest, publish_model

    torch.manual_seed(0)
    cfg = ModelConfig(method="stpm", backbone="resnet18", pretrained=False, image_size=image_size)
    model, _ = build_stpm(cfg, seed=0)
    model.eval()
    x = torch.rand(4, 3, image_size, image_size)
    with torch.no_grad():
        t, s = model(x)
        scores = image_score(anomaly_map(t, s, (image_size, image_size))).numpy()
    manifest = build_manifest(name, cfg, calibrate(scores), "random-init", {"epochs": 0}, {"n_images": 4})
    publish_model(models_dir, model, manifest, before_publish=lambda d: export_bundle(d))
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
    from stpm.runtime import Scorer

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
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load.json")
    args = ap.parse_args()

    models_dir = args.models_dir or Path("/tmp/stpm-load-models")
    models_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_models(models_dir, args.image_size)
    from stpm import bundle

    bundle_dir = bundle.resolve(models_dir, model)
    fname, data = test_image()

    print(f"bare scorer on {bundle_dir} ...", flush=True)
    bare = bare_scorer(bundle_dir, data, args.bare_n, args.intra_op_threads)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STPM_MODELS_DIR": str(models_dir), "STPM_DEFAULT_MODEL": model, "STPM_PROVIDERS": "cpu"}
    env.pop("STPM_API_KEY", None)
    if args.intra_op_threads is not None:
        env["STPM_INTRA_OP_THREADS"] = str(args.intra_op_threads)
    if args.batch_wait_ms is not None:
        env["STPM_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
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
    finally:
        proc.terminate()
        proc.wait(20)

    batch_sum = batch_count = 0.0
    for line in metrics.splitlines():
        if line.startswith("stpm_batch_images_sum"):
            batch_sum += float(line.split()[-1])
        elif line.startswith("stpm_batch_images_count"):
            batch_count += float(line.split()[-1])
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

    from benchmarks.report import BLOCKS, DOC, load_markdown, write_block

    print(load_markdown(result))
    if args.out.stem in BLOCKS:  # a result file the doc shows: its block follows
        write_block(DOC, args.out.stem, load_markdown(result))
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
