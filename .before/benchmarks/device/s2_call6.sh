#!/usr/bin/env bash
# Session 2, sixth call: BatchLLM x0.05 ablation (#5), the long-document workload, and HF peers on
# the no-sharing and mixed workloads -- unconditional copy-on-write, programs compiled in parallel.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|compile_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|computed_prefill_tokens|num_requests|preemptions)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT"
timeout 150 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=false --shared_prefix_attention=false --tag=_off 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] batchllm off done"
timeout 120 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=true --shared_prefix_attention=true --tag=_on 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] batchllm on done"
timeout 130 $B --workload=document --max_model_len=4224 --shared_prefix_attention=true 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] document done"
H="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --engine=hf"
timeout 120 $H --workload=nosharing --max_requests=256 --hf_batch_size=256 --tag=_b256 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf nosharing done"
timeout 60 $H --workload=mixed --max_requests=64 --hf_batch_size=64 --tag=_b64 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf mixed done"
