#!/usr/bin/env bash
# One device call: Llama-3-8B dummy e2e runs (no sharing; BatchLLM workload with sharing+cascade
# on vs both off), the GPU-marked tests, and an HF-generate peer sample. Results under $OUT.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT"
python3 scripts/make_workload.py --family=nosharing --num_requests=256 --input_len=512 --output_len=128 --output=/tmp/nosharing_256x512x128.jsonl
t0=$(date +%s)
timeout 150 $B --workload=/tmp/nosharing_256x512x128.jsonl --max_model_len=1024 --tag=_pallas 2>&1 | grep -v -i deprec | tail -4
echo "[$(( $(date +%s) - t0 ))s] nosharing done"
timeout 170 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --tag=_on 2>&1 | grep -v -i deprec | tail -4
echo "[$(( $(date +%s) - t0 ))s] batchllm on done"
timeout 170 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --global_prefix_sharing=false \
  --shared_prefix_attention=false --schedule_policy=fifo --tag=_off 2>&1 | grep -v -i deprec | tail -4
echo "[$(( $(date +%s) - t0 ))s] batchllm off done"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_engine_gpu.py 2>&1 | tail -6 | tee $OUT/pytest_gpu.log
echo "[$(( $(date +%s) - t0 ))s] gpu tests done"
timeout 90 $B --engine=hf --workload=/tmp/nosharing_256x512x128.jsonl --max_requests=128 --hf_batch_size=128 --tag=_b128 2>&1 | grep -v -i deprec | tail -3
echo "[$(( $(date +%s) - t0 ))s] hf done"
cd $OUT && python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("e2e_*.json")):
    r = json.load(open(f))
    print(f"{f[:70]:70s} run {r['run_seconds']:7.1f}s tot {r['total_tokens_per_s']:9.0f} out {r['output_tokens_per_s']:8.0f} floor {r.get('floor_fraction') or 0:.2f} compile {r.get('compile_seconds', 0):5.1f} prefill {r.get('computed_prefill_tokens')}")
PY
