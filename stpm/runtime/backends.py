"""Inference sessions: the one place that creates them, and how a backend and precision are chosen.

Backends (each a session factory plus the precisions it can run):

- ``onnxruntime``: CPU, CUDA and TensorRT execution providers (IO binding on the GPU ones);
  precisions fp32 (``scorer.onnx``), fp16 (``scorer_fp16.onnx``, for GPUs), int8 (``scorer_int8.onnx``).
- ``openvino``: the ``openvino`` package reads ``scorer.onnx`` directly (CPU device). Precisions fp32
  (f32 inference precision, set explicitly: OpenVINO's default on a bf16 CPU is bf16), bf16 (bf16
  inference precision, only where the CPU flags say ``avx512_bf16`` or ``amx_bf16``; the same file)
  and int8 (``scorer_int8.onnx``).

A precision other than fp32 is used only where the bundle records that it holds parity
(``manifest["exports"][precision]["shipped"]``, measured by stpm.export) and this machine can run it.
``select`` resolves a request ("auto" or a name, for backend and precision); "auto" times the
candidates on this machine and keeps the fastest. A precision the bundle or the machine lacks falls
back to fp32 with a warning, never an error: the service stays up.

numpy only at import time; onnxruntime and openvino are imported when a session is made (no torch).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stpm.bundle import names
from stpm.bundle.names import INPUT, SCORER_OUTPUTS

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PRECISION_FILES = {**names.PRECISION_FILES, "bf16": names.SCORER_ONNX}  # bf16: the fp32 graph, run in bf16
BACKEND_PRECISIONS = {"onnxruntime": ("fp32", "fp16", "int8"), "openvino": ("fp32", "bf16", "int8")}
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AUTO_MARGIN = 0.10  # "auto" keeps the preferred candidate unless another is this much faster
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products; without them int8 is slower than fp32


# ------------------------------------------------------------------------------------------ CPU

@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, read at run time (/proc/cpuinfo, else `lscpu`); empty if neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Flags:"):
                return frozenset(line.split(":", 1)[1].split())
    except (OSError, subprocess.SubprocessError):
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_precision_support(precision: str, flags: frozenset[str] | None = None) -> str | None:
    """None if this CPU runs `precision` natively, else the reason it does not."""
    flags = cpu_flags() if flags is None else flags
    if precision == "bf16" and not any(f in flags for f in BF16_FLAGS):
        return f"this CPU has no bf16 instructions (none of {', '.join(BF16_FLAGS)} in its flags)"
    if precision == "int8" and not any(f in flags for f in INT8_FLAGS):
        return f"this CPU has no int8 dot-product instructions (none of {', '.join(INT8_FLAGS)} in its flags)"
    return None


def openvino_available() -> str | None:
    """None if the openvino package imports, else why not."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"the openvino package is not installed ({e})"
    return None


# ------------------------------------------------------------------------------ ONNX metadata

def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """Top-level (field number, wire type, value) of a protobuf message; length-delimited values as views."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, v


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata_props (ModelProto field 14) without the onnx package: what OpenVINO
    does not expose. The graph (field 7) is skipped, not parsed."""
    buf = memoryview(Path(path).read_bytes())
    out: dict[str, str] = {}
    for num, wt, v in _fields(buf):
        if num == 14 and wt == 2:
            kv = {n: bytes(x).decode() for n, w, x in _fields(v) if w == 2}
            out[kv.get(1, "")] = kv.get(2, "")
    return out


# ----------------------------------------------------------------------------------- sessions

