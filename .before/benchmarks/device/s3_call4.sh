#!/usr/bin/env bash
# Session 3, call 4: case b timed inside one program over 64 input sets (fixed per-execution
# costs amortised) with its GPU timeline; the document workload and the full BatchLLM workload
# (unrolled layers, shared-prefix lists with 64-row items in every bucket, also in fused blocks).
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|compile_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|computed_prefill_tokens|num_steps|fused_blocks|peak_kv_pool_use|num_requests)"'
timeout 70 python3 scripts/bench_attention.py --cases=b --reps=5 --sets=64 --timing=program \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense --trace_cases=b \
  --out=$OUT/attention_h100_s3_b_program64.json 2>&1 | grep -E "^(b |   gpu (busy|.*(ragged|paged|cudnn)))"
echo "[$(( $(date +%s) - t0 ))s] attention done"
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --layer_loop=unrolled --shared_prefix_attention=true"
timeout 200 $B --workload=document --max_model_len=4224 --max_num_seqs=1024 --tag=_unrolled_seqs1024_s3 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] document done"
timeout 320 $B --workload=batchllm --scale=1 --max_model_len=2432 --tag=_x1_unrolled_s3 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] batchllm x1 done"
