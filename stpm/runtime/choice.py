"""Which backend and precision score a bundle on this machine, and why.

A precision other than fp32 is used only where the bundle records that it holds parity
(``manifest["exports"][precision]["shipped"]``, measured by stpm.export) and this machine can run it.
``choose_backend`` resolves a request ("auto" or a name, for backend and precision); "auto" times the
candidates on this machine and keeps the fastest. A precision the bundle or the machine lacks falls
back to fp32 with a warning, never an error: the service stays up. (Model selection at training time,
stpm.training.selection, is another matter: this is about running a finished bundle.)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stpm.bundle.manifest import Manifest
from stpm.runtime import cpu
from stpm.runtime.sessions import (
    BACKEND_PRECISIONS,
    BACKENDS,
    PRECISION_FILES,
    PRECISIONS,
    Session,
    SessionOptions,
    create_session,
    gpu_requested,
)

log = logging.getLogger(__name__)

AUTO_MARGIN = 0.10  # "auto" keeps the preferred candidate unless another is this much faster
AUTO_PRECISIONS = ("int8", "bf16", "fp16", "fp32")  # "auto"'s order of preference


@dataclass
class BackendChoice:
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


@dataclass
class _Request:
    """A resolved request and the warnings collected while honouring it."""

    bundle_dir: Path
    backend: str  # a name or "auto"
    precision: str
    gpu: bool  # a GPU execution provider is asked for and installed
    warnings: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log.warning("%s: %s", self.bundle_dir, msg)


def bundle_precisions(manifest: Manifest, bundle_dir: str | Path) -> dict[str, str | None]:
    """precision -> None if the bundle holds it (file recorded and present, parity shipped), else why not."""
    files = manifest.export_files
    exports = manifest.exports
    out: dict[str, str | None] = {}
    for p in PRECISIONS:
        fname = PRECISION_FILES[p]
        record = exports.precision(p) if exports is not None else None
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


def measured_backends(manifest: Manifest) -> dict[str, str]:
    """precision -> the backend its parity was measured on, for the lower precisions that record one."""
    records = {p: manifest.exports.precision(p) for p in PRECISIONS} if manifest.exports is not None else {}
    return {p: r["backend"] for p, r in records.items() if r and r.get("backend")}


def time_sessions(sessions: Sequence[Session], image_size: int, runs: int = 5, warmup: int = 2) -> list[float]:
    """Best wall ms of a batch-1 run of each session (the minimum: robust to other processes' load).

    The sessions' runs are interleaved, one run of each per round in a rotating order, so that a burst
    of load on the machine slows every candidate alike instead of all the runs of one."""
    x = np.random.default_rng(0).integers(0, 256, (1, 3, image_size, image_size), dtype=np.uint8)
    for s in sessions:
        for _ in range(warmup):
            s.run(x)
    best = [float("inf")] * len(sessions)
    for r in range(runs):
        for i in [(r + j) % len(sessions) for j in range(len(sessions))]:
            t0 = time.perf_counter()
            sessions[i].run(x)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def env_choice(value: str | None, env: str) -> str:
    """An explicit value, else the environment variable, else "auto"."""
    if value is not None:
        return value
    return os.environ.get(env, "").strip().lower() or "auto"


def _request(bundle_dir: Path, backend: str | None, precision: str | None, providers: Sequence[str]) -> _Request:
    req = _Request(bundle_dir, env_choice(backend, "STPM_BACKEND"), env_choice(precision, "STPM_PRECISION"),
                   gpu_requested(providers))
    if req.backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {req.backend!r}")
    if req.precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {req.precision!r}")
    return req


def _require_held(req: _Request, held: dict[str, str | None], fall_back_to_fp32: bool) -> None:
    """fp32 must be there; so must an explicit precision when falling back is not allowed."""
    for p in ("fp32",) if fall_back_to_fp32 or req.precision == "auto" else ("fp32", req.precision):
        if held[p] is not None:
            from stpm.bundle import BundleError

            raise BundleError(f"{req.bundle_dir}: no {p} scorer: {held[p]}")


def _backends_to_try(req: _Request) -> list[str]:
    """The backends worth a try, OpenVINO first (the preferred one when it is as fast)."""
    backends = list(BACKENDS) if req.backend == "auto" else [req.backend]
    if req.gpu:  # OpenVINO runs here on the CPU only: with a GPU provider at hand, ONNX Runtime drives it
        if req.backend == "openvino":
            req.warn("openvino runs on the CPU here while a GPU execution provider is available; using openvino anyway")
        else:
            backends = ["onnxruntime"]
    if "openvino" in backends:
        why = cpu.openvino_available()
        if why:
            backends.remove("openvino")
            if req.backend == "openvino":
                req.warn(f"backend openvino requested but {why}; falling back to onnxruntime")
                backends = ["onnxruntime"]
    return sorted(backends, key=lambda b: b != "openvino")


def _unusable(req: _Request, backend: str, precision: str, held: dict[str, str | None],
              measured_on: dict[str, str]) -> str | None:
    """None if (backend, precision) is a candidate, else why not. An explicit request runs where it works
    at all (fp16 on the CPU provider, int8 without VNNI: slow, not wrong); "auto" takes only what this
    hardware speeds up. bf16 needs the CPU's bf16 instructions either way (OpenVINO would silently run f32)."""
    auto = req.precision == "auto"
    if precision not in BACKEND_PRECISIONS[backend]:
        return f"{backend} does not run {precision}"
    if held[precision] is not None:
        return held[precision]
    if measured_on.get(precision, backend) != backend:
        return f"{precision} parity was measured on {measured_on[precision]}, not {backend}"
    if backend == "onnxruntime" and req.gpu:
        return "int8 is for CPUs" if precision == "int8" and auto else None
    if precision == "fp16" and auto:
        return "fp16 is for GPUs (no GPU execution provider is in use)"
    if precision == "bf16" or auto:
        return cpu.cpu_precision_support(precision)
    return None


def _candidates(req: _Request, backends: list[str], held: dict[str, str | None],
                measured_on: dict[str, str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs in order of preference; fp32 on each backend when none is usable."""
    precisions = AUTO_PRECISIONS if req.precision == "auto" else (req.precision,)
    cands = [(b, p) for b in backends for p in precisions if _unusable(req, b, p, held, measured_on) is None]
    if not cands:
        reasons = "; ".join(f"{b}: {_unusable(req, b, req.precision, held, measured_on)}" for b in backends)
        req.warn(f"precision {req.precision} is not available ({reasons}); falling back to fp32")
        cands = [(b, "fp32") for b in backends]
    return cands


def _fastest(req: _Request, cands: list[tuple[str, str]], image_size: int, options: SessionOptions,
             ) -> tuple[Session, tuple[str, str], dict[str, float]]:
    """Create the candidates' sessions and keep the fastest at batch 1, timed side by side
    (time_sessions); a later candidate must be AUTO_MARGIN faster to win (stable under noise). A single
    candidate is not timed."""
    timings: dict[str, float] = {}
    created: list[tuple[tuple[str, str], Session]] = []
    for b, p in cands:
        try:
            s = create_session(req.bundle_dir / PRECISION_FILES[p], b, p, options)
        except Exception as e:  # noqa: BLE001 - a backend that cannot load this graph is skipped, said why
            req.warn(f"{b}/{p} could not be created ({type(e).__name__}: {e})")
            continue
        if len(cands) == 1:
            return s, (b, p), timings
        created.append(((b, p), s))
    best: tuple[float, Session, tuple[str, str]] | None = None
    for ((b, p), s), ms in zip(created, time_sessions([s for _, s in created], image_size)):
        timings[f"{b}/{p}"] = ms
        if best is None or ms < best[0] * (1.0 - AUTO_MARGIN):
            best = (ms, s, (b, p))
    del created
    if best is not None:
        return best[1], best[2], timings
    if cands == [("onnxruntime", "fp32")]:
        raise RuntimeError(f"{req.bundle_dir}: no session could be created (see the warnings above)")
    req.warn("no candidate session could be created; falling back to onnxruntime/fp32")
    return create_session(req.bundle_dir / PRECISION_FILES["fp32"], "onnxruntime", "fp32", options), \
        ("onnxruntime", "fp32"), timings


def _reason(req: _Request, chosen: tuple[str, str], timings: dict[str, float]) -> str:
    if timings:
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        return "fastest on this machine of " + ", ".join(f"{k} {v:.1f} ms" for k, v in ranked)
    if chosen == (req.backend, req.precision):
        return "as requested"
    return "the only candidate" + (" after fallback" if req.warnings else "")


def choose_backend(
    bundle_dir: str | Path,
    manifest: Manifest,
    image_size: int,
    backend: str | None = None,
    precision: str | None = None,
    *,
    options: SessionOptions = SessionOptions(providers=("auto",)),
    fall_back_to_fp32: bool = True,
) -> tuple[Session, BackendChoice]:
    """Resolve backend and precision for a bundle on this machine and create the session.

    backend / precision: a name, "auto", or None (environment STPM_BACKEND / STPM_PRECISION, else
    "auto"). Unknown names raise ValueError. A precision the bundle does not hold, the machine cannot
    run, or the backend does not offer falls back (with a warning) to fp32; an unavailable backend
    falls back to onnxruntime; with fall_back_to_fp32=False, an explicit precision the bundle does not
    hold raises BundleError naming it instead. With "auto" in either, every remaining candidate is timed
    at batch 1 on this machine and the fastest is kept (GPU providers: ONNX Runtime only)."""
    req = _request(Path(bundle_dir), backend, precision, options.providers)
    options = replace(options, image_size=options.image_size or image_size)
    held = bundle_precisions(manifest, bundle_dir)
    _require_held(req, held, fall_back_to_fp32)
    cands = _candidates(req, _backends_to_try(req), held, measured_backends(manifest))
    session, chosen, timings = _fastest(req, cands, image_size, options)
    choice = BackendChoice(chosen[0], chosen[1], req.backend, req.precision, list(session.devices),
                           _reason(req, chosen, timings), timings, req.warnings)
    return session, choice


__all__ = ["AUTO_MARGIN", "BackendChoice", "bundle_precisions", "choose_backend", "env_choice", "measured_backends",
           "time_sessions"]
