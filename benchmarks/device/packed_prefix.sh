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
gpu_tests() {   # gpu_tests TIMEOUT -k-EXPRESSION
  timeout "$1" python3 -m pytest -q -m gpu tests/test_packed_prefix.py tests/test_kernels.py \
    -k "$2" 2>&1 | tail -4
  stamp gpu-tests
}
ab_profiles() {   # ab_profiles TIMEOUT_PACKED TIMEOUT_ITEMS: BatchLLM x0.25, both sides
  local w="--workload=batchllm --scale=0.25 --max_model_len=2432"
  JAXSERVE_PACKED_PREFIX=1 prof "$1" batchllm_x025_packed $w
  JAXSERVE_PACKED_PREFIX=0 prof "$2" batchllm_x025_items $w
}
case "${PART:-1}" in
1)
  timeout 120 python3 scripts/probe_cudnn_packed.py --out=$OUT/probe_cudnn_packed.json 2>&1 \
    | grep -v -i deprecat | tail -8
  stamp probe
  gpu_tests 150 "packed or cascade_own_list or g64"
  ab_profiles 200 170
  ;;
3)
  # GPU tests of the segments and the merge; then BatchLLM x0.25 traced, packed and not (~500 s)
  gpu_tests 70 "packed or merge_kernel"
  ab_profiles 245 215
  ;;
4)
  # GPU tests; the shared workloads' prefill steps (bench_attention cases h, i), whole
  # attention a layer (kernel, cuDNN, gathers and merge) with and without segments (~200 s)
  gpu_tests 70 "packed or merge_kernel"
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
