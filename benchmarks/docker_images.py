"""Docker images by role (issue 28), measured (not a test): each image's size, what fills the scoring
image, and the scoring container's memory, idle and at its peak while scoring.

Needs a Docker engine (root, to read the container's processes in /proc) and the images built, e.g.
by `STPM_SMOKE_KEEP=1 scripts/docker-smoke.sh` (stpm:smoke-cpu, stpm:smoke-serve) and
`docker build --target train ...` with the smoke's build arguments (docs/DOCKER.md):

    .venv/bin/python benchmarks/docker_images.py \\
        --image serve=stpm:smoke-serve --image train=stpm:train --image cpu=stpm:smoke-cpu

Each container of --memory (default: serve and cpu, the scoring image and the all-in-one running the same
`stpm serve`) starts on the host network (127.0.0.1) with a random-init ResNet18 STPM bundle at
--image-size px (benchmarks/load.py builds it here, with torch; memory does not depend on the weights)
bind-mounted read-only on /data/models, backend and precision pinned (onnxruntime, fp32). Idle RSS: the
container's processes once /readyz says the model is warm and after --idle-s seconds without requests.
Peak: the server's VmHWM, reset before, while --clients clients POST /score the MVTec bottle test image
(a 512 x 512 PNG, `heatmap=overlay`) for --seconds. Writes benchmarks/results/docker_images.json and
its block of docs/DOCKER.md (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmarks import report  # noqa: E402
from load import build_models, test_image  # noqa: E402  (benchmarks/load.py)

OUT = report.RESULTS / "docker_images.json"
CONTAINER = "stpm-bench-memory"
PINNED = {"STPM_BACKEND": "onnxruntime", "STPM_PRECISION": "fp32"}


def docker(*args: str, check: bool = True) -> str:
    res = subprocess.run([os.environ.get("DOCKER", "docker"), *args], capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise SystemExit(f"docker {' '.join(args[:3])}...: {res.stderr.strip()[-500:]}")
    return res.stdout.strip()


def image_info(tag: str) -> dict:
    out = json.loads(docker("image", "inspect", tag))[0]
    cfg = out["Config"]
    return {"tag": tag, "id": out["Id"][7:19], "size_bytes": out["Size"], "size_gb": round(out["Size"] / 1e9, 2),
            "created": out["Created"][:19], "entrypoint": (cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or [])}


def largest_packages(tag: str, n: int = 8) -> list[dict]:
    """The venv's largest entries (site-packages folders), in MB, by `du` inside the image."""
    script = "du -sm /opt/venv/lib/python3*/site-packages/* | sort -rn | head -n %d" % n
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", tag, "-c", script)
    return [{"mb": int(mb), "path": Path(p).name} for mb, p in (line.split("\t") for line in out.splitlines())]


def venv_mb(tag: str) -> int:
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "du", tag, "-sm", "/opt/venv")
    return int(out.split()[0])


# ---------------------------------------------------------------- memory of a running container

def descendants(pid: int) -> list[int]:
    """pid and every process below it (the container's processes, tini first)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def server_pid(root: int) -> int:
    """The `stpm serve` process: the container's largest process."""
    return max(descendants(root), key=lambda p: status_mb(p, "VmRSS"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def container(tag: str, models_dir: Path, model: str) -> Iterator[tuple[str, int]]:
    """The image's `stpm serve` on 127.0.0.1; yields (url, host pid of its init) once the model is warm."""
    port = free_port()
    env = {"STPM_HOST": "127.0.0.1", "STPM_PORT": str(port), "STPM_DEFAULT_MODEL": model, **PINNED}
    docker("rm", "-f", CONTAINER, check=False)
    docker("run", "-d", "--name", CONTAINER, "--network", "host", "-v", f"{models_dir}:/data/models:ro",
           *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], tag)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(url + "/readyz", timeout=5)
                if r.status_code == 200 and r.json().get("warm"):
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{tag}: not ready after 180 s:\n{docker('logs', '--tail', '30', CONTAINER)}")
            time.sleep(0.5)
        ready = r.json()
        assert (ready["backend"], ready["precision"]) == ("onnxruntime", "fp32"), ready
        yield url, int(docker("inspect", "-f", "{{.State.Pid}}", CONTAINER))
    finally:
        docker("rm", "-f", CONTAINER, check=False)


def load(url: str, clients: int, seconds: float, name: str, data: bytes) -> dict:
    """`clients` threads POST /score the image for `seconds`; -> requests, errors, req/s."""
    done, errors, stop = [0], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post(url + "/score", params={"heatmap": "overlay"}, files={"files": (name, data, "image/png")})
                with lock:
                    done[0] += 1
                    errors[0] += r.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": done[0], "errors": errors[0], "req_per_s": round(done[0] / (time.monotonic() - t0), 2)}


def measure_memory(tag: str, models_dir: Path, model: str, a: argparse.Namespace) -> dict:
    name, data = test_image()
    with container(tag, models_dir, model) as (url, root):
        time.sleep(a.idle_s)
        procs = descendants(root)
        idle = sum(status_mb(p, "VmRSS") for p in procs)
        pid = server_pid(root)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        traffic = load(url, a.clients, a.seconds, name, data)
        peak = status_mb(pid, "VmHWM")
        after = status_mb(pid, "VmRSS")
        torch_mapped = "site-packages/torch/" in Path(f"/proc/{pid}/maps").read_text()
    return {"image": tag, "processes": len(procs), "idle_rss_mb": round(idle), "peak_rss_mb": round(peak),
            "rss_after_mb": round(after), "torch_mapped": torch_mapped, **traffic}


# ---------------------------------------------------------------- main

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg()),
            "docker": docker("version", "--format", "{{.Server.Version}}"),
            "storage_driver": docker("info", "--format", "{{.Driver}}")}


def models(image_size: int) -> tuple[Path, str]:
    """A bundle dir the container's user (uid 10001) can read; -> (dir, model name)."""
    d = Path(tempfile.gettempdir()) / "stpm-docker-bench-models"
    name = build_models(d, image_size)
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
    return d, name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", action="append", required=True, metavar="ROLE=TAG",
                    help="an image to measure: serve=stpm:serve, train=stpm:train, cpu=stpm:cpu ...")
    ap.add_argument("--base", default="stpm-base:bookworm", help="the base image the CPU images were built on")
    ap.add_argument("--memory", nargs="+", default=["serve", "cpu"], help="roles whose `stpm serve` is measured")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    images = dict(i.split("=", 1) for i in a.image)
    res = {"command": "benchmarks/docker_images.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "when": time.strftime("%Y-%m-%d"), "base": image_info(a.base),
           "images": {role: {**image_info(tag), "venv_mb": venv_mb(tag), "largest": largest_packages(tag)}
                      for role, tag in images.items()}}
    models_dir, model = models(a.image_size)
    res["load"] = {"model": f"random-init ResNet18 STPM, {a.image_size} px", "clients": a.clients,
                   "seconds": a.seconds, "request": "POST /score?heatmap=overlay, one 512 x 512 PNG (MVTec bottle)",
                   "pinned": PINNED}
    res["memory"] = {role: measure_memory(images[role], models_dir, model, a) for role in a.memory}
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(report.render("docker_images", res))
    report.publish(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
