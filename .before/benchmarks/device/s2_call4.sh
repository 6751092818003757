#!/usr/bin/env bash
# Session 2, fourth call: page-id prefetch variants (cases a, b), then the BatchLLM x0.05 ablation
# and the full no-sharing workload with the unrolled layer loop and no remat pass.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
timeout 100 python3 scripts/bench_attention.py --cases=a,b --reps=7 \
  --impls=pallas_gpu,pallas_gpu_variants,pallas_gpu_cascade,pallas_gpu_cascade_variants \
  --variants=pf=1 --cascade_variants=pf=1,chunk=512,chunk=512+pf=1,chunk=512+stages=3+pf=1,chunk=1024+pf=1 \
  --out=$OUT/attention_h100_pf.json 2>&1 | grep -v -i -E "deprec|libtpu" | sed -n '/# summary/,$p'
echo "[$(( $(date +%s) - t0 ))s] bench_attention done"
K='"(run_seconds|compile_seconds|warmup_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|computed_prefill_tokens|num_steps)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT"
timeout 150 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=false --shared_prefix_attention=false --tag=_off 2>&1 | grep -E "$K|Error|error"
echo "[$(( $(date +%s) - t0 ))s] batchllm off done"
timeout 130 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=true --shared_prefix_attention=true --tag=_on 2>&1 | grep -E "$K|Error|error"
echo "[$(( $(date +%s) - t0 ))s] batchllm on done"
timeout 200 $B --workload=nosharing --max_model_len=1024 2>&1 | grep -E "$K|Error|error"
echo "[$(( $(date +%s) - t0 ))s] nosharing done"
