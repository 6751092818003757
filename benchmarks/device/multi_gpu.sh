# The multi-GPU measurements (tensor and data parallelism), in one device call on an
# nvidia-h200-x2 or -x4 machine; every record carries device_count and mesh. Runs what the
# visible GPUs allow:
#   2+ GPUs: TP = 2 greedy equality on the tiny models (tests/tp_multidevice.py, compiled kernel);
#            one GPU, DP = 2 and TP = 2 on the BatchLLM (x1) and no-sharing workloads;
#   4+ GPUs: a llama-3-70b-shape dummy run at TP = 4 and TP = 2 x DP = 2 on both workloads.
#   JAXSERVE_COMMIT=<commit> bash benchmarks/device/multi_gpu.sh
# Knobs: WORKLOADS ("batchllm nosharing"), SCALE (1.0), T (timeout of one run, 540 s).
source benchmarks/device/common.sh
N=$(python3 -c "import jax; print(jax.device_count())")
echo "visible GPUs: $N"
python3 scripts/measure_ceilings.py --out=$OUT/ceilings.json 2>&1 | tail -3; stamp ceilings
if [ "$N" -ge 2 ]; then
  timeout 600 python3 -m pytest -q -x tests/tp_multidevice.py 2>&1 | tail -3 | tee $OUT/pytest_tp_gpu.log
  stamp "TP tests"
fi
T=${T:-540}
for w in ${WORKLOADS:-batchllm nosharing}; do
  bench $T --workload=$w --scale=${SCALE:-1.0} --tag=_1gpu
  [ "$N" -ge 2 ] && bench $T --workload=$w --scale=${SCALE:-1.0} --data_parallel_size=2 --tag=_dp2
  [ "$N" -ge 2 ] && bench $T --workload=$w --scale=${SCALE:-1.0} --tensor_parallel_size=2 --tag=_tp2
  if [ "$N" -ge 4 ]; then
    timeout $T python3 scripts/benchmark.py --model=llama-3-70b --workload=$w --scale=${SCALE:-1.0} \
      --tensor_parallel_size=4 --results_dir=$OUT --tag=_tp4 2>&1 | grep -E "$KEYS|rror"
    stamp "70b tp4 $w"
    timeout $T python3 scripts/benchmark.py --model=llama-3-70b --workload=$w --scale=${SCALE:-1.0} \
      --tensor_parallel_size=2 --data_parallel_size=2 --results_dir=$OUT --tag=_tp2dp2 2>&1 \
      | grep -E "$KEYS|rror"
    stamp "70b tp2 x dp2 $w"
  fi
done
