#!/usr/bin/env bash
# Session 3, call 9: case b in layers timing with 32 (a Llama-3-8B step) and 64 calls per program:
# the wall clock with the per-program fixed cost spread as in the engine's step.
set -u -o pipefail
export PYTHONUNBUFFERED=1 JAXSERVE_COMMIT=${JAXSERVE_COMMIT:-unknown}
export PYTHONPATH=$PWD
for n in 32 64; do
timeout 90 python3 scripts/bench_attention.py --cases=b --reps=7 --timing=layers --sets=$n \
  --impls=pallas_gpu,pallas_gpu_cascade --trace_cases=b --out=$OUT/attention_h100_s3_b_layers$n.json 2>&1 \
  | grep -E "^(#|b |   gpu (busy|.*ragged))"
done
