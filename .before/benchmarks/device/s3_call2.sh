#!/usr/bin/env bash
# Session 3, call 2: compiled kernel tests (grid (heads, items), advanced cascade lists); every
# attention case with peers and a per-kernel GPU breakdown; the document workload with the
# unrolled layer loop (host-round-trip unstacking) and shared-prefix lists in fused blocks.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|compile_seconds|load_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|computed_prefill_tokens|num_steps|fused_blocks|peak_kv_pool_use|num_kv_pages)"'
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -4 | tee $OUT/pytest_kernels_gpu_h100_s3.log
echo "[$(( $(date +%s) - t0 ))s] kernel tests done"
timeout 150 python3 scripts/bench_attention.py --cases=a,b,c,d --reps=5 \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense,xla_reference,pallas_gpu_cascade_variants \
  --cascade_variants=chunk=512,chunk=2048,bm=128,pf=1 --trace_cases=a,b,c,d \
  --out=$OUT/attention_h100_s3.json 2>&1 | grep -E "^(#|a |b |c |d |   gpu .*(ragged|paged|cudnn|fusion))" | head -120
echo "[$(( $(date +%s) - t0 ))s] attention done"
timeout 250 python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --workload=document \
  --max_model_len=4224 --shared_prefix_attention=true --layer_loop=unrolled --max_num_seqs=1024 \
  --tag=_unrolled_seqs1024 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] document done"
