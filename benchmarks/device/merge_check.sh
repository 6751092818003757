# The Pallas merge compiled on the GPU (its tests), then prefill_rates.sh's attention rates
# (which time it against the default XLA merge, pallasmerge=1; call AA ran
# it as the default against xlamerge=1).
#   JAXSERVE_COMMIT=... bash benchmarks/device/merge_check.sh      # ~400 s
source benchmarks/device/common.sh
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels.py -k "merge or own_list or cascade" 2>&1 | tail -4
stamp gpu-tests
LIMIT=${LIMIT:-400} bash benchmarks/device/prefill_rates.sh
