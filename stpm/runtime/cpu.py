"""What this machine's CPU can run: its feature flags, its name, the lower precisions it speeds up, and
whether the OpenVINO package is installed. Read at run time (never at import); standard library only.

Two switches make this machine look like a plainer one (the test suite's fp32 run, `scripts/test.sh --fp32`;
an operator who wants fp32 results everywhere): STPM_CPU_IGNORE_FLAGS lists flags to treat as absent (e.g.
"avx512_bf16 amx_bf16": no bf16 is measured, shipped or chosen), STPM_NO_OPENVINO=1 treats OpenVINO as not
installed (ONNX Runtime runs everything)."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products; without them int8 is slower than fp32
IGNORE_FLAGS_ENV = "STPM_CPU_IGNORE_FLAGS"
NO_OPENVINO_ENV = "STPM_NO_OPENVINO"


def ignored_flags() -> frozenset[str]:
    """The flags STPM_CPU_IGNORE_FLAGS (space- or comma-separated) says to treat as absent."""
    return frozenset(os.environ.get(IGNORE_FLAGS_ENV, "").replace(",", " ").split())


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags, read at run time (/proc/cpuinfo, else `lscpu`; empty if neither says), less
    the ones STPM_CPU_IGNORE_FLAGS names."""
    return _reported_flags() - ignored_flags()


def _reported_flags() -> frozenset[str]:
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
    """None if the openvino package imports (and STPM_NO_OPENVINO is not 1), else why not."""
    if os.environ.get(NO_OPENVINO_ENV, "").strip() == "1":
        return f"OpenVINO is switched off ({NO_OPENVINO_ENV}=1)"
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"the openvino package is not installed ({e})"
    return None


__all__ = ["BF16_FLAGS", "IGNORE_FLAGS_ENV", "INT8_FLAGS", "NO_OPENVINO_ENV", "cpu_flags", "cpu_name",
           "cpu_precision_support", "ignored_flags", "openvino_available"]
