# Ceilings (JAX, every variant, and PyTorch's in its own process), the attention/matmul overlap
# probe (scripts/probe_overlap.py) and decode attention at the engine's H200 decode shapes, in
# one device call.
#   JAXSERVE_COMMIT=<commit> bash benchmarks/device/overlap_probe.sh
# Knobs: those of probe_streams.sh (SHAPE, LAYERS, RUNS), CASES (e,g), VARIANTS (bench_attention
# configs).
source benchmarks/device/common.sh
timeout 150 python3 scripts/measure_ceilings.py --out=$OUT/ceilings.json 2>&1 \
  | grep -E "one_program|\"[0-9]+ n|rror"; stamp ceilings jax
timeout 90 python3 scripts/measure_ceilings.py --peer=torch --out=$OUT/ceilings_torch.json 2>&1 \
  | grep -E "torch|bytes_per_s|bf16_flops|rror"; stamp ceilings torch
bash benchmarks/device/probe_streams.sh      # one process per variant: an XLA abort costs only it
timeout 200 python3 scripts/bench_attention.py --cases=${CASES:-e,g} --reps=5 --timing=layers \
  --impls=pallas_gpu,pallas_gpu_variants,cudnn_dense \
  --variants=${VARIANTS:-bk=128,warps=8,pf=1,bk=128+warps=8,stages=3} \
  --out=$OUT/attention.json 2>&1 | grep -E "^# |ms |FAILED|rror"; stamp attention
