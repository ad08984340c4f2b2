#!/usr/bin/env bash
# pagedllm's offline engine, `pagedllm serve` and `vllm serve` on the same requests, one GPU,
# one after the other, every server loaded by the same client (`pagedllm bench serve`).
# On the GPU machine, from the repo root, with .whl carried (../shared/device/wheels.sh pyzmq
# msgspec opentelemetry-api) and vLLM installed in /root/peer/site by ../shared/peer's
# device_step.sh (SKIP_VLLM=1 runs pagedllm only):
#     bash benchmarks/serve_vs_vllm.sh CONFIG NUM_PROMPTS IN OUT RANGE_RATIO RATE [RATE...]
# CONFIG: a folder of benchmarks/configs (random bf16 weights, placeholder tokenizer).
# RATE: requests/s, or inf (all at once). Limits on both servers: max_model_len 4096,
# max_num_seqs 256, max_num_batched_tokens 2048.
set -uo pipefail
CONFIG=$1; N=$2; IN=$3; OUTLEN=$4; RANGE=$5; shift 5; RATES=("$@")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
R=$PWD
OUT=${OUT:-/tmp}
if [ ! -d /tmp/psite ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/psite .whl/*.whl
fi
P="/tmp/psite:$R"
model=/tmp/model-$(basename "$CONFIG"); mkdir -p "$model"
cp "$CONFIG"/config.json "$model"/
PYTHONPATH=$P python3 -c "import json, sys; from pagedllm.tokenizer import placeholder_tokenizer as t; \
t(json.load(open(sys.argv[1] + '/config.json'))['vocab_size']).backend.save(sys.argv[1] + '/tokenizer.json')" "$model"
echo '{"tokenizer_class": "PreTrainedTokenizerFast"}' > "$model"/tokenizer_config.json
limits="--max-model-len 4096 --max-num-seqs 256 --max-num-batched-tokens 2048"
name=$(basename "$CONFIG")

wait_up() {  # pid port seconds
  for _ in $(seq "$3"); do
    kill -0 "$1" 2>/dev/null || return 1
    python3 -c "import urllib.request as u, sys; u.urlopen('http://127.0.0.1:%s/health' % sys.argv[1], timeout=2)" "$2" 2>/dev/null && return 0
    sleep 1
  done
  return 1
}
load() {  # port label
  for rate in "${RATES[@]}"; do
    PYTHONPATH=$P python3 -m pagedllm.entrypoints.cli bench serve --port "$1" --tokenizer "$model" \
      --dataset-name random --num-prompts "$N" --random-input-len "$IN" --random-output-len "$OUTLEN" \
      --random-range-ratio "$RANGE" --request-rate "$rate" --ignore-eos --disable-tqdm \
      --percentile-metrics ttft,tpot,itl --metric-percentiles 50,99 2>&1 \
      | grep -E "Successful|Failed|Benchmark duration|Output token throughput|TTFT|TPOT" \
      | sed "s/^/$name $2 rate=$rate | /"
  done
}
serve() {  # label port command...
  local label=$1 port=$2; shift 2
  "$@" --port "$port" > "$OUT/${name}_$label.log" 2>&1 &
  local pid=$! t0
  t0=$(date +%s)
  if wait_up $pid "$port" 400; then
    echo "$name $label up in $(( $(date +%s) - t0 )) s"
    load "$port" "$label"
  else
    echo "$name $label did not come up"; tail -n 30 "$OUT/${name}_$label.log"
  fi
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
}

PYTHONPATH=$P python3 -m pagedllm.entrypoints.cli bench throughput "$model" --load-format dummy \
  --workload random --num-prompts "$N" --input-len "$IN" --output-len "$OUTLEN" \
  --range-ratio "$RANGE" $limits 2>&1 | grep -v "Processed prompts" | tail -n 3 \
  | sed "s/^/$name offline | /"
serve pagedllm 8391 env PYTHONPATH="$P" python3 -m pagedllm.entrypoints.cli serve "$model" \
  --load-format dummy $limits --disable-log-stats --disable-uvicorn-access-log
if [ -z "${SKIP_VLLM:-}" ]; then
  serve vllm 8392 env PYTHONPATH=/root/peer/site python3 -m vllm.entrypoints.cli.main serve \
    "$model" --load-format dummy $limits --dtype bfloat16 --gpu-memory-utilization 0.9 \
    --disable-log-stats --disable-uvicorn-access-log
fi
exit 0
