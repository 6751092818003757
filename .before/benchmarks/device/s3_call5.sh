#!/usr/bin/env bash
# Session 3, call 5: the no-sharing workload with the new defaults (unrolled on GPU), with and
# without shared-prefix work lists (their cost where nothing is shared: the default decision);
# the mixed-density workload with them.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|compile_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|num_steps|fused_blocks|peak_kv_pool_use|num_requests)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT"
timeout 175 $B --workload=nosharing --max_model_len=1024 --shared_prefix_attention=false --tag=_s3 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] nosharing off done"
timeout 175 $B --workload=nosharing --max_model_len=1024 --shared_prefix_attention=true --tag=_spa_s3 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] nosharing on done"
timeout 200 $B --workload=mixed --max_model_len=2080 --shared_prefix_attention=true --tag=_spa_s3 2>&1 | grep -E "$K|Error|rror:"
echo "[$(( $(date +%s) - t0 ))s] mixed done"
