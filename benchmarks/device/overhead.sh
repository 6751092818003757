# The engine's own cost against an older tree, in one device call: the no-sharing benchmark in
# both trees at the same sizes (run time, compile, per-step trace), a second run of this tree
# (warm: compile from the caches; SYNC=1: without host/device overlap), and the GPU timelines
# (profile_engine.py: GPU busy against the span, host phases, steps the host came late to).
#   REF=.before JAXSERVE_COMMIT=<commit> bash benchmarks/device/overhead.sh
# REF: the older tree exported with `git archive <commit> | tar -x -C .before`, carried along.
# Knobs: SCALE (0.5), PSCALE (profile scale, 0.25), PROFILE_REF (1), DEFAULTS (0: also profile
# this tree at its own default batch sizes), SYNC (0), LAUNCH (0: also a run and a profile with
# --launch_thread, the step programs launched from a worker thread).
source benchmarks/device/common.sh
REF=${REF:-.before}
SIZES="--max_num_batched_tokens=2048 --max_num_seqs=256"
W="--workload=nosharing --scale=${SCALE:-0.5} --max_model_len=1024 $SIZES --measure_ceilings=false"
python3 scripts/measure_ceilings.py --out=$OUT/ceilings.json 2>&1 | tail -4; stamp ceilings
( cd "$REF" && PYTHONPATH=$PWD JAXSERVE_COMMIT=before timeout 240 python3 scripts/benchmark.py \
    --model=llama-3-8b --results_dir=$OUT $W --tag=_before 2>&1 | grep -E "$KEYS|rror" ); stamp before
bench 200 $W --save_trace --tag=_new_cold
if [ "${SYNC:-0}" = 1 ]; then bench 120 $W --save_trace --async_scheduling=false --tag=_new_sync
else bench 120 $W --save_trace --tag=_new_warm; fi
P="--workload=nosharing --scale=${PSCALE:-0.25} $SIZES"
if [ "${PROFILE_REF:-1}" = 1 ]; then
  ( cd "$REF" && PYTHONPATH=$PWD timeout 200 python3 scripts/profile_engine.py --model=llama-3-8b $P \
      --out=$OUT/profile_before.json 2>&1 | grep -E "^# [a-z]|^  [a-z]|rror" ); stamp profile before
fi
timeout 150 python3 scripts/profile_engine.py --model=llama-3-8b $P --out=$OUT/profile_new.json \
  2>&1 | grep -E "^# [a-z]|^  [a-z]|rror"; stamp profile new
if [ "${LAUNCH:-0}" = 1 ]; then
  bench 120 $W --launch_thread --save_trace --tag=_new_launch_thread
  timeout 150 python3 scripts/profile_engine.py --model=llama-3-8b $P --launch_thread \
    --out=$OUT/profile_new_launch_thread.json 2>&1 | grep -E "^# [a-z]|^  [a-z]|rror"
  stamp "launch thread"
fi
if [ "${DEFAULTS:-0}" = 1 ]; then
  timeout 150 python3 scripts/profile_engine.py --model=llama-3-8b --workload=nosharing \
    --scale=${PSCALE:-0.25} --out=$OUT/profile_new_defaults.json 2>&1 | grep -E "^# [a-z]|^  [a-z]|rror"
  stamp profile defaults
fi
