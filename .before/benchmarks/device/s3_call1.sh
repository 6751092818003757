#!/usr/bin/env bash
# Session 3, call 1 (diagnostics): the unrolled loop's first-step OOM with a memory-sized KV cache;
# attention cases a-c timed inside one program (kernel time) and per call (with dispatch), with a
# per-kernel GPU breakdown of case b; the HF peer on the mixed workload in same-shape batches; a
# profile of the document workload at 1024 rows.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|compile_seconds|warmup_seconds|load_seconds|total_tokens_per_s|output_tokens_per_s|num_requests|hf_batch_size)"'
timeout 110 python3 scripts/diag_program_memory.py --num_pages=0 --variants=unrolled --execute --show=6 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -20
echo "[$(( $(date +%s) - t0 ))s] diag done"
timeout 120 python3 scripts/bench_attention.py --cases=a,b,c --reps=5 \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense --trace_cases=b \
  --also_dispatch --out=$OUT/attention_h100_s3c1.json 2>&1 | grep -E "^(#|a |b |c |   )"
echo "[$(( $(date +%s) - t0 ))s] attention done"
timeout 170 python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --engine=hf \
  --workload=mixed --max_requests=64 --hf_batch_size=32 --tag=_first64_b32_grouped 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf mixed done"
timeout 170 python3 scripts/profile_engine.py --model=llama-3-8b --workload=document --scale=0.25 \
  --max_num_seqs=1024 --max_model_len=4224 --shared_prefix_attention=true --layer_loop=scan \
  --top=14 --out=$OUT/profile_document_x0.25_seqs1024.json 2>&1 | grep -vE "Warning|warn|^\s*$" | tail -45
echo "[$(( $(date +%s) - t0 ))s] profile done"
