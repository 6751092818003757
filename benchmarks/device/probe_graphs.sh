# Does a CUDA graph run two nano-batches' attention and matmuls at once? The overlap probe's
# plain and nano-batched layers (no stream annotation) under three XLA settings, each in its own
# process: command buffers off (the engine's default), on in XLA's default LHS mode (commands
# serialised in the scheduler's order), and on in CONCURRENT mode (graph edges only where
# buffers are shared). Merged into $OUT/graphs.json.
#   JAXSERVE_COMMIT=<commit> bash benchmarks/device/probe_graphs.sh
# Knobs: SHAPES (716x640,1024x640), LAYERS (8), VARIANTS (mm,attn,seq,split).
source benchmarks/device/common.sh
mkdir -p /tmp/graphs; rm -f /tmp/graphs/*.json
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
declare -A MODES=([off]="--xla_gpu_enable_command_buffer=" [lhs]="$CB --xla_gpu_command_buffer_scheduling_mode=LHS" [concurrent]="$CB --xla_gpu_command_buffer_scheduling_mode=CONCURRENT")
for mode in off lhs concurrent; do
  XLA_FLAGS="${MODES[$mode]}" timeout 150 python3 scripts/probe_overlap.py \
    --shapes=${SHAPES:-716x640,1024x640} --layers=${LAYERS:-8} \
    --variants=${VARIANTS:-mm,attn,seq,split} --out=/tmp/graphs/$mode.json > /tmp/graphs/$mode.log 2>&1
  echo "graphs $mode: rc $?"
  grep -E "ms/layer|rror" /tmp/graphs/$mode.log | grep -v -i deprecat | head -20
done
python3 -c "
import glob, json
recs = []
for f in sorted(glob.glob('/tmp/graphs/*.json')):
    for r in json.load(open(f)):
        r['graph_mode'] = f.split('/')[-1][:-5]
        recs.append(r)
        print(r['graph_mode'], r['rows'], {k: round(v, 3) for k, v in r.items() if k.endswith(('_ms_per_layer', '_max_rel_diff', 'overlap_achieved'))})
json.dump(recs, open('$OUT/graphs.json', 'w'), indent=1)"
stamp probe graphs