class Session(Protocol):
    """uint8 tiles [N, 3, S, S] -> (raw maps [N, S, S], raw scores [N], normalised scores [N]), float32."""

    backend: str
    precision: str
    devices: list[str]  # ONNX Runtime providers in use, or the OpenVINO device

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def metadata(self) -> dict[str, str]: ...


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Requested names ("auto", short aliases or full provider names) -> the installed ones, in order.

    "auto" means TensorRT -> CUDA -> CPU. Requested providers that are not installed are dropped with
    a warning; the CPU provider always closes the list as the last fallback. Unknown names raise."""
    wanted: list[str] = []
    explicit: set[str] = set()
    for r in requested:
        if r == "auto":
            wanted.extend(AUTO_PROVIDERS)
            continue
        full = PROVIDER_ALIASES.get(r.lower(), r)
        if not full.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {r!r}; use auto, {', '.join(PROVIDER_ALIASES)} or a full name")
        wanted.append(full)
        explicit.add(full)
    out: list[str] = []
    for p in wanted:
        if p in out:
            continue
        if p in available:
            out.append(p)
        elif p in explicit:
            log.warning("execution provider %s is not available in this onnxruntime (%s); falling back",
                        p, ", ".join(available))
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def ort_session(
    path: str | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    provider_options: Sequence[dict[str, Any]] | None = None,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
):
    """A plain ONNX Runtime session on any graph of a bundle (teacher, student, scorer): full graph
    optimisation, sequential execution, memory arena and pattern (fixed spatial size: the plan is
    reused across runs), quiet logs. OrtSession wraps it for scorer graphs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    so.log_severity_level = 3
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        so.inter_op_num_threads = int(inter_op_threads)
    return ort.InferenceSession(str(path), so, providers=list(providers),
                                provider_options=list(provider_options) if provider_options is not None else None)


