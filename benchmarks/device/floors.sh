# The floor-fraction table in one device call: the ceilings measured once (every variant on
# record in ceilings.json), then each workload at the engine's default batch sizes (sized from
# device memory) against those ceilings.
#   WORKLOADS="nosharing:1024:1:150 decode_heavy:1280:1:200" JAXSERVE_COMMIT=<commit> bash benchmarks/device/floors.sh
# WORKLOADS: name:max_model_len:scale:timeout_s, in order. EXTRA: flags added to every run.
# PNG plots are removed at the end (the device returns only a few files).
# CEILINGS: a ceilings file measured earlier on this machine kind, instead of ~60 s measuring.
# GPU_TESTS=1: the GPU tests of the kernels and the engine at the end.
source benchmarks/device/common.sh
if [ -z "${CEILINGS:-}" ]; then
  CEILINGS=$OUT/ceilings.json
  timeout 120 python3 scripts/measure_ceilings.py --out=$CEILINGS 2>&1 \
    | grep -E "one_program|variants|\"[0-9]+ n|rror"; stamp ceilings
fi
for w in ${WORKLOADS:-nosharing:1024:1:150}; do
  IFS=: read -r name len scale t <<< "$w"
  bench "$t" --workload="$name" --scale="$scale" --max_model_len="$len" \
    --ceilings=$CEILINGS --tag=_floors ${EXTRA:-}
done
if [ -n "${GPU_TESTS:-}" ]; then
  timeout 120 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_engine_gpu.py 2>&1 | tail -3
  stamp gpu tests
fi
rm -f $OUT/*.png
