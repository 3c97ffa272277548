"""Side by side with the peers: anomalib 2.7.0 STFPM and Patchcore (own virtualenv) vs this project's Scorer.

    .venv/bin/python benchmarks/peer.py --peer-python /work/venvs/anomalib/bin/python --rounds 8 --per-round 15

The peer's virtualenv: `bash benchmarks/peer_venv.sh V` (anomalib==2.7.0 openvino lightning timm onnxscript,
with this machine's torch==2.14.1 torchvision==0.29.1). Its timm backbone is built with `pretrained=False` (patched here: offline, and speed does
not depend on the weights); it is exported with `Stfpm.to_openvino(input_size=(512, 512))` (its
pre-processing, 512 -> 256 resize and normalisation, inside the graph) and run by
`OpenVINOInferencer.predict(path)`: its default (bf16 inference precision where the CPU has it) and
forced to f32. The peer the default competes with, anomalib's `Patchcore()` with its defaults
(peer_pc_ov: OpenVINOInferencer.predict at its default precision; peer_pc_torch: TorchInferencer), is built by
benchmarks/peer_patchcore.py (feature pass over the bottle train/good images, a bank of random rows of the
coreset's size, batch-1 exports) and cached in --peer-cache; its build record goes into the output.
This project: a ResNet18 STPM bundle at 256 px with random weights (benchmarks/speed.py's
speed_bundle), `Scorer(backend="auto", precision="auto")`, `score([file bytes], overlay=True)`: decode,
resize, inference, overlay at the input's 512 px, encoded PNG or JPEG; and the bare session on a ready
uint8 [1, 3, 256, 256] tensor. "quality": the defaults (PatchCore on an EfficientNet-Lite1 teacher), trained
on the bottle train/good images (or --quality-bundle), so its bf16 gate decides on a real model; at the
default scale (`--search-settings off`), the peer's 256 px: the default's settings search chooses twice the
resolution on bottle, nine tiles per image (docs/BENCHMARKS.md, "The settings search by default"), which
would compare different work.

Every contender is a persistent worker process (models loaded and warmed once); rounds are interleaved
(each round runs every contender for --per-round images, in a rotating order) so all see the same load.
Per image: wall ms and the worker process's CPU ms (all its threads). The output JSON carries the CPU
model and flags, and the load average at the start of every round. Results: benchmarks/results/peer.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STFPM_KINDS = ("peer_ov_default", "peer_ov_f32")
PATCHCORE_KINDS = ("peer_pc_ov", "peer_pc_ov_f32", "peer_pc_torch")  # benchmarks/peer_patchcore.py's PC_KINDS
PEER_KINDS = STFPM_KINDS + PATCHCORE_KINDS
# Our ResNet18 STPM (random weights: speed does not depend on them), as `auto` chooses; "_f32_" as below.
OUR_KINDS = ("ours_full_png", "ours_full_jpeg", "ours_bare_session", "ours_f32_full_png", "ours_f32_full_jpeg",
             "ours_f32_bare_session")
# The defaults (PatchCore, Lite1): as `auto` chooses; "_f32_": OpenVINO forced to f32, the proxy on a bf16 CPU for
# one without bf16 (beside the peers' f32 rows), and one fixed session for the variants of the path below;
# "_zlib": the PNG heatmap deflated by Python's zlib, the encoder before isal, so the gain shows in the same run;
# "_jpegin_": the same test images re-encoded as JPEG (quality 95, in memory) for our scorer alone, JPEG out.
QUALITY_KINDS = ("quality_full_png", "quality_full_jpeg", "quality_bare_session", "quality_f32_full_png",
                 "quality_f32_full_jpeg", "quality_f32_bare_session", "quality_f32_full_png_zlib",
                 "quality_f32_jpegin_full_jpeg")
JPEG_IN_QUALITY = 95
# --max-isa avx2: every worker's libraries told to use AVX2 at most, for a CPU with AVX-512 to stand in for
# an AVX2-only one (Zen 2). oneDNN (OpenVINO's convolutions, torch's), ATen, MKL, OpenCV and numpy honour
# these; OpenVINO's own precision choice does not (it still picks bf16, whose kernels then fail: only
# forced-f32 rows run), nor do OpenVINO's MLAS matrix products (its FullyConnected, PatchCore's bank
# search), its JIT eltwise kernels, ONNX Runtime or ISA-L. Each OpenVINO worker records which kernels ran.
AVX512_OPENCV = "AVX512_COMMON,AVX512_SKX,AVX512_KNL,AVX512_KNM,AVX512_CNL,AVX512_CLX,AVX512_ICL"
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                     "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENCV_CPU_DISABLE": AVX512_OPENCV,
                     "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL"}}


def kernel_counts(compiled) -> dict[str, int]:
    """An OpenVINO compiled model's kernels by ISA (after its first inference): how many nodes run AVX-512,
    AVX2 or MLAS code (the rest: reference, reorder or no code of their own)."""
    counts = {"avx512": 0, "avx2": 0}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if "primitiveType" in rt:
            prim = rt["primitiveType"].astype(str)
            key = "avx512" if "avx512" in prim else "avx2" if "avx2" in prim else None
            if key:
                counts[key] += 1
            elif "mlas" in prim:
                counts["mlas (not capped)"] = counts.get("mlas (not capped)", 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ workers

def _peer_predictor(kind: str, workdir: Path, peer_cache: Path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peer_patchcore

    if kind in PATCHCORE_KINDS:
        return peer_patchcore.predictor(kind, peer_cache)
    peer_patchcore.offline_timm()  # speed does not depend on the weights
    from anomalib.deploy import OpenVINOInferencer
    from anomalib.models import Stfpm

    xml = workdir / "peer_ov" / "weights" / "openvino" / "model.xml"
    if not xml.is_file():
        model = Stfpm(backbone="resnet18")
        model.eval()
        model.to_openvino(export_root=workdir / "peer_ov", input_size=(512, 512))
    config = {"INFERENCE_PRECISION_HINT": "f32"} if kind == "peer_ov_f32" else None
    inf = OpenVINOInferencer(path=xml, device="CPU", config=config)
    info = {"inference_precision": str(inf.model.get_property("INFERENCE_PRECISION_HINT")),
            "threads": int(inf.model.get_property("INFERENCE_NUM_THREADS")), "_openvino": [inf.model]}
    return (lambda path: float(inf.predict(str(path)).pred_score.ravel()[0])), info


def _as_jpegs(images: list[Path]) -> dict[Path, bytes]:
    """Each image re-encoded as a JPEG (quality JPEG_IN_QUALITY), in memory."""
    import io

    from PIL import Image

    out = {}
    for p in images:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, "JPEG", quality=JPEG_IN_QUALITY)
        out[p] = buf.getvalue()
    return out


def _our_predictor(kind: str, bundle_dir: Path, images: list[Path]):
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from stpm.imaging import render
    from stpm.runtime.scorer import Scorer

    if "_f32_" in kind:
        s = Scorer(bundle_dir, backend="openvino", precision="fp32", fall_back_to_fp32=False)
    else:
        s = Scorer(bundle_dir, backend="auto", precision="auto")
    if kind.endswith("_zlib"):
        render._ISAL = None  # this worker process only: PNG deflate by Python's zlib, as before isal
    info = {"backend": s.backend, "precision": s.precision, "selection": s.selection.to_dict(),
            "png_deflate": render.default_deflate()}
    stages = getattr(s.session, "_stages", None)  # OpenVINO: its compiled models
    if stages:
        info["_openvino"] = list(stages)
    if kind.endswith("_bare_session"):
        batch = np.random.default_rng(0).integers(0, 256, (1, 3, s.image_size, s.image_size), dtype=np.uint8)
        return (lambda path: float(s.infer(batch)[1][0])), info
    fmt = "jpeg" if kind.endswith("_full_jpeg") else "png"
    assert kind.endswith(("_full_png", "_full_jpeg", "_full_png_zlib")), kind
    jpegs = _as_jpegs(images) if "_jpegin_" in kind else {}  # encoded before any timed call

    def predict(path: Path) -> float:
        r = s.score([jpegs[path] if jpegs else path.read_bytes()], overlay=True, heatmap_format=fmt)[0]
        assert r.overlay_image is not None
        return r.raw_score

    return predict, info


def worker(kind: str, workdir: Path, bundle_dir: Path | None, images: list[Path], peer_cache: Path) -> None:
    """Load, warm up, say ready; then for each "N" on stdin score the next N images and answer with times.
    The answers go to the original stdout; whatever the libraries print goes to stderr."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if kind in PEER_KINDS:
        predict, info = _peer_predictor(kind, workdir, peer_cache)
    else:
        predict, info = _our_predictor(kind, bundle_dir, images)
    for p in images[:5]:
        predict(p)
    if "_openvino" in info:  # after the warm-up: a dynamic-shape node picks its kernel at its first inference
        info["kernels"] = [kernel_counts(c) for c in info.pop("_openvino")]
    print(json.dumps({"ready": kind, "info": info}), file=proto, flush=True)
    i = 0
    for line in sys.stdin:
        n = int(line)
        wall, cpu = [], []
        for _ in range(n):
            p = images[i % len(images)]
            i += 1
            w0, c0 = time.perf_counter(), time.process_time()
            predict(p)
            cpu.append((time.process_time() - c0) * 1e3)
            wall.append((time.perf_counter() - w0) * 1e3)
        print(json.dumps({"wall_ms": wall, "cpu_ms": cpu}), file=proto, flush=True)


