# The merge's K bound per bucket (block_sizes.host_layout: 2 in prefill buckets, 4 in decode
# buckets of many rows; before, every bucket had ceil(row pages x page size / 256) + 3 or 4: 13
# at BatchLLM's 2,432-token rows, 20 at the document's 4,224), on whatever card the call gets.
#   PART=1 bash benchmarks/device/merge_partials.sh   # GPU tests; the prefill steps of cases h, i
#                                                     # at K = 13 (the old bound) and at the
#                                                     # step's own K, and with packed segments
#                                                     # (~250 s)
#   REF=.before PART=2 bash benchmarks/device/merge_partials.sh   (run with carry=[".before"])
#                                                     # BatchLLM x0.25 end to end, the tree before
#                                                     # the bound (git archive 8c1b745 | tar -x -C
#                                                     # .before) against this one (~420 s)
source benchmarks/device/common.sh
case "${PART:-1}" in
1)
  timeout 90 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_packed_prefix.py \
    -k "two_partials or cascade or packed or merge_kernel" 2>&1 | tail -4
  stamp gpu-tests
  # The kernel and the XLA merge a layer, timed inside one program; the trace gives the merge
  # fusion's own time at each K.
  timeout 220 python3 scripts/bench_attention.py --cases=h,i \
    --impls=pallas_gpu_cascade_variants \
    --cascade_variants=packed=0+partials=13,packed=0,packed=8 --timing=layers \
    --trace_cases=h,i --reps=5 --out=$OUT/attention_merge_partials.json 2>&1 \
    | grep -v -i deprecat | grep -v "Unable to init" | grep -v "^    @" | tail -40
  stamp attention
  ;;
2)
  # Untraced runs at the engine's defaults, the older tree first (its programs compile cold;
  # the newer tree's K differs, so it compiles its own).
  NEW_EXTRA="" bash benchmarks/device/compare_trees.sh "${REF:-.before}" _batchllm_x025 200 \
    --workload=batchllm --scale=0.25 --max_model_len=2432 --measure_ceilings=false
  stamp compare
  ;;
esac
rm -f $OUT/*.png