class OrtSession:
    """An ONNX Runtime session of a scorer graph; IO binding on CUDA / TensorRT."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        precision: str = "fp32",
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        max_batch: int = 16,
        trt_cache_dir: str | Path | None = None,
        image_size: int | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        self.precision = precision
        chosen = choose_providers(providers, ort.get_available_providers())
        opts: list[dict[str, Any]] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                shape = f"3x{image_size}x{image_size}" if image_size else self._input_shape(ort)
                o: dict[str, Any] = {
                    "trt_fp16_enable": precision == "fp16",
                    "trt_int8_enable": False,
                    "trt_profile_min_shapes": f"{INPUT}:1x{shape}",
                    "trt_profile_opt_shapes": f"{INPUT}:{max_batch}x{shape}",
                    "trt_profile_max_shapes": f"{INPUT}:{max_batch}x{shape}",
                }
                if trt_cache_dir is not None:
                    o.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir))
                opts.append(o)
            elif p == "CUDAExecutionProvider":
                opts.append({"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE"})
            else:
                opts.append({})
        self.session = ort_session(self.path, chosen, opts, intra_op_threads, inter_op_threads)
        self.devices: list[str] = list(self.session.get_providers())
        if self.devices[0] != chosen[0]:
            log.warning("execution provider %s failed to initialise; running on %s", chosen[0], self.devices[0])
        self._io_binding = self.devices[0] in GPU_PROVIDERS

    def _input_shape(self, ort) -> str:
        """'3x S x S' of the graph's input (TensorRT profiles need the static dims)."""
        probe = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        return "x".join(str(d) for d in probe.get_inputs()[0].shape[1:])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if self._io_binding:
            io = self.session.io_binding()
            io.bind_cpu_input(INPUT, batch)
            for o in SCORER_OUTPUTS:
                io.bind_output(o, "cuda")
            self.session.run_with_iobinding(io)
            maps, raw, score = io.copy_outputs_to_cpu()
        else:
            maps, raw, score = self.session.run(list(SCORER_OUTPUTS), {INPUT: batch})
        return maps, raw, score

    def run_outputs(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Any graph (teacher/student features too): ONNX Runtime's own run."""
        return self.session.run(None if names is None else list(names), feeds)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


BANK_MIN_ELEMENTS = 65536  # a MatMul with a constant this large is a memory-bank search (PatchCore)


def split_bank_search(model):
    """An OpenVINO model of a memory-bank scorer -> (features, search) models, or None if the graph has
    no bank search. features: images -> the query tensor of the bank MatMuls; search: (queries, images)
    -> the scorer outputs (images only for the shapes the tail reads). Measured on PatchCore bundles
    (benchmarks/bf16_split.py, docs/BENCHMARKS.md "Peer"): the whole graph in bf16 moves image scores
    by a few per cent (the error is in the backbone's activations), the split by under one per cent."""
    import openvino as ov
    import openvino.opset13 as ops

    def bank_side(op) -> int | None:
        if op.get_type_name() != "MatMul":
            return None
        for i in (0, 1):
            src = op.input_value(i)
            if src.get_node().get_type_name() == "Constant" and int(np.prod(src.get_shape())) >= BANK_MIN_ELEMENTS:
                return i
        return None

    queries = set()
    for op in model.get_ordered_ops():
        side = bank_side(op)
        if side is not None:
            queries.add(op.input_value(1 - side))
    if len(queries) != 1:  # no bank, or a graph shape this split does not know
        return None
    q = next(iter(queries))
    features = ov.Model([ops.result(q)], model.get_parameters(), "features")
    tail = model.clone()
    by_name = {op.get_friendly_name(): op for op in tail.get_ordered_ops()}
    q2 = by_name[q.get_node().get_friendly_name()].output(q.get_index())
    param = ops.parameter(q2.get_partial_shape(), q2.get_element_type(), name="queries")
    for target in list(q2.get_target_inputs()):
        target.replace_source_output(param.output(0))
    search = ov.Model(tail.get_results(), [param, *tail.get_parameters()], "search")
    return features, search


class OpenVinoSession:
    """An OpenVINO compiled model of a scorer graph (CPU). Thread-safe: one infer request per thread.

    bf16 on a memory-bank graph (PatchCore) runs the features in f32 and only the bank search in bf16
    (see split_bank_search); other graphs run wholly in bf16."""

    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        precision: str = "fp32",
        threads: int | None = None,
        device: str = "CPU",
    ):
        import openvino as ov

        if precision not in BACKEND_PRECISIONS["openvino"]:
            raise ValueError(f"openvino runs {', '.join(BACKEND_PRECISIONS['openvino'])}, not {precision}")
        self.path = Path(path)
        self.precision = precision
        core = ov.Core()

        def config(p: str) -> dict[str, Any]:
            # f32 set explicitly: OpenVINO would pick bf16 on a bf16 CPU (also for the int8 graph's float layers)
            c: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": p}
            if threads:
                c["INFERENCE_NUM_THREADS"] = int(threads)
            return c

        model = core.read_model(str(self.path))
        parts = split_bank_search(model) if precision == "bf16" else None
        self.mode = "bf16 bank search, f32 features" if parts else ("bf16" if precision == "bf16" else "f32")
        if parts:
            self._stages = [core.compile_model(parts[0], device, config("f32")),
                            core.compile_model(parts[1], device, config("bf16"))]
        else:
            self._stages = [core.compile_model(model, device, config("bf16" if precision == "bf16" else "f32"))]
        self.compiled = self._stages[-1]
        self.devices = [device]
        outs = list(self.compiled.outputs)  # an output may carry several names (OpenVINO keeps the ONNX one)
        missing = [n for n in SCORER_OUTPUTS if not any(n in o.get_names() for o in outs)]
        if missing:
            raise ValueError(f"{self.path}: no output named {', '.join(missing)} (not a scorer graph?)")
        self._outputs = [next(o for o in outs if n in o.get_names()) for n in SCORER_OUTPUTS]
        self._local = threading.local()

    def _requests(self) -> list:
        r = getattr(self._local, "requests", None)
        if r is None:
            r = self._local.requests = [c.create_infer_request() for c in self._stages]
        return r

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        reqs = self._requests()
        if len(reqs) == 2:
            queries = reqs[0].infer({0: batch}, share_inputs=True, share_outputs=False)[0]
            res = reqs[1].infer({0: queries, 1: batch}, share_inputs=True, share_outputs=False)
        else:
            res = reqs[0].infer({INPUT: batch}, share_inputs=True, share_outputs=False)
        return tuple(np.asarray(res[o], dtype=np.float32) for o in self._outputs)  # type: ignore[return-value]

    def metadata(self) -> dict[str, str]:
        return onnx_metadata(self.path)


def create_session(
    path: str | Path,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    *,
    providers: Sequence[str] = ("cpu",),
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    max_batch: int = 16,
    trt_cache_dir: str | Path | None = None,
    image_size: int | None = None,
) -> OrtSession | OpenVinoSession:
    """A session of one graph file on one backend, no questions asked (see `select` for the choosing)."""
    if backend == "onnxruntime":
        return OrtSession(path, precision, providers, intra_op_threads, inter_op_threads, max_batch, trt_cache_dir,
                          image_size)
    if backend == "openvino":
        return OpenVinoSession(path, precision, intra_op_threads)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def cpu_session(path: str | Path, threads: int | None = None) -> OrtSession:
    """The reference: ONNX Runtime, CPU provider, fp32 semantics of whatever graph `path` holds."""
    return OrtSession(path, "fp32", ("cpu",), threads)


