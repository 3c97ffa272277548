#!/usr/bin/env bash
# Fresh machine -> everything the tests need -> the whole suite. `.ci/run` runs exactly this.
# Under CI=true a test whose requirement is missing (shared data, Chromium, redis-server, PostgreSQL, a
# package) FAILS instead of skipping (tests/conftest.py): install here whatever a test needs.
# `./scripts/test.sh --fp32 [pytest args]`: the same suite on the plain fp32 paths, as on a CPU without
# AVX-512: ONNX Runtime only, fp32 only, no bf16/int8/AVX-512/AMX flag seen by stpm, torch/oneDNN/MKL
# capped at AVX2.
# OpenVINO's tests skip there (their skip names the switch and is not a CI failure).
set -euo pipefail
if [ "${1:-}" = "--fp32" ]; then
    shift
    export STPM_BACKEND=onnxruntime STPM_PRECISION=fp32 STPM_NO_OPENVINO=1
    hidden="$(grep -o -w -E 'avx512[a-z_0-9]*|amx_[a-z0-9]*|avx_vnni[a-z_0-9]*' /proc/cpuinfo 2>/dev/null \
        | sort -u | tr '\n' ' ' || true)"
    export STPM_CPU_IGNORE_FLAGS="${hidden:-avx512_bf16 amx_bf16 avx512_vnni avx_vnni amx_int8}"
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CUDA-capable builds that lie on the build machines' disk; they run on CPU too.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[train,test,scale]"
# Browser tests drive Debian's Chromium (no browser downloads: the machines are offline).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; browser tests will skip (fail under CI=true)" >&2
fi
# The scale-out tests start Debian's redis-server, PostgreSQL and nginx themselves (tests/services.py), and
# cut a worker's host off in a network namespace (tests/netns.py: iproute2's `ip netns`, as root).
if { ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        || ! command -v nginx >/dev/null || ! command -v ip >/dev/null; } \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql nginx \
        iproute2 >/dev/null) \
        || echo "warning: could not install redis-server/postgresql/nginx/iproute2; scale-out tests will skip" \
                "(fail under CI=true)" >&2
fi
exec .venv/bin/python -m pytest "$@"
