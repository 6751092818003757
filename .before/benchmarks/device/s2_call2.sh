#!/usr/bin/env bash
# Session 2, second call: does the layer loop copy the weights (scan vs loop, dynamic-slice
# fusion), the engine profile with dynamic-slice fusion on, and the attention cases with peers
# (KV caches now passed as arguments instead of captured as constants).
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
timeout 150 python3 scripts/bench_layer_loop.py --tokens=256,2048 \
  --variants=scan_stacked,scan_stacked+dsf,loop_stacked,loop_stacked+dsf,loop_list --out=$OUT/layer_loop.json 2>&1 | grep -v -i -E "deprec|libtpu"
echo "[$(( $(date +%s) - t0 ))s] layer loop done"
XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 150 python3 scripts/profile_engine.py --model=llama-3-8b --workload=nosharing --scale=0.25 \
  --output_len=128 --max_model_len=1024 --top=12 --out=$OUT/profile_ns256_dsf.json 2>&1 | grep -v -i -E "deprec|libtpu" | grep -v "^# lines"
echo "[$(( $(date +%s) - t0 ))s] profile dsf done"
timeout 270 python3 scripts/bench_attention.py --cases=a,b,c,d --reps=5 \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense,xla_reference,pallas_gpu_cascade_variants \
  --cascade_variants=bm=128,chunk=512,bm=128+chunk=512 \
  --out=$OUT/attention_h100.json 2>&1 | grep -v -i -E "deprec|libtpu" | tail -40
echo "[$(( $(date +%s) - t0 ))s] bench_attention done"