# ---------------------------------------------------------------------------------- selection

@dataclass
class Selection:
    """What was asked, what runs, and why (shown in logs, /readyz and /models)."""

    backend: str
    precision: str
    requested_backend: str
    requested_precision: str
    devices: list[str]
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # "backend/precision" -> best batch-1 ms
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "requested_backend": self.requested_backend,
                "requested_precision": self.requested_precision, "devices": list(self.devices),
                "reason": self.reason, "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
                "warnings": list(self.warnings)}


def bundle_precisions(manifest: dict[str, Any], bundle_dir: str | Path) -> dict[str, str | None]:
    """precision -> None if the bundle holds it (file recorded and present, parity shipped), else why not."""
    exports = manifest.get("exports") or {}
    files = exports.get("files") or {}
    out: dict[str, str | None] = {}
    for p in PRECISIONS:
        fname = PRECISION_FILES[p]
        record = exports.get(p) if p != "fp32" else None
        if fname not in files or not (Path(bundle_dir) / fname).is_file():
            out[p] = f"the bundle has no {fname}" + (" (run `stpm export`)" if p == "fp32" else "")
        elif p == "fp32":
            out[p] = None
        elif not record:
            out[p] = f"the bundle records no {p} parity check (run `stpm export --precisions {p}`)"
        elif not record.get("shipped"):
            out[p] = f"{p} did not hold parity for this bundle (see exports.{p} in its manifest)"
        else:
            out[p] = None
    return out


def _gpu_requested(providers: Sequence[str]) -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in GPU_PROVIDERS for p in choose_providers(providers, ort.get_available_providers()))


def time_session(session: Session, image_size: int, runs: int = 5, warmup: int = 2) -> float:
    """Best wall ms of a batch-1 run (the minimum: robust to other processes' load)."""
    x = np.random.default_rng(0).integers(0, 256, (1, 3, image_size, image_size), dtype=np.uint8)
    for _ in range(warmup):
        session.run(x)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(x)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def env_choice(value: str | None, env: str) -> str:
    """An explicit value, else the environment variable, else "auto"."""
    if value is not None:
        return value
    return os.environ.get(env, "").strip().lower() or "auto"


