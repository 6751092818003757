"""Re-derive the floors of end-to-end records from what they hold (host only, no device).

Each record's workload is rebuilt from its command (preset, scale, seed, max_requests), and its
floor recomputed with the record's own ceilings, step sizes and KV capacity. A recomputed floor
that differs from the recorded one means the workload or the floor's model changed since the
run, and the record is reported, not re-derived. For the others it prints the serial floor
(`roofline.Floor.serial_seconds`: weight matmuls and attention one after another, each at the
larger of its FLOP and byte bounds) beside the floor, and what fraction of each the run reached.
With --ceilings=FILE (a `measure_ceilings.py` record) both are derived against those ceilings
instead of the record's own, so runs measured under older ceilings compare with newer ones.

  python3 scripts/refloor.py benchmarks/results/h200/e2e_*_callW.json --out=serial_floors.json \
      --ceilings=benchmarks/results/h200/ceilings_callJ.json
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def command_flags(command: str) -> dict:
    """--name=value flags of a record's command line."""
    out = {}
    for tok in shlex.split(command):
        m = re.fullmatch(r"--([\w]+)=(.*)", tok)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def refloor(rec: dict, ceilings: Optional[tuple[float, float]] = None) -> dict:
    """`ceilings`: (copy bytes/s, bf16 FLOP/s) to derive against; None: the record's own."""
    from jaxserve.tools import roofline, workloads
    from jaxserve.weights import presets

    f = command_flags(rec["command"])
    cfg = presets.load_preset(f.get("model", rec["model_shape"]))
    reqs = workloads.preset(f["workload"], vocab_size=cfg.vocab_size,
                            scale=float(f.get("scale", 1)), seed=int(f.get("workload_seed", 0)))
    if int(f.get("max_requests", 0)):
        reqs = reqs[:int(f["max_requests"])]
    from jaxserve.scheduler.prefix_tree import build_prefix_tree

    prompts = [r["prompt_token_ids"] for r in reqs]
    tree = build_prefix_tree(prompts)

    def floor(bw: float, flops: float):
        return roofline.batch_floor(
            cfg, prompts, [r["max_tokens"] for r in reqs], tree, peak_flops=flops,
            hbm_bandwidth=bw, max_num_batched_tokens=rec["max_num_batched_tokens"],
            max_num_seqs=rec["max_num_seqs"], kv_capacity_tokens=rec.get("kv_capacity_tokens"),
            tensor_parallel=int(f.get("tensor_parallel_size", 1)),
            data_parallel=int(f.get("data_parallel_size", 1)))

    own = floor(rec["hbm_bandwidth_measured"], rec["matmul_flops_measured"])
    same = abs(own.seconds - rec["floor_seconds"]) <= 1e-6 * rec["floor_seconds"]
    bw, flops = ceilings or (rec["hbm_bandwidth_measured"], rec["matmul_flops_measured"])
    fl = floor(bw, flops) if ceilings else own
    run = rec["run_seconds"]
    return dict(workload=rec["workload"], commit=rec.get("commit"), run_seconds=run,
                hbm_bandwidth=bw, matmul_flops=flops,
                floor_seconds=fl.seconds, floor_fraction=fl.seconds / run,
                compute_seconds=fl.compute_seconds, memory_seconds=fl.memory_seconds,
                serial_floor_seconds=fl.serial_seconds,
                serial_floor_fraction=fl.serial_seconds / run,
                matches_record=same)


def main(argv: list[str]) -> int:
    out = ceilings = None
    paths = []
    for a in argv:
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a.startswith("--ceilings="):
            with open(a.split("=", 1)[1]) as fh:
                c = json.load(fh)
            ceilings = (c["one_program_copy_bytes_per_s"], c["one_program_bf16_flops"])
        else:
            paths.append(a)
    rows = []
    for p in paths:
        with open(p) as fh:
            rec = json.load(fh)
        if not rec.get("floor_seconds"):
            print(f"{p}: no floor on record (a peer's record?): skipped")
            continue
        r = refloor(rec, ceilings)
        r["record"] = os.path.basename(p)
        rows.append(r)
        if not r["matches_record"]:
            print(f"{p}: the floor recomputed at its own ceilings != recorded "
                  f"{rec['floor_seconds']:.2f} s: the workload or the floor changed; not used")
            continue
        print(f"{r['record']}: run {r['run_seconds']:.2f} s; floor {r['floor_seconds']:.2f} s "
              f"(compute {r['compute_seconds']:.2f}, memory {r['memory_seconds']:.2f}) -> "
              f"{r['floor_fraction']:.3f}; serial floor {r['serial_floor_seconds']:.2f} s -> "
              f"{r['serial_floor_fraction']:.3f}")
    if out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
