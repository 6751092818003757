#!/usr/bin/env bash
# Session 2, seventh call: the unrolled step at the memory-limited KV size (analysis + a real run),
# then the BatchLLM x0.05 ablation and the document workload with the scan layer loop.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
timeout 100 python3 scripts/diag_program_memory.py --num_pages=0 --tokens=2048 --variants=unrolled --execute --show=0 2>&1 | grep -v -i -E "deprec|libtpu|warn"
echo "[$(( $(date +%s) - t0 ))s] diag memory-limited done"
timeout 60 python3 scripts/diag_program_memory.py --num_pages=16000 --tokens=2048 --variants=unrolled --execute --show=0 2>&1 | grep -v -i -E "deprec|libtpu|warn"
echo "[$(( $(date +%s) - t0 ))s] diag 16000 pages done"
K='"(workload|run_seconds|compile_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|computed_prefill_tokens|num_requests|preemptions)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --layer_loop=scan"
timeout 100 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=false --shared_prefix_attention=false --tag=_off 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] batchllm off done"
timeout 90 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=true --shared_prefix_attention=true --tag=_on 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] batchllm on done"
timeout 90 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=true --shared_prefix_attention=false --tag=_sharing_only 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] batchllm sharing-only done"
timeout 110 $B --workload=document --max_model_len=4224 --shared_prefix_attention=true 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] document done"