def select(
    bundle_dir: str | Path,
    manifest: dict[str, Any],
    image_size: int,
    backend: str | None = None,
    precision: str | None = None,
    *,
    providers: Sequence[str] = ("auto",),
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    max_batch: int = 16,
    trt_cache_dir: str | Path | None = None,
    fall_back_to_fp32: bool = True,
) -> tuple[OrtSession | OpenVinoSession, Selection]:
    """Resolve backend and precision for a bundle on this machine and create the session.

    backend / precision: a name, "auto", or None (environment STPM_BACKEND / STPM_PRECISION, else
    "auto"). Unknown names raise ValueError. A precision the bundle does not hold, the machine cannot
    run, or the backend does not offer falls back (with a warning) to fp32; an unavailable backend
    falls back to onnxruntime; with fall_back_to_fp32=False, an explicit precision the bundle does not
    hold raises BundleError naming it instead. With "auto" in either, every remaining candidate is timed at batch 1
    on this machine and the fastest is kept (GPU providers: ONNX Runtime only)."""
    req_b, req_p = env_choice(backend, "STPM_BACKEND"), env_choice(precision, "STPM_PRECISION")
    if req_b not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {req_b!r}")
    if req_p not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {req_p!r}")
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log.warning("%s: %s", Path(bundle_dir), msg)

    held = bundle_precisions(manifest, bundle_dir)
    for p in ("fp32",) if fall_back_to_fp32 or req_p == "auto" else ("fp32", req_p):
        if held[p] is not None:
            from stpm.bundle.store import BundleError

            raise BundleError(f"{bundle_dir}: no {p} scorer: {held[p]}")
    gpu = _gpu_requested(providers)
    backends = list(BACKENDS) if req_b == "auto" else [req_b]
    if gpu:  # OpenVINO runs here on the CPU only: with a GPU provider at hand, ONNX Runtime drives it
        if req_b == "openvino":
            warn("openvino runs on the CPU here while a GPU execution provider is available; using openvino anyway")
        else:
            backends = ["onnxruntime"]
    if "openvino" in backends:
        why = openvino_available()
        if why:
            backends.remove("openvino")
            if req_b == "openvino":
                warn(f"backend openvino requested but {why}; falling back to onnxruntime")
                backends = ["onnxruntime"]

    def usable(b: str, p: str) -> str | None:
        """None if (b, p) is a candidate. An explicit request runs where it works at all (fp16 on the
        CPU provider, int8 without VNNI: slow, not wrong); "auto" takes only what this hardware speeds up.
        bf16 needs the CPU's bf16 instructions either way (OpenVINO would silently run f32)."""
        if p not in BACKEND_PRECISIONS[b]:
            return f"{b} does not run {p}"
        if held[p] is not None:
            return held[p]
        measured_on = ((manifest.get("exports") or {}).get(p) or {}).get("backend") if p != "fp32" else None
        if measured_on and measured_on != b:
            return f"{p} parity was measured on {measured_on}, not {b}"
        if b == "onnxruntime" and gpu:
            return "int8 is for CPUs" if p == "int8" and req_p == "auto" else None
        if p == "fp16" and req_p == "auto":
            return "fp16 is for GPUs (no GPU execution provider is in use)"
        if p == "bf16" or req_p == "auto":
            return cpu_precision_support(p)
        return None

    # in order of preference: a later candidate must be AUTO_MARGIN faster to win (stable under noise)
    precisions = ["int8", "bf16", "fp16", "fp32"] if req_p == "auto" else [req_p]
    if "openvino" in backends:
        backends = ["openvino"] + [b for b in backends if b != "openvino"]
    cands = [(b, p) for b in backends for p in precisions if usable(b, p) is None]
    if not cands:
        reasons = "; ".join(f"{b}: {usable(b, req_p)}" for b in backends)
        warn(f"precision {req_p} is not available ({reasons}); falling back to fp32")
        cands = [(b, "fp32") for b in backends]

    kw = dict(providers=providers, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
              max_batch=max_batch, trt_cache_dir=trt_cache_dir, image_size=image_size)
    timings: dict[str, float] = {}
    best: tuple[float, Any, tuple[str, str]] | None = None
    for b, p in cands:
        try:
            s = create_session(Path(bundle_dir) / PRECISION_FILES[p], b, p, **kw)
        except Exception as e:  # noqa: BLE001 - a backend that cannot load this graph is skipped, said why
            warn(f"{b}/{p} could not be created ({type(e).__name__}: {e})")
            continue
        if len(cands) == 1:
            best = (0.0, s, (b, p))
            break
        ms = time_session(s, image_size)
        timings[f"{b}/{p}"] = ms
        if best is None or ms < best[0] * (1.0 - AUTO_MARGIN):
            best = (ms, s, (b, p))
        del s
    if best is None:
        if cands == [("onnxruntime", "fp32")]:
            raise RuntimeError(f"{bundle_dir}: no session could be created (see the warnings above)")
        warn("no candidate session could be created; falling back to onnxruntime/fp32")
        s = create_session(Path(bundle_dir) / PRECISION_FILES["fp32"], "onnxruntime", "fp32", **kw)
        best = (0.0, s, ("onnxruntime", "fp32"))
    _, session, (b, p) = best
    if timings:
        reason = "fastest on this machine of " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(timings.items(),
                                                                                          key=lambda kv: kv[1]))
    elif req_b == b and req_p == p:
        reason = "as requested"
    else:
        reason = "the only candidate" + (" after fallback" if warnings else "")
    sel = Selection(b, p, req_b, req_p, list(session.devices), reason, timings, warnings)
    return session, sel


__all__ = [
    "BACKENDS",
    "BACKEND_PRECISIONS",
    "PRECISIONS",
    "PRECISION_FILES",
    "OpenVinoSession",
    "OrtSession",
    "Selection",
    "Session",
    "bundle_precisions",
    "choose_providers",
    "cpu_flags",
    "cpu_name",
    "cpu_precision_support",
    "cpu_session",
    "create_session",
    "onnx_metadata",
    "openvino_available",
    "ort_session",
    "select",
    "split_bank_search",
    "time_session",
]
