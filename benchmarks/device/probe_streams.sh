# The overlap probe's stream variants, each in its own process (an XLA abort in one leaves the
# others' results), merged into $OUT/overlap.json; the last lines of a failed run are printed.
#   JAXSERVE_COMMIT=<commit> bash benchmarks/device/probe_streams.sh
# Knobs: SHAPE (716x640), LAYERS (8), RUNS ("smoke_add smoke_pallas mm,attn,seq,split,streams2_ro
#   seq,streams2 seq,streams_ro"): the smoke runs say whether stream annotations compile at all
#   (an elementwise op; one Pallas call) before the nano-batched layers are tried.
source benchmarks/device/common.sh
mkdir -p /tmp/probe; rm -f /tmp/probe/*.json
i=0
for vs in ${RUNS:-smoke_add smoke_pallas mm,attn,seq,split,streams2_ro seq,streams2 seq,streams_ro}; do
  i=$((i + 1))
  timeout 120 python3 scripts/probe_overlap.py --shapes=${SHAPE:-716x640} --layers=${LAYERS:-8} \
    --variants=$vs --out=/tmp/probe/$i.json > /tmp/probe/$i.log 2>&1
  echo "probe $vs: rc $?"
  grep -E "ms/layer|overlap_achieved|max_rel" /tmp/probe/$i.log
  grep -qE "ms/layer: [0-9]" /tmp/probe/$i.log && ! grep -q "Aborted\|rror" /tmp/probe/$i.log \
    || grep -vE "^ |^\[|^\{|^\}|^I[0-9]|^W[0-9]" /tmp/probe/$i.log | tail -12
done
python3 -c "
import glob, json
recs = [r for f in sorted(glob.glob('/tmp/probe/*.json')) for r in json.load(open(f))]
json.dump(recs, open('$OUT/overlap.json', 'w'), indent=1)"
stamp probe streams
