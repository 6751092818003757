# The floor-fraction table in one device call: the ceilings measured once (every variant on
# record in ceilings.json), then each workload at the engine's default batch sizes (sized from
# device memory) against those ceilings.
#   WORKLOADS="nosharing:1024:1:150 decode_heavy:1280:1:200" JAXSERVE_COMMIT=<commit> bash benchmarks/device/floors.sh
# WORKLOADS: name:max_model_len:scale:timeout_s, in order. EXTRA: flags added to every run.
# PNG plots are removed at the end (the device returns only a few files).
source benchmarks/device/common.sh
timeout 120 python3 scripts/measure_ceilings.py --out=$OUT/ceilings.json 2>&1 \
  | grep -E "one_program|variants|\"[0-9]+ n|rror"; stamp ceilings
for w in ${WORKLOADS:-nosharing:1024:1:150}; do
  IFS=: read -r name len scale t <<< "$w"
  bench "$t" --workload="$name" --scale="$scale" --max_model_len="$len" \
    --ceilings=$OUT/ceilings.json --tag=_floors ${EXTRA:-}
done
rm -f $OUT/*.png
