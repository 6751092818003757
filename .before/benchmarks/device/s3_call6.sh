#!/usr/bin/env bash
# Session 3, call 6: engine GPU tests with the new defaults (shared-prefix lists on, unrolled
# layers); every attention case timed as in the engine's step (one work list, R calls at R page
# offsets inside one program) with GPU timelines, peers per call.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
timeout 150 python3 -m pytest -q -m gpu tests/test_engine_gpu.py -p no:cacheprovider 2>&1 | tail -3 | tee $OUT/pytest_engine_gpu_h100_s3_defaults.log
echo "[$(( $(date +%s) - t0 ))s] engine gpu tests done"
timeout 200 python3 scripts/bench_attention.py --cases=a,b,c,d --reps=5 --timing=layers \
  --impls=pallas_gpu,pallas_gpu_cascade,jax_paged_attention,cudnn_dense,xla_reference --trace_cases=a,b,c,d \
  --out=$OUT/attention_h100_s3_layers.json 2>&1 | grep -E "^(#|a |b |c |d |   gpu (busy|.*(ragged|paged|cudnn))|   gpu .*x[0-9]+ +(gemm|input_transpose))"
echo "[$(( $(date +%s) - t0 ))s] attention done"
