#!/usr/bin/env bash
# Session 2, fifth call: where the unrolled step program's KV-sized temporary comes from, then
# the HF transformers peer on samples of the four #6 workloads.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
timeout 170 python3 scripts/diag_program_memory.py --num_pages=3000 --tokens=2048 --dump=/tmp/hlo 2>&1 | grep -v -i -E "deprec|libtpu|warn"
tar czf $OUT/hlo.tgz -C /tmp hlo 2>/dev/null
echo "[$(( $(date +%s) - t0 ))s] diag done"
K='"(workload|run_seconds|total_tokens_per_s|output_tokens_per_s|floor_fraction|num_requests)"'
B="python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --engine=hf"
timeout 100 $B --workload=nosharing --max_requests=512 --hf_batch_size=256 --tag=_b256 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf nosharing done"
timeout 80 $B --workload=batchllm --max_requests=128 --hf_batch_size=64 --tag=_b64 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf batchllm done"
timeout 80 $B --workload=document --max_requests=64 --hf_batch_size=32 --tag=_b32 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf document done"
timeout 100 $B --workload=mixed --max_requests=256 --hf_batch_size=128 --tag=_b128 2>&1 | grep -E "$K|Error"
echo "[$(( $(date +%s) - t0 ))s] hf mixed done"
