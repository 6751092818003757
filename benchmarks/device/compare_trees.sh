# The same benchmark in an older tree (exported into REF_DIR, e.g. `git archive <commit> | tar -x
# -C .before`; /.before/ is git-ignored, so the device call names it in `carry`) and in this one,
# in one device call:
#   source benchmarks/device/common.sh; NEW_EXTRA="--async_scheduling=false" \
#     bash benchmarks/device/compare_trees.sh .before TAG TIMEOUT flags...
# NEW_EXTRA: flags only this tree has.
set -u -o pipefail
ref=$1; tag=$2; t=$3; shift 3
( cd "$ref" && PYTHONPATH=$PWD timeout "$t" python3 scripts/benchmark.py --model=llama-3-8b \
    --results_dir=$OUT --tag="${tag}_ref" "$@" 2>&1 | grep -E '"(run_seconds|compile_seconds|total_tokens_per_s|commit)"|rror' )
echo "[ref done]"
timeout "$t" python3 scripts/benchmark.py --model=llama-3-8b --results_dir=$OUT --tag="${tag}_new" "$@" ${NEW_EXTRA:-} 2>&1 \
  | grep -E '"(run_seconds|compile_seconds|total_tokens_per_s|commit)"|rror'
echo "[new done]"
