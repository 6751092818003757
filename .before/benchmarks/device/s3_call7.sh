#!/usr/bin/env bash
# Session 3, call 7: the HF peer on the mixed workload at its best batch per shape: 256 requests
# (128 of each kind), same-shape batches of up to 128 rows and 74,000 padded tokens.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|total_tokens_per_s|output_tokens_per_s|num_requests|hf_batch_size|hf_max_batch_tokens)"'
timeout 300 python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --engine=hf --workload=mixed \
  --max_requests=256 --hf_batch_size=128 --hf_max_batch_tokens=74000 --measure_ceilings=false \
  --tag=_first256_b128_t74k 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] hf mixed done"
