#!/usr/bin/env bash
# The one-call GPU check: on a GPU machine with only this repo and pagedllm's Python packages,
# run the GPU tests (kernels vs. the torch reference, engine vs. transformers on random weights),
# then the GPU benchmarks, printing a short table last. Under 10 minutes on an H100.
#   bash scripts/gpu_check.sh [--quick]
# Packages missing there can travel as wheels in .whl/: bash ../shared/device/wheels.sh opentelemetry-api
# (fastapi >= 0.16x imports opentelemetry, which that machine lacks).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# transformers' generate grows its KV cache by concatenation: avoid fragmentation OOMs.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
status=0
# Kernel tests compile many Triton variants: in parallel where pytest-xdist is installed.
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
python3 -m pytest -q -p no:cacheprovider $xdist tests/kernels tests/gpu 2>&1 | tail -n 25 || status=1
# The server with CUDA graphs and async scheduling, under bench serve's load (random weights).
model=$(mktemp -d)
cp benchmarks/configs/qwen3-0.6b/config.json "$model"/
python3 -c "import json, sys; from pagedllm.tokenizer import placeholder_tokenizer as t; \
t(json.load(open(sys.argv[1] + '/config.json'))['vocab_size']).backend.save(sys.argv[1] + '/tokenizer.json')" "$model"
python3 -m pagedllm.entrypoints.cli serve "$model" --load-format dummy --port 8391 \
  --max-model-len 4096 --disable-log-stats > /tmp/gpu_check_serve.log 2>&1 &
server=$!
for _ in $(seq 180); do
  kill -0 $server 2>/dev/null || break
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8391/health')" 2>/dev/null && break
  sleep 1
done
if python3 -m pagedllm.entrypoints.cli bench serve --port 8391 --tokenizer "$model" \
    --dataset-name random --num-prompts 256 --random-input-len 512 --random-output-len 256 \
    --ignore-eos 2>&1 | grep -E "Successful|Failed|throughput|TTFT|TPOT"; then
  kill $server; wait $server 2>/dev/null
else
  status=1; tail -n 20 /tmp/gpu_check_serve.log; kill $server 2>/dev/null
fi
# Qwen2-VL-7B shape, one 448x448 image per prompt: pagedllm against transformers' generate.
python3 -m pagedllm.entrypoints.cli bench throughput benchmarks/configs/qwen2-vl-7b-instruct \
  --load-format dummy --workload random-mm --num-prompts 64 --image-size 448x448 \
  --input-len 32 --output-len 64 --compare-transformers --hf-batch-sizes 16 \
  --kv-cache-memory-bytes 8589934592 2>&1 | grep -v "Processed prompts" | tail -n 4 || status=1
python3 benchmarks/gpu_bench.py "$@" 2>&1 | grep -v "Processed prompts" || status=1
exit $status