# ------------------------------------------------------------------------------------------ driver

def cpu_info() -> dict:
    from stpm.runtime.cpu import cpu_flags, cpu_name

    keep = [f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return {"model": cpu_name(), "cores": os.cpu_count(), "simd_flags": sorted(keep)}


def pct(xs: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(np.asarray(xs), q)), 2)


def _shared_bottle() -> Path:
    return Path(os.environ.get("STPM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "mvtec_ad_bottle_512" / "bottle"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", default="/work/venvs/anomalib/bin/python")
    ap.add_argument("--images", default=None, help="folder of 512 px PNGs (default: the bottle test set)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=15)
    ap.add_argument("--kinds", default=",".join(PEER_KINDS + OUR_KINDS + QUALITY_KINDS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peer.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", default=None, help="our ResNet18 bundle (default: random weights at 256 px)")
    ap.add_argument("--quality-bundle", default=None,
                    help="a bundle trained with the defaults (default: `stpm train` on the bottle train/good now)")
    ap.add_argument("--peer-cache", default=str(ROOT / "benchmarks" / "work" / "peer_patchcore"),
                    help="the peer Patchcore's exports and build record (built here when missing)")
    ap.add_argument("--peer-refit", action="store_true", help="fit and export the peer Patchcore again")
    ap.add_argument("--max-isa", choices=sorted(ISA_CAPS), default=None,
                    help="cap every worker's libraries at this instruction set (ISA_CAPS; forced-f32 OpenVINO "
                         "rows only: see the note at ISA_CAPS)")
    a = ap.parse_args()
    a.peer_cache = str(Path(a.peer_cache).resolve())  # the workers run in a temporary folder
    a.images = str(Path(a.images).resolve()) if a.images else None
    return a


def _bundles(kinds: list[str], a: argparse.Namespace, tmp: Path) -> dict[str, str]:
    """Our bundles: the random-weight ResNet18 STPM, and the defaults trained on the bottle train/good now."""
    from speed import speed_bundle

    bundles = {}
    if any(k in OUR_KINDS for k in kinds):
        bundles["ours"] = a.bundle or str(speed_bundle(tmp / "models"))
    if any(k in QUALITY_KINDS for k in kinds):  # the quality default, trained for real: bf16 ships only if it holds
        if a.quality_bundle is None:
            subprocess.run([sys.executable, "-m", "stpm.cli", "train", str(_shared_bottle()),
                            "--name", "quality", "--models-dir", str(tmp / "models"), "--search-settings", "off"],
                           check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            a.quality_bundle = str(tmp / "models" / "quality" / "v1")
        bundles["quality"] = a.quality_bundle
    return bundles


def _peer_patchcore_build(a: argparse.Namespace) -> dict:
    """Fit and export the peer Patchcore in its virtualenv unless cached; its build record."""
    cmd = [a.peer_python, str(ROOT / "benchmarks" / "peer_patchcore.py"),
           "--train", str(_shared_bottle() / "train" / "good"), "--cache", a.peer_cache] + (["--refit"] if a.peer_refit else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    return json.loads((Path(a.peer_cache) / "build.json").read_text())


def _start_workers(kinds: list[str], a: argparse.Namespace, tmp: Path, bundles: dict[str, str]):
    procs, infos = {}, {}
    for k in kinds:  # one at a time: model export / load must not overlap the others' warm-up
        py = a.peer_python if k in PEER_KINDS else sys.executable
        cmd = [py, str(Path(__file__).resolve()), "--worker", k, "--workdir", str(tmp), "--peer-cache", a.peer_cache]
        cmd += ["--images", a.images] if a.images else []
        cmd += ["--bundle", bundles[k.split("_")[0]]] if k not in PEER_KINDS else []
        env = {**os.environ, "TRUST_REMOTE_CODE": "1", "PYTHONWARNINGS": "ignore", **ISA_CAPS.get(a.max_isa, {})}
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                             cwd=str(tmp))  # the peer writes ./openvino_cache: keep it out of the repo
        line = p.stdout.readline()
        if not line:
            sys.exit(f"worker {k} failed to start ({p.wait()})")
        infos[k] = json.loads(line)["info"]
        procs[k] = p
        print(f"{k} ready: {infos[k]}", file=sys.stderr, flush=True)
    return procs, infos


def _rounds(kinds: list[str], procs: dict, a: argparse.Namespace) -> tuple[dict, dict, dict, list[float]]:
    """Interleaved rounds, each contender --per-round images in a rotating order; wall and CPU ms per image."""
    wall = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    per_round = {k: [] for k in kinds}  # each round's p50: shows a contender drifting over the run
    loads = []
    for r in range(a.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            procs[k].stdin.write(f"{a.per_round}\n")
            procs[k].stdin.flush()
            res = json.loads(procs[k].stdout.readline())
            wall[k] += res["wall_ms"]
            cpu[k] += res["cpu_ms"]
            per_round[k].append(pct(res["wall_ms"], 50))
        print(f"round {r + 1}/{a.rounds} load {loads[-1]}: "
              + ", ".join(f"{k} {pct(wall[k], 50)}" for k in kinds), file=sys.stderr, flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait(timeout=60)
    return wall, cpu, per_round, loads


def _ratios(out: dict) -> None:
    """p50 ratios to each peer's OpenVINO row, and decode + render's share of the bare session."""
    rows = out["rows"]
    for ref, key in (("peer_ov_default", "vs_peer_ov_default_p50"), ("peer_pc_ov", "vs_peer_pc_ov_p50"),
                     ("peer_ov_f32", "vs_peer_ov_f32_p50"), ("peer_pc_ov_f32", "vs_peer_pc_ov_f32_p50")):
        if ref in rows:
            out[key] = {k: round(v["p50_ms"] / rows[ref]["p50_ms"], 3) for k, v in rows.items()}
            if all("round_p50_ms" in v for v in rows.values()):  # the ratio within each round: its lowest, highest
                per = {k: [x / y for x, y in zip(v["round_p50_ms"], rows[ref]["round_p50_ms"])] for k, v in rows.items()}
                out[key + "_round_range"] = {k: [round(min(r), 3), round(max(r), 3)] for k, r in per.items()}
    out["decode_render_share_of_bare"] = {}
    for k, r in rows.items():  # each full path against its bundle's bare session on the same backend
        bare_key = k.split("_full_")[0].replace("_jpegin", "") + "_bare_session"
        if "_full_" in k and bare_key in rows:
            bare, bare_cpu = rows[bare_key]["p50_ms"], rows[bare_key]["cpu_p50_ms"]
            out["decode_render_share_of_bare"][k] = {
                "wall": round((r["p50_ms"] - bare) / bare, 3), "cpu": round((r["cpu_p50_ms"] - bare_cpu) / bare_cpu, 3)}


def main() -> int:
    a = _args()
    images = sorted(Path(a.images).rglob("*.png")) if a.images else sorted((_shared_bottle() / "test").rglob("*.png"))
    if not images:
        sys.exit("no images found (--images, or the shared bottle data)")
    if a.worker:
        worker(a.worker, Path(a.workdir), Path(a.bundle) if a.bundle else None, images, Path(a.peer_cache))
        return 0

    kinds = a.kinds.split(",")
    unknown = sorted(set(kinds) - set(PEER_KINDS + OUR_KINDS + QUALITY_KINDS))
    if unknown:
        sys.exit(f"unknown --kinds {unknown}; known: {', '.join(PEER_KINDS + OUR_KINDS + QUALITY_KINDS)}")
    uncapped = [k for k in kinds if "f32" not in k]
    if a.max_isa and uncapped:
        sys.exit(f"--max-isa runs forced-f32 OpenVINO rows only (OpenVINO picks bf16 whatever the cap, and ONNX "
                 f"Runtime ignores it): drop {uncapped}")
    tmp = Path(tempfile.mkdtemp(prefix="stpm-peer-"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    bundles = _bundles(kinds, a, tmp)
    build = _peer_patchcore_build(a) if any(k in PATCHCORE_KINDS for k in kinds) else None
    procs, infos = _start_workers(kinds, a, tmp, bundles)
    wall, cpu, per_round, loads = _rounds(kinds, procs, a)

    rows = {k: {"p50_ms": pct(wall[k], 50), "p95_ms": pct(wall[k], 95), "cpu_p50_ms": pct(cpu[k], 50),
                "cpu_p95_ms": pct(cpu[k], 95), "n": len(wall[k]), "round_p50_ms": per_round[k], "info": infos[k]}
            for k in kinds}
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv), "cpu": cpu_info(),
           "isa_cap": None if a.max_isa is None else {"max_isa": a.max_isa, "env": ISA_CAPS[a.max_isa]},
           "load_average_per_round": loads, "load_average_end": [round(x, 2) for x in os.getloadavg()],
           "images": f"{len(images)} PNGs, first {images[0]}", "rows": rows}
    if build is not None:
        out["peer_patchcore_build"] = build
    _ratios(out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    import report

    report.publish(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
