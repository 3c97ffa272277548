"""Inference sessions of a bundle's graphs: the one place that creates them.

- ``onnxruntime``: CPU, CUDA and TensorRT execution providers (IO binding on the GPU ones);
  precisions fp32 (``scorer.onnx``), fp16 (``scorer_fp16.onnx``, for GPUs), int8 (``scorer_int8.onnx``).
- ``openvino``: the ``openvino`` package reads ``scorer.onnx`` directly (CPU device). Precisions fp32
  (f32 inference precision, set explicitly: OpenVINO's default on a bf16 CPU is bf16), bf16 (bf16
  inference precision, only where the CPU flags say ``avx512_bf16`` or ``amx_bf16``; the same file)
  and int8 (``scorer_int8.onnx``).

A graph's ONNX metadata (``stpm.manifest_digest`` and the rest that stpm.export writes) comes from the
backend that loaded it: ONNX Runtime's model metadata, OpenVINO's ``rt_info["framework"]``.
numpy only at import time; onnxruntime and openvino are imported when a session is made (no torch).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
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
BANK_MIN_ELEMENTS = 65536  # a MatMul with a constant this large is a memory-bank search (PatchCore)


class Session(Protocol):
    """uint8 tiles [N, 3, S, S] -> (raw maps [N, S, S], raw scores [N], normalised scores [N]), float32."""

    backend: str
    precision: str
    devices: list[str]  # ONNX Runtime providers in use, or the OpenVINO device

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def metadata(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class SessionOptions:
    """How a session runs, whatever the backend (OpenVINO reads the thread count only)."""

    providers: Sequence[str] = ("cpu",)  # ONNX Runtime: "auto", short aliases or full provider names
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    max_batch: int = 16  # TensorRT's profile: the most tiles per run
    trt_cache_dir: str | Path | None = None
    image_size: int | None = None  # TensorRT's profile: the tile size (read from the graph when None)


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


def gpu_requested(providers: Sequence[str]) -> bool:
    """True if the providers asked for include an installed GPU provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in GPU_PROVIDERS for p in choose_providers(providers, ort.get_available_providers()))


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


def _provider_options(provider: str, precision: str, options: SessionOptions, input_shape) -> dict[str, Any]:
    """ONNX Runtime options of one provider; input_shape() -> '3xSxS' (TensorRT's profiles need it)."""
    if provider == "TensorrtExecutionProvider":
        shape = f"3x{options.image_size}x{options.image_size}" if options.image_size else input_shape()
        o: dict[str, Any] = {
            "trt_fp16_enable": precision == "fp16",
            "trt_int8_enable": False,
            "trt_profile_min_shapes": f"{INPUT}:1x{shape}",
            "trt_profile_opt_shapes": f"{INPUT}:{options.max_batch}x{shape}",
            "trt_profile_max_shapes": f"{INPUT}:{options.max_batch}x{shape}",
        }
        if options.trt_cache_dir is not None:
            o.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(options.trt_cache_dir))
        return o
    if provider == "CUDAExecutionProvider":
        return {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    return {}


class OrtSession:
    """An ONNX Runtime session of a scorer graph; IO binding on CUDA / TensorRT."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, precision: str = "fp32", options: SessionOptions = SessionOptions()):
        import onnxruntime as ort

        self.path = Path(path)
        self.precision = precision
        chosen = choose_providers(options.providers, ort.get_available_providers())
        opts = [_provider_options(p, precision, options, self._input_shape) for p in chosen]
        self.session = ort_session(self.path, chosen, opts, options.intra_op_threads, options.inter_op_threads)
        self.devices: list[str] = list(self.session.get_providers())
        if self.devices[0] != chosen[0]:
            log.warning("execution provider %s failed to initialise; running on %s", chosen[0], self.devices[0])
        self._io_binding = self.devices[0] in GPU_PROVIDERS

    def _input_shape(self) -> str:
        """'3 x S x S' of the graph's input (TensorRT profiles need the static dims)."""
        import onnxruntime as ort

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
        """The graph's ONNX metadata_props, as ONNX Runtime read them."""
        return dict(self.session.get_modelmeta().custom_metadata_map)


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

    queries = {op.input_value(1 - side) for op in model.get_ordered_ops() if (side := bank_side(op)) is not None}
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


def _openvino_metadata(model) -> dict[str, str]:
    """The ONNX metadata_props of a model OpenVINO read from ONNX (its rt_info["framework"])."""
    info = model.get_rt_info()
    if "framework" not in list(info):
        return {}
    framework = info["framework"]
    return {str(k): framework[k].astype(str) for k in framework}


class OpenVinoSession:
    """An OpenVINO compiled model of a scorer graph (CPU). Thread-safe: one infer request per thread.

    bf16 on a memory-bank graph (PatchCore) runs the features in f32 and only the bank search in bf16
    (see split_bank_search); other graphs run wholly in bf16."""

    backend = "openvino"

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None, device: str = "CPU"):
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
        self._metadata = _openvino_metadata(model)
        parts = split_bank_search(model) if precision == "bf16" else None
        self.mode = "bf16 bank search, f32 features" if parts else ("bf16" if precision == "bf16" else "f32")
        if parts:
            self._stages = [core.compile_model(parts[0], device, config("f32")),
                            core.compile_model(parts[1], device, config("bf16"))]
        else:
            self._stages = [core.compile_model(model, device, config("bf16" if precision == "bf16" else "f32"))]
        self.compiled = self._stages[-1]
        self.devices = [device]
        self._outputs = self._scorer_outputs(list(self.compiled.outputs))
        self._local = threading.local()

    def _scorer_outputs(self, outs: list) -> list:
        """The compiled outputs in SCORER_OUTPUTS order (an output may carry several names; OpenVINO keeps
        the ONNX one)."""
        missing = [n for n in SCORER_OUTPUTS if not any(n in o.get_names() for o in outs)]
        if missing:
            raise ValueError(f"{self.path}: no output named {', '.join(missing)} (not a scorer graph?)")
        return [next(o for o in outs if n in o.get_names()) for n in SCORER_OUTPUTS]

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
        """The graph's ONNX metadata_props, as OpenVINO read them."""
        return dict(self._metadata)


def create_session(
    path: str | Path, backend: str = "onnxruntime", precision: str = "fp32", options: SessionOptions = SessionOptions()
) -> OrtSession | OpenVinoSession:
    """A session of one graph file on one backend, no questions asked (stpm.runtime.choice chooses)."""
    if backend == "onnxruntime":
        return OrtSession(path, precision, options)
    if backend == "openvino":
        return OpenVinoSession(path, precision, options.intra_op_threads)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def cpu_session(path: str | Path, threads: int | None = None) -> OrtSession:
    """The reference: ONNX Runtime, CPU provider, fp32 semantics of whatever graph `path` holds."""
    return OrtSession(path, "fp32", SessionOptions(providers=("cpu",), intra_op_threads=threads))


__all__ = [
    "BACKENDS",
    "BACKEND_PRECISIONS",
    "PRECISIONS",
    "PRECISION_FILES",
    "OpenVinoSession",
    "OrtSession",
    "Session",
    "SessionOptions",
    "choose_providers",
    "cpu_session",
    "create_session",
    "gpu_requested",
    "ort_session",
    "split_bank_search",
]
