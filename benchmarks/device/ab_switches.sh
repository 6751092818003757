# A/B of the engine's switches in one device call each, against the ceilings of call J.
#   PART=1 bash benchmarks/device/ab_switches.sh   # decode-heavy and BatchLLM x1 with
#                                                  # fuse_while_stalled on (~560 s)
#   PART=2 bash benchmarks/device/ab_switches.sh   # BatchLLM x1, 128-row shared items; its
#                                                  # x0.25 profile with the idle-gap report (~560 s)
#   PART=3 bash benchmarks/device/ab_switches.sh   # decode-heavy with fuse_while_stalled off
#   PART=4 bash benchmarks/device/ab_switches.sh   # BatchLLM x1 with 1.25x / 1.75x token buckets
#                                                  # on (default) and off (~480 s)
#   PART=5 bash benchmarks/device/ab_switches.sh   # BatchLLM x0.25 profile (the merge's kernel
#                                                  # time) and document x1 (~400 s)
#   PART=6 bash benchmarks/device/ab_switches.sh   # ragged and mixed x1 (~400 s)
#   PART=7 bash benchmarks/device/ab_switches.sh   # the prefix part through cuDNN's packed layout
#                                                  # (rate, lse), document x1 profile (~330 s)
#   PART=8 bash benchmarks/device/ab_switches.sh   # PART=7 with BatchLLM x0.25's profile
#                                                  # between its two parts (~560 s)
#   PART=9 bash benchmarks/device/ab_switches.sh   # ragged x1 in batchllm's order (the default)
#                                                  # and blendserve's (~420 s)
# A cold run spends 80-170 s compiling before it starts: decode-heavy needs ~230 s in all,
# BatchLLM x1 ~300 s, which sets the timeouts below.
# Records land in $OUT with the tags below; the second run of a pair takes its programs from the
# compilation cache the first one filled.
source benchmarks/device/common.sh
C=${CEILINGS:-benchmarks/results/h200/ceilings_callJ.json}
case "${PART:-1}" in
1)
  bench 250 --workload=decode_heavy --scale=1 --max_model_len=1280 --ceilings=$C --tag=_stalled_on
  bench 330 --workload=batchllm --scale=1 --max_model_len=2432 --ceilings=$C --tag=_stalled_on
  ;;
2)
  JAXSERVE_SHARED_BLOCK_ROWS=128 bench 330 --workload=batchllm --scale=1 --max_model_len=2432 \
    --ceilings=$C --tag=_shared128
  timeout 230 python3 scripts/profile_engine.py --workload=batchllm --scale=0.25 \
    --max_model_len=2432 --top=30 --out=$OUT/profile_batchllm_x025.json 2>&1 \
    | grep -v -i deprecat | grep -v "Unable to init" | tail -60
  stamp profile
  ;;
3)
  bench 250 --workload=decode_heavy --scale=1 --max_model_len=1280 --ceilings=$C \
    --fuse_while_stalled=false --tag=_stalled_off
  ;;
4)
  bench 330 --workload=batchllm --scale=1 --max_model_len=2432 --ceilings=$C --tag=_quarter_on
  bench 200 --workload=batchllm --scale=1 --max_model_len=2432 --ceilings=$C \
    --token_bucket_quarter_from=0 --tag=_quarter_off
  ;;
5)
  timeout 230 python3 scripts/profile_engine.py --workload=batchllm --scale=0.25 \
    --max_model_len=2432 --top=30 --out=$OUT/profile_batchllm_x025.json 2>&1 \
    | grep -v -i deprecat | grep -v "Unable to init" | tail -45
  stamp profile
  bench 170 --workload=document --scale=1 --max_model_len=4224 --ceilings=$C --tag=_floors
  ;;
6)
  bench 190 --workload=ragged --scale=1 --max_model_len=3072 --ceilings=$C --tag=_floors
  bench 190 --workload=mixed --scale=1 --max_model_len=2080 --ceilings=$C --tag=_floors
  ;;
7|8)
  timeout 100 python3 scripts/bench_attention.py --cases=h,i --impls=stacked_prefix \
    --mgpu_configs=64x128x2,128x128x2 --reps=5 --out=$OUT/attention_stacked.json 2>&1 \
    | grep -v -i deprecat | grep -v "Unable to init" | grep -v "^    @" | tail -20
  stamp stacked
  if [ "${PART}" = 8 ]; then
    timeout 220 python3 scripts/profile_engine.py --workload=batchllm --scale=0.25 \
      --max_model_len=2432 --top=30 --out=$OUT/profile_batchllm_x025.json 2>&1 \
      | grep -v -i deprecat | grep -v "Unable to init" | tail -40
    stamp profile-batchllm
  fi
  timeout 250 python3 scripts/profile_engine.py --workload=document --scale=1 \
    --max_model_len=4224 --top=30 --out=$OUT/profile_document.json 2>&1 \
    | grep -v -i deprecat | grep -v "Unable to init" | tail -45
  stamp profile
  ;;
9)
  # The step-time model projects ragged 39.76 s in batchllm's order (input order: nothing is
  # shared) and 36.35 s in blendserve's (long outputs admitted first: no tail of few rows).
  bench 230 --workload=ragged --scale=1 --max_model_len=3072 --ceilings=$C --tag=_batchllm
  bench 170 --workload=ragged --scale=1 --max_model_len=3072 --ceilings=$C \
    --schedule_policy=blendserve --tag=_blendserve
  ;;
esac
rm -f $OUT/*.png
