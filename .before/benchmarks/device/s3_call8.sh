#!/usr/bin/env bash
# Session 3, call 8: the HF peer on the shared-prefix workloads at twice the batch of session 2
# (BatchLLM 128, document 64), to check that its best batch does not change the ratios.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|total_tokens_per_s|output_tokens_per_s|num_requests|hf_batch_size)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --engine=hf --measure_ceilings=false"
timeout 150 $B --workload=batchllm --max_requests=256 --hf_batch_size=128 --tag=_b128 2>&1 | grep -E "$K|Error|rror:" | head -12
echo "[$(( $(date +%s) - t0 ))s] hf batchllm done"
timeout 150 $B --workload=document --max_requests=128 --hf_batch_size=64 --tag=_b64 2>&1 | grep -E "$K|Error|rror:" | head -12
echo "[$(( $(date +%s) - t0 ))s] hf document done"
