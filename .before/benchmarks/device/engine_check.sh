#!/usr/bin/env bash
# One device call: environment, model/engine tests on the GPU, and the Llama-3-8B dummy e2e run(s).
# usage: bash benchmarks/device/engine_check.sh "<impl list>" "<fused list>"
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, jax.devices())"
IMPLS=${1:-reference}
FUSED=${2:-1}
TESTS=${TESTS:-tests/test_model_hf.py tests/test_sampler.py}
if [ -n "$TESTS" ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -15 | tee $OUT/pytest_engine.log
fi
for impl in $IMPLS; do
  for f in $FUSED; do
    timeout ${RUN_TIMEOUT:-280} python3 scripts/benchmark.py --model=llama-3-8b --load_format=dummy \
      --num_requests=256 --input_len=512 --output_len=128 --max_num_batched_tokens=2048 \
      --max_num_seqs=256 --max_model_len=1024 --attention_impl=$impl --fused_decode_steps=$f \
      --results_dir=$OUT 2>&1 | grep -v -i deprecat | tail -40 | tee $OUT/e2e_${impl}_$f.log
  done
done
ls -la $OUT
