#!/usr/bin/env bash
# Session 2, last call: the mixed-density workload (jaxserve and the HF peer) and BatchLLM x0.25,
# scan layer loop (the default).
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|compile_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|computed_prefill_tokens|num_requests|preemptions)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT"
timeout 170 $B --workload=mixed --max_model_len=2080 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] mixed done"
timeout 80 $B --engine=hf --workload=mixed --max_requests=32 --hf_batch_size=32 --tag=_b32 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf mixed done"
timeout 130 $B --workload=batchllm --scale=0.25 --max_model_len=2432 --shared_prefix_attention=true 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] batchllm x0.25 done"
