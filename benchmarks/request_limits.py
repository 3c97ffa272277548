"""What a refused request costs the server (issue 24 #2, #3, #4; not a test): memory and CPU time.

Starts `python -m app.serve` (uvicorn, one worker, default limits) on 127.0.0.1 with the review's model: a
random-init ResNet18 bundle tiled at `scale=4 max_tiles=4096 image_size=64` (what POST /train allowed
then). Sends each request the review found costly and measures, in the server process, the peak resident
memory above its size before the request (VmHWM after `/proc/PID/clear_refs` = 5, minus VmRSS before) and
the CPU seconds it spent (/proc/PID/stat utime + stime), with the answer's status:

  * three 6300 x 6300 black PNGs (115 KB each): refused from their headers by the tile budget (#2);
  * one 770 x 770 PNG: 4,096 tiles at scale 4, refused from its header by the work budget (#3);
  * a 64 MB request header, sent in 1 MiB writes: refused at max_header_bytes as it arrives (#4).

Writes benchmarks/results/request_limits.json (with the CPU and the load average).

    .venv/bin/python benchmarks/request_limits.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_api_helpers import build_bundle, start_uvicorn, stop

from stpm.imaging.geometry import Geometry

RESULT = REPO / "benchmarks" / "results" / "request_limits.json"


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MB) and CPU seconds so far of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def black_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def post_images(url: str, blobs: list[bytes]) -> int:
    files = [("files", (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    return httpx.post(url + "/score", files=files, timeout=120).status_code


def huge_header(url: str, megabytes: int = 64) -> int:
    """-> the status answered (0: the connection was reset before an answer could be read)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(megabytes):
                s.sendall(b"a" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            head = s.recv(64)
        except (ConnectionResetError, TimeoutError):
            return 0
    return int(head.split()[1]) if head.startswith(b"HTTP/") else 0


def measure(pid: int, send) -> dict:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before, t0 = proc_status(pid), time.monotonic()
    status = send()
    seconds, after = time.monotonic() - t0, proc_status(pid)
    return {"status": status, "seconds": round(seconds, 3), "cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
            "peak_above_before_mb": round(after["VmHWM"] - before["VmRSS"], 1), "rss_before_mb": round(before["VmRSS"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stpm-limits-") as tmp:
        models = Path(tmp) / "models"
        build_bundle(models, "fine", geometry=Geometry(64, scale=4.0, max_tiles=4096))
        proc, url = start_uvicorn(models, {"STPM_DEFAULT_MODEL": "fine", "STPM_PROVIDERS": "cpu",
                                           "STPM_DATA_DIR": str(Path(tmp) / "data"), "STPM_TRAIN_ENABLED": "false"})
        try:
            post_images(url, [black_png(64, 64)])  # load the model first: not part of any measurement
            big, small = black_png(6300, 6300), black_png(770, 770)
            cases = {
                "three_6300px_black_pngs": measure(proc.pid, lambda: post_images(url, [big] * 3)),
                "one_770px_png_4096_tiles": measure(proc.pid, lambda: post_images(url, [small])),
                "header_64_mb": measure(proc.pid, lambda: huge_header(url)),
            }
        finally:
            stop(proc)
    result = {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
              "load_average": [round(x, 2) for x in os.getloadavg()], "cases": cases,
              "limits": {"max_mb": 50, "max_cpu_s": 0.5}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
