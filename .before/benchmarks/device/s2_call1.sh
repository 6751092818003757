#!/usr/bin/env bash
# Session 2, first device call: where the engine's time goes (profile), every attention case with
# its peers, and the kernel tests compiled. Each part under its own timeout.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 170 python3 scripts/profile_engine.py --model=llama-3-8b --workload=nosharing --scale=0.25 \
  --output_len=128 --max_model_len=1024 --out=$OUT/profile_ns256.json 2>&1 | grep -v -i deprec | tee $OUT/profile_ns256.log | tail -60
echo "[$(( $(date +%s) - t0 ))s] profile done"
timeout 300 python3 scripts/bench_attention.py --cases=a,b,c,d --reps=5 \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense,xla_reference,pallas_gpu_cascade_variants \
  --cascade_variants=bm=128,chunk=512,bm=128+chunk=512 \
  --out=$OUT/attention_h100.json 2>&1 | grep -v -i deprec | tail -40
echo "[$(( $(date +%s) - t0 ))s] bench_attention done"
timeout 110 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tail -4 | tee $OUT/pytest_kernels_gpu.log
echo "[$(( $(date +%s) - t0 ))s] kernel tests done"
