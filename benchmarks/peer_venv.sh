#!/usr/bin/env bash
# The peers' virtualenv for benchmarks/peer.py: anomalib 2.7.0 with OpenVINO, on the same torch as the project.
#   bash benchmarks/peer_venv.sh [DIR]          (default /work/venvs/anomalib; a few minutes, about 3 GB)
# then
#   .venv/bin/python benchmarks/peer.py --peer-python DIR/bin/python --rounds 6 --per-round 10 --peer-refit
# Kept out of the project's own venv: anomalib pins its own lightning / timm / openvino versions.
set -euo pipefail
dir="${1:-/work/venvs/anomalib}"
if [ ! -x "$dir/bin/python" ]; then
    python3 -m venv "$dir"
fi
"$dir/bin/pip" install --quiet --upgrade pip
"$dir/bin/pip" install --quiet anomalib==2.7.0 openvino lightning timm onnxscript torch==2.14.1 torchvision==0.29.1
"$dir/bin/python" -c "import anomalib, openvino, torch; print('anomalib', anomalib.__version__, 'openvino', openvino.__version__, 'torch', torch.__version__)"
