#!/usr/bin/env bash
# Second device call: HF peer sample, sharing without the cascade kernel, engine GPU tests.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT"
python3 scripts/make_workload.py --family=nosharing --num_requests=256 --input_len=512 --output_len=128 --output=/tmp/nosharing_256x512x128.jsonl
t0=$(date +%s)
timeout 120 $B --engine=hf --workload=/tmp/nosharing_256x512x128.jsonl --max_requests=128 --hf_batch_size=128 --tag=_b128 2>&1 | grep -v -i deprec | tail -3
echo "[$(( $(date +%s) - t0 ))s] hf done"
timeout 110 $B --workload=batchllm --scale=0.05 --max_model_len=2432 --shared_prefix_attention=false --tag=_sharing_nocascade 2>&1 | grep -v -i deprec | tail -2
echo "[$(( $(date +%s) - t0 ))s] batchllm sharing-only done"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_engine_gpu.py 2>&1 | tail -4 | tee $OUT/pytest_engine_gpu.log
echo "[$(( $(date +%s) - t0 ))s] gpu engine tests done"
cd $OUT && python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("e2e_*.json")):
    r = json.load(open(f))
    print(f"{f[:70]:70s} run {r['run_seconds']:7.1f}s tot {r['total_tokens_per_s']:9.0f} out {r['output_tokens_per_s']:8.0f} floor {r.get('floor_fraction') or 0:.2f} steps {r.get('num_steps')}")
PY
