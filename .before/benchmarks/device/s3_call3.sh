#!/usr/bin/env bash
# Session 3, call 3: engine GPU tests (kernel by default, greedy equal to the reference); case b's
# GPU timeline (busy, span, idle gaps) in both timing modes; a profile of the document workload
# (unrolled, 1024 rows, shared-prefix lists in fused blocks); HF's static vs dynamic cache.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
t0=$(date +%s)
K='"(workload|run_seconds|total_tokens_per_s|hf_cache_implementation)"'
timeout 150 python3 -m pytest -q -m gpu tests/test_engine_gpu.py -p no:cacheprovider 2>&1 | tail -3 | tee $OUT/pytest_engine_gpu_h100_s3.log
echo "[$(( $(date +%s) - t0 ))s] engine gpu tests done"
for mode in dispatch program; do
timeout 60 python3 scripts/bench_attention.py --cases=b --reps=5 --impls=pallas_gpu,pallas_gpu_cascade \
  --trace_cases=b --timing=$mode --out=$OUT/attention_h100_s3_b_$mode.json 2>&1 | grep -E "^(b |   gpu (busy|.*ragged))"
done
echo "[$(( $(date +%s) - t0 ))s] attention timelines done"
timeout 200 python3 scripts/profile_engine.py --model=llama-3-8b --workload=document --scale=0.25 \
  --max_num_seqs=1024 --max_model_len=4224 --shared_prefix_attention=true --layer_loop=unrolled \
  --top=16 --out=$OUT/profile_document_x0.25_unrolled_seqs1024.json 2>&1 | grep -vE "Warning|warn|^\s*$|cuda_timer|xla_bridge" | tail -42
echo "[$(( $(date +%s) - t0 ))s] profile done"
for c in dynamic static; do
timeout 100 python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --engine=hf --workload=nosharing \
  --max_requests=64 --hf_batch_size=64 --hf_cache_implementation=$c --measure_ceilings=false --tag=_first64_b64_$c 2>&1 | grep -E "$K|Error"
done
echo "[$(( $(date +%s) - t0 ))s] hf cache modes done"
