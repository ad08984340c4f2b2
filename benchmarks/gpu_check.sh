#!/usr/bin/env bash
# On a GPU machine (the device tool's H200 kinds), from the repo root: the GPU tests and the
# kernels' tests on CUDA (the tensor-parallel ones run where 2 or more GPUs are present), then,
# with --bench, the benchmarks of one GPU and, with 2 or more, of tensor parallelism.
# Wheels carried in .whl/ (made by ../shared/device/wheels.sh) are installed first.
set -uo pipefail
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "GPUs: $gpus"
python3 -m pytest -q tests/gpu tests/kernels tests/quantization
if [ "${1:-}" = "--bench" ]; then
  python3 benchmarks/gpu_bench.py --skip-transformers
  if [ "$gpus" -ge 2 ]; then python3 benchmarks/gpu_tp_bench.py; fi
fi
