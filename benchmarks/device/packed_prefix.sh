# Prefilling members' shared prefixes through cuDNN's packed call (JAXSERVE_PACKED_PREFIX=1,
# opt-in) against the kernel's shared items (=0, the default), on whatever card the call gets.
#   PART=1 bash benchmarks/device/packed_prefix.sh   # probe of the cuDNN call, GPU tests,
#                                                    # BatchLLM x0.25 profile on / off (~450 s)
#   PART=3 bash benchmarks/device/packed_prefix.sh   # GPU tests, BatchLLM x0.25 profiles with
#                                                    # their kernel breakdown, on / off (~500 s)
#   PART=4 bash benchmarks/device/packed_prefix.sh   # GPU tests, prefill-step attention of
#                                                    # cases h, i with / without (~200 s)
#   PART=2 bash benchmarks/device/packed_prefix.sh   # ceilings, document x1 and BatchLLM x1
#                                                    # on / off (~560 s)
source benchmarks/device/common.sh
prof() {   # prof TIMEOUT TAG [profile_engine.py flags...]
  local t=$1 tag=$2; shift 2
  timeout "$t" python3 scripts/profile_engine.py --top=30 --out=$OUT/profile_$tag.json "$@" 2>&1 \
    | grep -v -i deprecat | grep -v "Unable to init" | grep -v "^ *[0-9.]* ms .*fusion" | tail -32
  stamp "profile $tag"
}
case "${PART:-1}" in
1)
  timeout 120 python3 scripts/probe_cudnn_packed.py --out=$OUT/probe_cudnn_packed.json 2>&1 \
    | grep -v -i deprecat | tail -8
  stamp probe
  timeout 150 python3 -m pytest -q -m gpu tests/test_packed_prefix.py \
    tests/test_kernels.py -k "packed or cascade_own_list or g64" 2>&1 | tail -4
  stamp gpu-tests
  JAXSERVE_PACKED_PREFIX=1 prof 200 batchllm_x025_packed --workload=batchllm --scale=0.25 --max_model_len=2432
  JAXSERVE_PACKED_PREFIX=0 prof 170 batchllm_x025_items --workload=batchllm --scale=0.25 \
    --max_model_len=2432
  ;;
3)
  # GPU tests of the segments and the merge; then BatchLLM x0.25 traced, packed and not (~500 s)
  timeout 70 python3 -m pytest -q -m gpu tests/test_packed_prefix.py \
    tests/test_kernels.py -k "packed or merge_kernel" 2>&1 | tail -4
  stamp gpu-tests
  JAXSERVE_PACKED_PREFIX=1 prof 245 batchllm_x025_packed --workload=batchllm --scale=0.25 --max_model_len=2432
  JAXSERVE_PACKED_PREFIX=0 prof 215 batchllm_x025_items --workload=batchllm --scale=0.25 \
    --max_model_len=2432
  ;;
4)
  # GPU tests; the shared workloads' prefill steps (bench_attention cases h, i), whole
  # attention a layer (kernel, cuDNN, gathers and merge) with and without segments (~200 s)
  timeout 70 python3 -m pytest -q -m gpu tests/test_packed_prefix.py \
    tests/test_kernels.py -k "packed or merge_kernel" 2>&1 | tail -4
  stamp gpu-tests
  timeout 200 python3 scripts/bench_attention.py --cases=h,i \
    --impls=pallas_gpu_cascade_variants --cascade_variants=packed=0,packed=8 --timing=layers \
    --trace_cases=h,i --reps=5 --out=$OUT/attention_packed.json 2>&1 | grep -v -i deprecat \
    | grep -v "Unable to init" | grep -v "^    @" | tail -40
  stamp attention
  ;;
2)
  timeout 100 python3 scripts/measure_ceilings.py --out=$OUT/ceilings.json 2>&1 \
    | grep -v -i deprecat | tail -4
  stamp ceilings
  C=$OUT/ceilings.json
  JAXSERVE_PACKED_PREFIX=1 bench 160 --workload=document --scale=1 --max_model_len=4224 --ceilings=$C --tag=_packed
  JAXSERVE_PACKED_PREFIX=0 bench 150 --workload=document --scale=1 --max_model_len=4224 \
    --ceilings=$C --tag=_items
  JAXSERVE_PACKED_PREFIX=1 bench 230 --workload=batchllm --scale=1 --max_model_len=2432 --ceilings=$C --tag=_packed
  ;;
esac
rm -f $OUT/*.png
