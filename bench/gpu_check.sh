#!/usr/bin/env bash
# GPU check (issue 8): torch CUDA path throughput (fp32/fp16/bf16, channels_last, CUDA graphs) at batch
# 1..512, Grad-CAM, input transfer, onnxruntime CUDA when present, agreement with a CPU fp32 reference.
# Under 8 minutes (bench/gpu_check.py caps itself at 6.5 min; `timeout` below is the hard stop).
#
#   bash bench/gpu_check.sh                     # on the GPU machine; JSON + markdown into $OUT if set
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --cpu-smoke    # check the script on a CPU
#
# The GPU image has CUDA torch, numpy and onnx but not monai/pydantic (needed by core.network/core.cam):
# they come from the wheels in .whl/ (no network there), installed into /tmp/site. Prepare them on a
# machine with PyPI access (versions as in this repository's environment; /.whl/ is git-excluded):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic-core==2.50.5
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl monai==1.6.1 pydantic==2.14.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import monai, pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec timeout --kill-after=15 470 "$PY" bench/gpu_check.py "$@"
