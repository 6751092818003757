#!/usr/bin/env bash
# Session 2, third call: the engine with the unrolled layer loop (profile + compile time), the
# attention cases with JAX's paged_attention given a scaled q and cascade tuning variants, and the
# BatchLLM x0.05 ablation (both off / sharing + shared-prefix kernel).
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
F="grep -v -i -E deprec|libtpu|^#.lines"
timeout 200 python3 scripts/profile_engine.py --model=llama-3-8b --workload=nosharing --scale=0.25 \
  --output_len=128 --max_model_len=1024 --top=14 --out=$OUT/profile_ns256_unrolled.json 2>&1 | grep -v -i -E "deprec|libtpu|^# lines"
echo "[$(( $(date +%s) - t0 ))s] profile unrolled done"
timeout 150 python3 scripts/bench_attention.py --cases=a,b,c,d --reps=5 \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense,pallas_gpu_cascade_variants \
  --cascade_variants=chunk=512,chunk=256,chunk=512+warps=8,chunk=512+stages=3,chunk=512+bk=128,chunk=256+bk=128,chunk=1024+bm=128+warps=8 \
  --out=$OUT/attention_h100.json 2>&1 | grep -v -i -E "deprec|libtpu" | sed -n '/# summary/,$p'
echo "[$(( $(date +%s) - t0 ))s] bench_attention done"
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --workload=batchllm --scale=0.05 --max_model_len=2432"
timeout 120 $B --global_prefix_sharing=false --shared_prefix_attention=false --tag=_off 2>&1 | grep -E '"(run_seconds|compile_seconds|total_tokens_per_s|floor_fraction|computed_prefill_tokens)"'
echo "[$(( $(date +%s) - t0 ))s] batchllm off done"
timeout 110 $B --global_prefix_sharing=true --shared_prefix_attention=true --tag=_on 2>&1 | grep -E '"(run_seconds|compile_seconds|total_tokens_per_s|floor_fraction|computed_prefill_tokens)"'
echo "[$(( $(date +%s) - t0 ))s] batchllm on done"
