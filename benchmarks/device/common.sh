# Sourced by every device command: environment, carried wheels, and small helpers.
#   source benchmarks/device/common.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, jax.devices())"
KEYS='"(workload|run_seconds|compile_seconds|warmup_seconds|compile_cache_hits|total_tokens_per_s|floor_fraction|floor_seconds|serial_floor_fraction|num_steps|fused_blocks|token_fill_mean|peak_kv_pool_use|hbm_bandwidth_measured|matmul_flops_measured|max_num_seqs|max_num_batched_tokens|dropped_tokens|error)"'

# bench TIMEOUT [benchmark.py flags...]: one end-to-end record into $OUT, its key lines printed.
bench() {
  local t=$1; shift
  timeout "$t" python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT "$@" 2>&1 \
    | grep -E "$KEYS|Error|rror:|Traceback" | grep -v -i deprecat
  stamp "bench $*"
}
