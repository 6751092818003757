# What rate attention reaches at the shared workloads' prefill shapes, in one device call:
# the engine's cascade kernel (default and bk=128 variants, with a per-kernel trace that shows the
# merge), cuDNN on the per-member dense shape, and cuDNN and JAX's Mosaic GPU FlashAttention-3
# on the prefix part alone (members' queries stacked over the group's prefix).
#   JAXSERVE_COMMIT=... bash benchmarks/device/prefill_rates.sh      # ~250 s
source benchmarks/device/common.sh
timeout ${LIMIT:-480} python3 scripts/bench_attention.py --cases=${CASES:-h,i} \
  --impls=pallas_gpu_cascade,stacked_prefix,cudnn_prefill,pallas_gpu_cascade_variants \
  --cascade_variants=${VARIANTS:-pallasmerge=1,bk=128,bk=128+stages=3,bm=128+bk=128+warps=8} \
  --mgpu_configs=${MGPU:-64x128x2,64x64x2,128x128x2,64x128x3} --timing=layers --reps=5 \
  --trace_cases=${TRACE:-h,i} --out=$OUT/attention_prefill_rates.json 2>&1 \
  | grep -v -i deprecat | grep -v "Unable to init" | grep -v "^    @" | tail -60
stamp prefill_rates
