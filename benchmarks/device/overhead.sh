# The engine's own cost against an older tree, in one device call: the no-sharing benchmark in
# both trees at the same sizes (run time, compile), a second warm run of this tree (compile from
# the caches), and each tree's GPU timeline (profile_engine.py: GPU busy against the span).
#   REF=.before JAXSERVE_COMMIT=<commit> bash benchmarks/device/overhead.sh
# (REF: the older tree exported with `git archive <commit> | tar -x -C .before`, carried along.)
source benchmarks/device/common.sh
REF=${REF:-.before}
SIZES="--max_num_batched_tokens=2048 --max_num_seqs=256"
W="--workload=nosharing --scale=${SCALE:-0.5} --max_model_len=1024 $SIZES --measure_ceilings=false"
python3 scripts/measure_ceilings.py --out=$OUT/ceilings.json 2>&1 | tail -4; stamp ceilings
( cd "$REF" && PYTHONPATH=$PWD JAXSERVE_COMMIT=before timeout 240 python3 scripts/benchmark.py \
    --model=llama-3-8b --results_dir=$OUT $W --tag=_before 2>&1 | grep -E "$KEYS|rror" ); stamp before
bench 200 $W --tag=_new_cold
bench 120 $W --tag=_new_warm
P="--workload=nosharing --scale=0.25 $SIZES"
( cd "$REF" && PYTHONPATH=$PWD timeout 200 python3 scripts/profile_engine.py --model=llama-3-8b $P \
    --out=$OUT/profile_before.json 2>&1 | grep -E "^#|idle|rror" | head -30 ); stamp profile before
timeout 150 python3 scripts/profile_engine.py --model=llama-3-8b $P --out=$OUT/profile_new.json \
  2>&1 | grep -E "^#|idle|rror" | head -30; stamp profile new
if [ "${DEFAULTS:-1}" = 1 ]; then
  timeout 150 python3 scripts/profile_engine.py --model=llama-3-8b --workload=nosharing --scale=0.25 \
    --out=$OUT/profile_new_defaults.json 2>&1 | grep -E "^#|idle|rror" | head -30; stamp profile defaults
fi
